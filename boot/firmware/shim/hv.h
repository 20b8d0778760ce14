/* Talking to the Hyper-V hypervisor: CPUID leaves, synthetic MSRs and
 * hypercalls through the overlay page. */
#ifndef SHIM_HV_H
#define SHIM_HV_H

#include <stdint.h>
#include "shim.h"

/* start.S: calls the hypercall page (RCX control, RDX in, R8 out). */
uint64_t hv_hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa);
extern uint8_t hypercall_page[];

/* Panics unless CPUID agrees with the isolation type we were built for. */
void hv_confirm_isolation(uint32_t isolation);
void hv_enable_hypercalls(void);
void hv_disable_hypercalls(void);
/* One register via HvCallGetVpRegisters (self, current VTL); returns the
 * hypercall status, *value only valid on success. */
uint16_t hv_get_vp_register(uint32_t name, uint64_t *value);
/* Panics unless the i-th host CPU has VP index i. */
void hv_check_vp_indexes(const struct host_info *host);
uint64_t hv_reftime(void);

#endif
