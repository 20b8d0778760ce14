/* VTL0 test guest: each step is one instruction that leaves VTL0 and must be
 * emulated by VTL2 (see docs/contracts.md, "VTL0 test guest").  Every step
 * has its own noinline function so it shows up as a symbol when stepping. */
#include "vtl0_guest.h"
#include "x86_insn.h"

void vtl0_main(uint32_t vp, uint32_t vp_count, uint64_t results_gpa);

/* Step 1 (VP 0): one OUT per character; the simulated UART never backs up,
 * so there is no LSR polling (that would add an IN intercept per character). */
static __attribute__((noinline)) void step_com1_hello(void)
{
    for (const char *s = "hello from VTL0 vp 0\n"; *s; s++)
        outb(VTL0_COM1_PORT, (uint8_t)*s);
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

/* Step 7: a synthetic MSR read. */
static __attribute__((noinline)) void step_rdmsr(volatile struct vtl0_result *r)
{
    r->msr_value = rdmsr(VTL0_TEST_MSR);
}

/* Called by vtl0_entry on every VP; returns into the hlt loop (step 9).
 * The record is volatile so its stores happen in program order: done last. */
void vtl0_main(uint32_t vp, uint32_t vp_count, uint64_t results_gpa)
{
    volatile struct vtl0_result *r =
        (volatile struct vtl0_result *)(results_gpa + (uint64_t)VTL0_RESULT_SIZE * vp);

    r->magic = VTL0_RESULT_MAGIC;
    r->vp_index = vp;
    if (vp == 0)
        step_com1_hello();
    step_cpuid(r);
    step_port_out(vp);
    step_port_in(r);
    step_mmio_read(vp, r);
    step_mmio_write(vp);
    step_rdmsr(r);
    r->done = 1;                                /* step 8 */
}
