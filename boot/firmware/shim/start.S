/* Boot shim entry, hypercall trampoline, kernel handoff and the hypercall
 * page.  Entered in long mode with paging on (identity map) and the loader's
 * GDT; RSI = offset of ShimParamsRaw from the shim base; RSP is not valid. */

#define STACK_COOKIE    0x30405060
#define STACK_SIZE      (32 * 1024)
#define R_X86_64_RELATIVE 8
#define CR4_OSFXSR      (1 << 9)
#define CR4_OSXMMEXCPT  (1 << 10)

    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    cld
    mov     %rsi, %r15                  /* params offset, kept across the setup */

    /* Zero BSS with rep stosq: needs no stack, which itself lives in BSS.
     * BSS is page aligned at both ends (link.ld), so quadwords cover it. */
    lea     __bss_start(%rip), %rdi
    lea     __bss_end(%rip), %rcx
    sub     %rdi, %rcx
    shr     $3, %rcx
    xor     %eax, %eax
    rep stosq

    lea     shim_stack_top(%rip), %rsp
    movq    $STACK_COOKIE, shim_stack_bottom(%rip)

    /* SSE instructions may appear in later code (e.g. the kernel); enable
     * FXSAVE/SSE support as the real shim does. */
    mov     %cr4, %rax
    or      $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov     %rax, %cr4

    /* Self-relocate: the image is linked at 0, so the runtime base is the
     * displacement for every R_X86_64_RELATIVE entry. */
    lea     __image_base(%rip), %rbx
    lea     __rela_start(%rip), %rsi
    lea     __rela_end(%rip), %rdi
1:  cmp     %rdi, %rsi
    jae     3f
    mov     8(%rsi), %eax               /* low half of r_info = type */
    cmp     $R_X86_64_RELATIVE, %eax
    jne     2f
    mov     (%rsi), %rcx                /* r_offset */
    mov     16(%rsi), %rdx              /* r_addend */
    add     %rbx, %rdx
    mov     %rdx, (%rbx,%rcx)
2:  add     $24, %rsi
    jmp     1b
3:
    /* Any other relocation type would be a build bug; shim_main checks
     * the count it was given. */
    lea     (%rbx,%r15), %rdi           /* ShimParamsRaw pointer */
    mov     %rbx, %rsi                  /* shim base */
    xor     %ebp, %ebp
    call    shim_main
4:  cli
    hlt
    jmp     4b
    .size _start, . - _start

/* uint64_t hv_hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa)
 * Hyper-V x64 ABI: RCX control, RDX input GPA, R8 output GPA, RAX status. */
    .text
    .globl hv_hypercall
    .type hv_hypercall, @function
hv_hypercall:
    mov     %rdi, %rcx
    mov     %rdx, %r8
    mov     %rsi, %rdx
    call    hypercall_page
    ret
    .size hv_hypercall, . - hv_hypercall

/* void enter_kernel(uint64_t entry, uint64_t boot_params)
 * Linux x86_64 64-bit boot: RSI = boot_params; RDI = 0; other GPRs cleared
 * so nothing of ours leaks into the kernel's view. */
    .globl enter_kernel
    .type enter_kernel, @function
enter_kernel:
    cli
    mov     %rdi, %rax
    and     $-16, %rsp
    pushq   $0                          /* as if called: RSP+8 is 16-aligned */
    xor     %edi, %edi
    xor     %ebx, %ebx
    xor     %ecx, %ecx
    xor     %edx, %edx
    xor     %ebp, %ebp
    xor     %r8d, %r8d
    xor     %r9d, %r9d
    xor     %r10d, %r10d
    xor     %r11d, %r11d
    xor     %r12d, %r12d
    xor     %r13d, %r13d
    xor     %r14d, %r14d
    xor     %r15d, %r15d
    jmp     *%rax
    .size enter_kernel, . - enter_kernel

/* Placeholder until the hypervisor overlays the page: ud2 makes an early
 * call fault loudly instead of running garbage. */
    .section .hcpage, "ax", @progbits
    .balign 4096
    ud2
    .fill   4094, 1, 0xcc

    .section .bss.stack, "aw", @nobits
    .balign 4096
    .globl shim_stack_bottom, shim_stack_top
shim_stack_bottom:
    .skip   STACK_SIZE
shim_stack_top:

    .section .note.GNU-stack, "", @progbits
