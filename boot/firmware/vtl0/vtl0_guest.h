/* vtl0_guest.h - the VTL0 test guest's contract with the simulator: the
 * intercepted ports/addresses/MSR, the boot parameters, what the measured boot
 * uses of the vTPM, and the per-VP record in the results page.
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
#define VTL0_MMIO_BASE       0xfed00000ull   /* unmapped GPA; VP n's slot is base + 64 n */
#define VTL0_MMIO_STRIDE     64u
#define VTL0_MMIO_PATTERN    0xa5a50000u     /* | vp_index, stored to the write address */
#define VTL0_TEST_MSR        0x40000000u     /* HV_X64_MSR_GUEST_OS_ID */
#define VTL0_RESULT_MAGIC    0x564f544cu     /* "LTOV" in memory */
#define VTL0_RESULT_SIZE     128u            /* record n at results + 128 n */
#define VTL0_LOOP_PORT       0x444u          /* the workload loop: a 32-bit OUT of each iteration number */
#define VTL0_POWER_PORT      0x404u          /* a 32-bit OUT of the VP index: this VP has finished */
#define VTL0_HYPERCALL_CODE  0x005cu         /* HvCallPostMessage: a hypercall VTL2 intercepts (VMBus) */
#define VTL0_HYPERCALL_CONNECTION 0u         /* the connection id posted to: none is open, so */
#define VTL0_HYPERCALL_STATUS 0x0012u        /* the VMM answers HV_STATUS_INVALID_CONNECTION_ID */
/* The loop's checksum: FNV-1a (64-bit) over the iteration numbers, one 32-bit word at a time:
 * x = BASIS; for each i: x = (x ^ i) * PRIME. */
#define VTL0_CHECKSUM_BASIS  0xcbf29ce484222325ull
#define VTL0_CHECKSUM_PRIME  0x100000001b3ull

/* Boot parameters beyond RDI..RCX (docs/contracts.md): R8 = flags, R9 = the GPA of the
 * command line page (NUL-terminated), R10 = the image's span from VTL0_LOAD_GPA. */
#define VTL0_FLAG_TPM        0x1u            /* R8 bit 0: the VM has a vTPM; VP 0 does a measured boot */
#define VTL0_CMDLINE_GPA     0x5000ull       /* the loader writes the command line here */
#define VTL0_CMDLINE_MAX     4095u           /* bytes before its NUL, at most (one page) */
/* The vTPM as the guest drives it (x86 layout of the device: IO ports and the CRB). */
#define VTL0_TPM_CONTROL_PORT 0x1040u        /* write a TpmIoCommand */
#define VTL0_TPM_DATA_PORT   0x1044u         /* its 32-bit value; a read of all ones is an I/O error */
#define VTL0_TPM_IO_VERSION  0u              /* TpmIoCommand: the interface version (read) */
#define VTL0_TPM_IO_MAP_SHARED_MEMORY 1u     /* TpmIoCommand: the buffers' GPA (write) */
#define VTL0_TPM_CRB_BASE    0xfed40000ull   /* the CRB control area (MMIO, 32-bit accesses) */
#define VTL0_TPM_LOC_CTRL    0x08u           /* write 1: request locality 0 */
#define VTL0_TPM_START       0x4cu           /* write 1: run the command; reads 0 once done */
#define VTL0_TPM_BUFFER_GPA  0x8000ull       /* command buffer; the response follows */
#define VTL0_TPM_BUFFER_SIZE 4096u           /* each buffer: response at BUFFER_GPA + 4096 */
/* The measured boot: what goes where. */
#define VTL0_TPM_PCR_CMDLINE 8u              /* SHA-256 of the command line (bytes before the NUL) */
#define VTL0_TPM_PCR_IMAGE   9u              /* SHA-256 of the loaded image, VTL0_LOAD_GPA + span */
#define VTL0_TPM_RANDOM_BYTES 16u            /* TPM2_GetRandom's size */
#define VTL0_TPM_NV_INDEX    0x01500016u     /* the boot counter: 8 bytes, big endian */
#define VTL0_TPM_NV_SIZE     8u
/* OWNERWRITE | OWNERREAD | AUTHREAD | NO_DA: the owner writes it, anyone may read it with
 * its (empty) auth, and a wrong password never counts towards dictionary-attack lockout. */
#define VTL0_TPM_NV_ATTRIBUTES 0x02060002u

/* MMIO instruction forms: each one's offset in the VP's slot.  A load of s bytes
 * reads (0xf00d0000 | offset in the range) truncated to s bytes (the host's device). */
