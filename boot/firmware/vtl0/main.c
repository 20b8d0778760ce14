/* VTL0 test guest: each step is one instruction that leaves VTL0 and must be
 * emulated by VTL2 (see docs/contracts.md, "VTL0 test guest"); steps 7 and 8
 * are one such instruction per MMIO form, steps 1 and 12 one per character
 * and step 10 one per loop iteration.
 * Every step has its own noinline function so it shows up as a symbol when
 * stepping.  The run ends with the power-off write (step 13): the VM powers
 * off once every VP has made it.  The measured boot (VP 0, with a vTPM) is
 * the exception: a whole TPM session (measured_boot.c). */
#include "console.h"
#include "measured_boot.h"
#include "vtl0_guest.h"
#include "x86_insn.h"

void vtl0_main(uint32_t vp, uint32_t vp_count, uint64_t results_gpa, uint32_t iterations,
               uint32_t flags, uint64_t cmdline_gpa, uint64_t image_span);

/* Step 1: "hello from VTL0 vp N\n". */
static __attribute__((noinline)) void step_com1_hello(uint32_t vp)
{
    com1_puts("hello from VTL0 vp ");
    com1_put_dec(vp);
    com1_puts("\n");
}

/* Step 2: the hypervisor vendor leaf. */
static __attribute__((noinline)) void step_cpuid(volatile struct vtl0_result *r)
{
    struct cpuid_regs v = cpuid(VTL0_CPUID_LEAF, 0);
    r->cpuid_ebx = v.ebx;
    r->cpuid_ecx = v.ecx;
    r->cpuid_edx = v.edx;
}

/* Step 3: 32-bit port write, tagged with the VP so the host can tell VPs apart. */
static __attribute__((noinline)) void step_port_out(uint32_t vp)
{
    outl(VTL0_TEST_PORT, VTL0_OUT_PATTERN | vp);
}

/* Step 4: 32-bit port read. */
static __attribute__((noinline)) void step_port_in(volatile struct vtl0_result *r)
{
    r->in_value = inl(VTL0_TEST_PORT);
}

/* Step 5: load from an unmapped GPA; volatile keeps it a single 32-bit load. */
static __attribute__((noinline)) void step_mmio_read(uint32_t vp, volatile struct vtl0_result *r)
{
    volatile uint32_t *p = (volatile uint32_t *)(VTL0_MMIO_BASE + VTL0_MMIO_STRIDE * vp
                                                 + VTL0_MMIO_READ_OFF);
    r->mmio_value = *p;
}

/* Step 6: store to an unmapped GPA. */
static __attribute__((noinline)) void step_mmio_write(uint32_t vp)
{
    volatile uint32_t *p = (volatile uint32_t *)(VTL0_MMIO_BASE + VTL0_MMIO_STRIDE * vp
                                                 + VTL0_MMIO_WRITE_OFF);
    *p = VTL0_MMIO_PATTERN | vp;
}

/* Step 7: the other MMIO loads, one instruction each (its form is in vtl0_guest.h next to
 * its offset): 1, 2, 4 and 8 bytes, zero- and sign-extending, into a high-byte register and
 * into the low 16 bits.  Each destination starts as VTL0_MMIO_PRELOAD, so the record shows
 * which of its bits the load replaced. */
static __attribute__((noinline)) void step_mmio_loads(uint32_t vp, volatile struct vtl0_result *r)
{
    uint64_t slot = VTL0_MMIO_BASE + VTL0_MMIO_STRIDE * vp;
    uint64_t v;

    v = VTL0_MMIO_PRELOAD;
    __asm__ volatile("movzbl %c[off](%[p]), %k[v]"
                     : [v] "+c"(v) : [p] "S"(slot), [off] "i"(VTL0_MMIO_ZX8_OFF) : "memory");
    r->mmio_zx8 = (uint32_t)v;
    v = VTL0_MMIO_PRELOAD;
    __asm__ volatile("movb %c[off](%[p]), %h[v]"
                     : [v] "+c"(v) : [p] "S"(slot), [off] "i"(VTL0_MMIO_HI8_OFF) : "memory");
    r->mmio_hi8 = v;
    v = VTL0_MMIO_PRELOAD;
    __asm__ volatile("movswq %c[off](%[p]), %[v]"
                     : [v] "+c"(v) : [p] "S"(slot), [off] "i"(VTL0_MMIO_SX16_OFF) : "memory");
    r->mmio_sx16 = v;
    v = VTL0_MMIO_PRELOAD;
    __asm__ volatile("movslq %c[off](%[p]), %[v]"
                     : [v] "+c"(v) : [p] "S"(slot), [off] "i"(VTL0_MMIO_SX32_OFF) : "memory");
    r->mmio_sx32 = v;
    v = VTL0_MMIO_PRELOAD;
    __asm__ volatile("movw %c[off](%[p]), %w[v]"
                     : [v] "+c"(v) : [p] "S"(slot), [off] "i"(VTL0_MMIO_U16_OFF) : "memory");
    r->mmio_u16 = v;

    /* 8 bytes at base + index * 8 + disp8, into a REX register (REX.W, R and X all set). */
    register uint64_t wide __asm__("r11") = VTL0_MMIO_PRELOAD;
    register uint64_t index __asm__("r8") = (uint64_t)vp * (VTL0_MMIO_STRIDE / 8);
    __asm__ volatile("movq %c[off](%[base],%[index],8), %[v]"
                     : [v] "+r"(wide)
                     : [base] "S"(VTL0_MMIO_BASE), [index] "r"(index), [off] "i"(VTL0_MMIO_LOAD64_OFF)
                     : "memory");
    r->mmio_u64 = wide;
}

