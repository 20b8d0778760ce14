/* VP 0's measured boot on the vTPM (measured_boot.c; docs/contracts.md, "VTL0 test guest"). */
#ifndef VTL0_MEASURED_BOOT_H
#define VTL0_MEASURED_BOOT_H

#include <stdint.h>

/* Measures the command line at cmdline_gpa into PCR 8 and the image (VTL0_LOAD_GPA ..
 * + image_span) into PCR 9, reads them back, draws random bytes and counts the boot in an
 * NV index, printing each step on COM1.  Any failure prints one line and returns. */
void step_measured_boot(uint64_t cmdline_gpa, uint64_t image_span);

#endif