#define VTL0_MMIO_READ_OFF      0x00u  /* 32-bit load (plain C: mov eax, [reg]) */
#define VTL0_MMIO_WRITE_OFF     0x04u  /* 32-bit store of VTL0_MMIO_PATTERN | vp (plain C) */
#define VTL0_MMIO_LOAD64_OFF    0x08u  /* mov r11, [rsi + r8*8 + 8]: SIB + disp8 */
#define VTL0_MMIO_STORE64_OFF   0x10u  /* mov [rdi + rdx*8 + 0x10], r10: SIB + disp8 */
#define VTL0_MMIO_IMM64_OFF     0x18u  /* mov qword [rsi + 0x18], imm32 (sign-extended) */
#define VTL0_MMIO_ZX8_OFF       0x20u  /* movzx ecx, byte [rsi + 0x20] */
#define VTL0_MMIO_HI8_OFF       0x21u  /* mov ch, byte [rsi + 0x21] */
#define VTL0_MMIO_SX16_OFF      0x22u  /* movsx rcx, word [rsi + 0x22] */
#define VTL0_MMIO_SX32_OFF      0x24u  /* movsxd rcx, dword [rsi + 0x24] */
#define VTL0_MMIO_U16_OFF       0x28u  /* mov cx, word [rsi + 0x28] */
#define VTL0_MMIO_IMM16_OFF     0x2au  /* mov word [rsi + 0x2a], imm16 */
#define VTL0_MMIO_STORE8_OFF    0x2cu  /* mov byte [rsi + 0x2c], r9b */
#define VTL0_MMIO_HI8_STORE_OFF 0x2du  /* mov byte [rsi + 0x2d], ch */
/* What those stores write and the loads' destinations hold before each load. */
#define VTL0_MMIO_PATTERN64  0x8877665544332211ull  /* ^ vp: r9, rcx, r10 of the stores */
#define VTL0_MMIO_PRELOAD    0x0123456789abcdefull  /* each load's destination before it */
#define VTL0_MMIO_IMM16      0x5aa5u
#define VTL0_MMIO_IMM32      0xa5a5a5a5u            /* stored as 0xffffffffa5a5a5a5 */

/* One VP's record.  magic and vp_index are written first, each field as its
 * step completes (iterations and checksum after every loop iteration), done = 1
 * last: a host reading done == 1 sees the rest. */
struct vtl0_result {
    uint32_t magic;        /* VTL0_RESULT_MAGIC */
    uint32_t vp_index;
    uint32_t cpuid_ebx;    /* CPUID 0x40000000: EBX,ECX,EDX = 12-byte vendor string */
    uint32_t cpuid_ecx;
    uint32_t cpuid_edx;
    uint32_t in_value;     /* IN EAX, 0x440 */
    uint32_t mmio_value;   /* 32-bit load from the slot + VTL0_MMIO_READ_OFF */
    uint32_t pad;
    uint64_t msr_value;    /* RDMSR 0x40000000, EDX:EAX */
    uint32_t done;         /* 1 once every step above has run */
    /* The other MMIO loads (offsets above); the 64-bit ones are the whole destination
     * register, which held VTL0_MMIO_PRELOAD before the load. */
    uint32_t mmio_zx8;     /* ECX after movzx ecx, byte */
    uint64_t mmio_hi8;     /* RCX after mov ch, byte */
    uint64_t mmio_sx16;    /* RCX after movsx rcx, word */
    uint64_t mmio_sx32;    /* RCX after movsxd rcx, dword */
    uint64_t mmio_u16;     /* RCX after mov cx, word */
    uint64_t mmio_u64;     /* R11 after mov r11, qword */
    uint64_t checksum;     /* the loop's checksum so far (VTL0_CHECKSUM_BASIS before the loop) */
    uint32_t iterations;   /* loop iterations done so far (ITER, from RCX at entry, once done) */
    uint32_t pad2;
    uint64_t hypercall_status;  /* RAX after the intercepted HvCallPostMessage */
    uint8_t  post_message[16];  /* its input: connection id, message type, payload size (no payload) */
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
_Static_assert(offsetof(struct vtl0_result, mmio_zx8) == 44, "mmio_zx8");
_Static_assert(offsetof(struct vtl0_result, mmio_hi8) == 48, "mmio_hi8");
_Static_assert(offsetof(struct vtl0_result, mmio_sx16) == 56, "mmio_sx16");
_Static_assert(offsetof(struct vtl0_result, mmio_sx32) == 64, "mmio_sx32");
_Static_assert(offsetof(struct vtl0_result, mmio_u16) == 72, "mmio_u16");
_Static_assert(offsetof(struct vtl0_result, mmio_u64) == 80, "mmio_u64");
_Static_assert(offsetof(struct vtl0_result, checksum) == 88, "checksum");
_Static_assert(offsetof(struct vtl0_result, iterations) == 96, "iterations");
_Static_assert(offsetof(struct vtl0_result, pad2) == 100, "pad2");
_Static_assert(offsetof(struct vtl0_result, hypercall_status) == 104, "hypercall_status");
_Static_assert(offsetof(struct vtl0_result, post_message) == 112, "post_message");
_Static_assert(sizeof(struct vtl0_result) == VTL0_RESULT_SIZE, "record size");

#endif
