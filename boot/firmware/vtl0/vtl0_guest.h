/* vtl0_guest.h - the VTL0 test guest's contract with the simulator: the
 * intercepted ports/addresses/MSR and the per-VP record in the results page.
 * The Python side mirrors struct vtl0_result as a numpy dtype; change both
 * together (docs/contracts.md, "VTL0 test guest"). */
#ifndef VTL0_GUEST_H
#define VTL0_GUEST_H

#include <stddef.h>
#include <stdint.h>

#define VTL0_LOAD_GPA        0x200000ull     /* where the simulator loads the image */
#define VTL0_COM1_PORT       0x3f8u          /* THR: one OUT per character, no LSR polling */
#define VTL0_CPUID_LEAF      0x40000000u     /* hypervisor vendor leaf */
#define VTL0_TEST_PORT       0x440u          /* 32-bit OUT then 32-bit IN */
#define VTL0_OUT_PATTERN     0xc0de0000u     /* | vp_index, written to the test port */
#define VTL0_MMIO_BASE       0xfed00000ull   /* unmapped GPA; VP n uses base + 8 n */
#define VTL0_MMIO_STRIDE     8u
#define VTL0_MMIO_READ_OFF   0u              /* 32-bit load */
#define VTL0_MMIO_WRITE_OFF  4u              /* 32-bit store */
#define VTL0_MMIO_PATTERN    0xa5a50000u     /* | vp_index, stored to the write address */
#define VTL0_TEST_MSR        0x40000000u     /* HV_X64_MSR_GUEST_OS_ID */
#define VTL0_RESULT_MAGIC    0x564f544cu     /* "LTOV" in memory */
#define VTL0_RESULT_SIZE     64u             /* record n at results + 64 n */

/* One VP's record.  magic and vp_index are written first, each field as its
 * step completes, done = 1 last: a host reading done == 1 sees the rest. */
struct vtl0_result {
    uint32_t magic;        /* VTL0_RESULT_MAGIC */
    uint32_t vp_index;
    uint32_t cpuid_ebx;    /* CPUID 0x40000000: EBX,ECX,EDX = 12-byte vendor string */
    uint32_t cpuid_ecx;
    uint32_t cpuid_edx;
    uint32_t in_value;     /* IN EAX, 0x440 */
    uint32_t mmio_value;   /* 32-bit load from VTL0_MMIO_BASE + 8 n */
    uint32_t pad;
    uint64_t msr_value;    /* RDMSR 0x40000000, EDX:EAX */
    uint32_t done;         /* 1 once every step above has run */
    uint8_t  reserved[20];
};

_Static_assert(offsetof(struct vtl0_result, magic) == 0, "magic");
_Static_assert(offsetof(struct vtl0_result, vp_index) == 4, "vp_index");
_Static_assert(offsetof(struct vtl0_result, cpuid_ebx) == 8, "cpuid_ebx");
_Static_assert(offsetof(struct vtl0_result, cpuid_ecx) == 12, "cpuid_ecx");
_Static_assert(offsetof(struct vtl0_result, cpuid_edx) == 16, "cpuid_edx");
_Static_assert(offsetof(struct vtl0_result, in_value) == 20, "in_value");
_Static_assert(offsetof(struct vtl0_result, mmio_value) == 24, "mmio_value");
_Static_assert(offsetof(struct vtl0_result, pad) == 28, "pad");
_Static_assert(offsetof(struct vtl0_result, msr_value) == 32, "msr_value");
_Static_assert(offsetof(struct vtl0_result, done) == 40, "done");
_Static_assert(offsetof(struct vtl0_result, reserved) == 44, "reserved");
_Static_assert(sizeof(struct vtl0_result) == VTL0_RESULT_SIZE, "record size");

#endif