/* Step 8: the other MMIO stores: a REX byte register, a high-byte register, a 16-bit
 * immediate, a 32-bit immediate sign-extended to 8 bytes and an 8-byte register at
 * base + index * 8 + disp8.  The registers hold VTL0_MMIO_PATTERN64 ^ vp. */
static __attribute__((noinline)) void step_mmio_stores(uint32_t vp)
{
    uint64_t slot = VTL0_MMIO_BASE + VTL0_MMIO_STRIDE * vp;
    uint64_t q = VTL0_MMIO_PATTERN64 ^ vp;
    register uint64_t q9 __asm__("r9") = q;
    register uint64_t q10 __asm__("r10") = q;

    __asm__ volatile("movb %b[q], %c[off](%[p])"
                     : : [q] "r"(q9), [p] "S"(slot), [off] "i"(VTL0_MMIO_STORE8_OFF) : "memory");
    __asm__ volatile("movb %h[q], %c[off](%[p])"
                     : : [q] "c"(q), [p] "S"(slot), [off] "i"(VTL0_MMIO_HI8_STORE_OFF) : "memory");
    __asm__ volatile("movw %[imm], %c[off](%[p])"
                     : : [imm] "i"(VTL0_MMIO_IMM16), [p] "S"(slot), [off] "i"(VTL0_MMIO_IMM16_OFF) : "memory");
    __asm__ volatile("movq %[imm], %c[off](%[p])"
                     : : [imm] "i"((int32_t)VTL0_MMIO_IMM32), [p] "S"(slot), [off] "i"(VTL0_MMIO_IMM64_OFF)
                     : "memory");
    __asm__ volatile("movq %[q], %c[off](%[base],%[index],8)"
                     : : [q] "r"(q10), [base] "D"(VTL0_MMIO_BASE),
                         [index] "d"((uint64_t)vp * (VTL0_MMIO_STRIDE / 8)), [off] "i"(VTL0_MMIO_STORE64_OFF)
                     : "memory");
}

/* Step 9: a synthetic MSR read. */
static __attribute__((noinline)) void step_rdmsr(volatile struct vtl0_result *r)
{
    r->msr_value = rdmsr(VTL0_TEST_MSR);
}

/* Step 9b: a hypercall VTL2 intercepts: HvCallPostMessage (slow call: RCX = the code, RDX =
 * the input's GPA, R8 = no output) to a connection no one opened; RAX = the status. */
static __attribute__((noinline)) void step_hypercall(volatile struct vtl0_result *r)
{
    volatile uint32_t *in = (volatile uint32_t *)r->post_message;
    uint64_t status;

    in[0] = VTL0_HYPERCALL_CONNECTION;  /* connection id */
    in[1] = 1;                          /* message type */
    in[2] = 0;                          /* payload size */
    in[3] = 0;
    register uint64_t out __asm__("r8") = 0;
    __asm__ volatile("vmcall"
                     : "=a"(status)
                     : "c"((uint64_t)VTL0_HYPERCALL_CODE), "d"((uint64_t)(uintptr_t)r->post_message), "r"(out)
                     : "memory");
    r->hypercall_status = status;
}

/* Step 10: the workload, ITER iterations: a 32-bit OUT of each iteration number
 * to the loop port, folded into the checksum (vtl0_guest.h); the record shows
 * the progress after every iteration. */
static __attribute__((noinline)) void step_loop(uint32_t iterations, volatile struct vtl0_result *r)
{
    uint64_t x = VTL0_CHECKSUM_BASIS;

    r->checksum = x;
    for (uint32_t i = 0; i < iterations; i++) {
        outl(VTL0_LOOP_PORT, i);
        x = (x ^ i) * VTL0_CHECKSUM_PRIME;
        r->checksum = x;
        r->iterations = i + 1;
    }
}

/* Step 12: "vp N done\n". */
static __attribute__((noinline)) void step_com1_done(uint32_t vp)
{
    com1_puts("vp ");
    com1_put_dec(vp);
    com1_puts(" done\n");
}

/* Step 13: tell the VM this VP has finished; it powers off once every VP has. */
static __attribute__((noinline)) void step_power_off(uint32_t vp)
{
    outl(VTL0_POWER_PORT, vp);
}

/* Called by vtl0_entry on every VP; returns into the hlt loop (step 14).
 * With a vTPM (flags & VTL0_FLAG_TPM), VP 0 does its measured boot after the hypercall,
 * before the workload (measured_boot.c); without one the flag test is all that changes.
 * The record is volatile so its stores happen in program order: done last,
 * before the goodbye on COM1 and the power-off write. */
void vtl0_main(uint32_t vp, uint32_t vp_count, uint64_t results_gpa, uint32_t iterations,
               uint32_t flags, uint64_t cmdline_gpa, uint64_t image_span)
{
    volatile struct vtl0_result *r =
        (volatile struct vtl0_result *)(results_gpa + (uint64_t)VTL0_RESULT_SIZE * vp);

    r->magic = VTL0_RESULT_MAGIC;
    r->vp_index = vp;
    step_com1_hello(vp);
    step_cpuid(r);
    step_port_out(vp);
    step_port_in(r);
    step_mmio_read(vp, r);
    step_mmio_write(vp);
    step_mmio_loads(vp, r);
    step_mmio_stores(vp);
    step_rdmsr(r);
    step_hypercall(r);
    if (vp == 0 && (flags & VTL0_FLAG_TPM))
        step_measured_boot(cmdline_gpa, image_span);
    step_loop(iterations, r);
    r->done = 1;                                /* step 11 */
    __asm__ volatile("" ::: "memory");          /* done is stored before the OUTs below */
    step_com1_done(vp);
    step_power_off(vp);
}
