/* Sidecar kernel entry points: the BSP's sidecar_entry (called by the boot
 * shim), the AP entry, the interrupt handlers, the hypercall trampoline and
 * the VTL-return path. */

#define R_X86_64_RELATIVE 8
#define SIDECAR_IMAGE_VA  0xffffff8000000000
#define X2APIC_MSR_EOI    0x80b

/* bool sidecar_entry(const struct sidecar_params *p, struct sidecar_output *o)
 * SysV call from the shim, in the shim's identity map, on its stack and GDT.
 * Zeroes BSS, relocates the image for SIDECAR_IMAGE_VA, switches to the
 * sidecar's page tables (identity map + image at the high alias), runs
 * sidecar_main at the high alias, then comes back to the identity alias and
 * restores the shim's CR3. */
    .section .text.entry, "ax", @progbits
    .globl sidecar_entry
    .type sidecar_entry, @function
sidecar_entry:
    push    %rbp
    push    %rbx
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    sub     $8, %rsp                    /* 16-byte aligned for the calls */
    cld
    mov     %rdi, %r14                  /* params */
    mov     %rsi, %r15                  /* output */
    mov     %cr3, %r12                  /* the shim's page tables */
    lea     __image_base(%rip), %rbx    /* image GPA (identity alias) */
    movabs  $SIDECAR_IMAGE_VA, %r13

    /* Zero BSS: plain quadword stores (string instructions are slow in the
     * simulator); BSS is page aligned at both ends. */
    lea     __bss_start(%rip), %rdi
    lea     __bss_end(%rip), %rcx
    xor     %eax, %eax
1:  cmp     %rcx, %rdi
    jae     2f
    mov     %rax, 0(%rdi)
    mov     %rax, 8(%rdi)
    mov     %rax, 16(%rdi)
    mov     %rax, 24(%rdi)
    mov     %rax, 32(%rdi)
    mov     %rax, 40(%rdi)
    mov     %rax, 48(%rdi)
    mov     %rax, 56(%rdi)
    add     $64, %rdi
    jmp     1b
2:
    /* Relocate for the high alias: *(base + off) = IMAGE_VA + addend.  Only
     * R_X86_64_RELATIVE exists (checked at build time); the result does not
     * depend on the old contents, so a second call would be harmless. */
    lea     __rela_start(%rip), %rsi
    lea     __rela_end(%rip), %rdi
3:  cmp     %rdi, %rsi
    jae     5f
    mov     8(%rsi), %eax
    cmp     $R_X86_64_RELATIVE, %eax
    jne     4f
    mov     (%rsi), %rcx
    mov     16(%rsi), %rdx
    add     %r13, %rdx
    mov     %rdx, (%rbx,%rcx)
4:  add     $24, %rsi
    jmp     3b
5:
    /* Page tables (identity part + image at IMAGE_VA); still identity here. */
    mov     %rbx, %rdi
    call    build_bsp_page_tables
    mov     %rax, %cr3

    /* Continue at the high alias. */
    lea     6f(%rip), %rax
    sub     %rbx, %rax
    add     %r13, %rax
    jmp     *%rax
6:  mov     %r14, %rdi
    mov     %r15, %rsi
    call    sidecar_main
    movzbl  %al, %r14d

    /* Back to the identity alias, then to the shim's page tables. */
    lea     7f(%rip), %rax
    sub     %r13, %rax
    add     %rbx, %rax
    jmp     *%rax
7:  mov     %r12, %cr3
    mov     %r14d, %eax
    add     $8, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbx
    pop     %rbp
    ret
    .size sidecar_entry, . - sidecar_entry

/* AP entry (StartVirtualProcessor context RIP), at the high alias with the
 * AP's own CR3; RSP = AP_INITIAL_RSP in its private stack pages. */
    .text
    .globl ap_entry
    .type ap_entry, @function
ap_entry:
    and     $-16, %rsp
    xor     %ebp, %ebp
    cld
    call    ap_main
1:  cli
    hlt
    jmp     1b
    .size ap_entry, . - ap_entry

/* Request vector (0x20): the IPI only wakes the dispatch loop; EOI and go. */
    .globl irq_entry
    .type irq_entry, @function
irq_entry:
    push    %rax
    push    %rcx
    push    %rdx
    mov     $X2APIC_MSR_EOI, %ecx
    xor     %eax, %eax
    xor     %edx, %edx
    wrmsr
    pop     %rdx
    pop     %rcx
    pop     %rax
    iretq
    .size irq_entry, . - irq_entry

/* Every other vector: should never be delivered. */
    .globl unexpected_entry
    .type unexpected_entry, @function
unexpected_entry:
    and     $-16, %rsp
    call    unexpected_interrupt
1:  cli
    hlt
    jmp     1b
    .size unexpected_entry, . - unexpected_entry

/* uint64_t hv_call(uint64_t control, uint64_t in_gpa, uint64_t out_gpa)
 * Through the image's copy of the hypercall page: RCX control, RDX input,
 * R8 output, RAX status. */
    .globl hv_call
    .type hv_call, @function
hv_call:
    mov     %rdi, %rcx
    mov     %rdx, %r8
    mov     %rsi, %rdx
    call    hypercall_page_copy
    ret
    .size hv_call, . - hv_call

/* void vtl_return(struct sidecar_cpu_context *ctx, uint64_t stub)
 * Loads VTL0's shared state from ctx (gps rax rcx rdx rbx cr2 rbp rsi rdi
 * r8..r15 at 0x00..0x78, fxsave area at 0x80; RAX/RCX are loaded by the
 * hypervisor from the assist page), calls the hypercall page's VTL-return
 * entry with RCX = 0 (not fast), and, once VTL2 is entered again at the
 * stub's ret, stores the shared state back into ctx.  RSP, RFLAGS and the
 * segments are VTL2-private, so the stack is intact on return. */
    .globl vtl_return
    .type vtl_return, @function
vtl_return:
    push    %rbx
    push    %rbp
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    push    %rdi                        /* ctx, at 8(%rsp) below */
    push    %rsi                        /* stub, at 0(%rsp) */
    fxrstor 0x80(%rdi)
    mov     0x20(%rdi), %rax
    mov     %rax, %cr2
    mov     0x10(%rdi), %rdx
    mov     0x18(%rdi), %rbx
    mov     0x28(%rdi), %rbp
    mov     0x30(%rdi), %rsi
    mov     0x40(%rdi), %r8
    mov     0x48(%rdi), %r9
    mov     0x50(%rdi), %r10
    mov     0x58(%rdi), %r11
    mov     0x60(%rdi), %r12
    mov     0x68(%rdi), %r13
    mov     0x70(%rdi), %r14
    mov     0x78(%rdi), %r15
    mov     0x38(%rdi), %rdi
    xor     %ecx, %ecx
    call    *(%rsp)
    /* VTL2 again: every GPR but RSP holds VTL0's value. */
    push    %rax
    mov     16(%rsp), %rax              /* ctx */
    mov     %rcx, 0x08(%rax)
    mov     %rdx, 0x10(%rax)
    mov     %rbx, 0x18(%rax)
    mov     %rbp, 0x28(%rax)
    mov     %rsi, 0x30(%rax)
    mov     %rdi, 0x38(%rax)
    mov     %r8, 0x40(%rax)
    mov     %r9, 0x48(%rax)
    mov     %r10, 0x50(%rax)
    mov     %r11, 0x58(%rax)
    mov     %r12, 0x60(%rax)
    mov     %r13, 0x68(%rax)
    mov     %r14, 0x70(%rax)
    mov     %r15, 0x78(%rax)
    mov     %cr2, %rcx
    mov     %rcx, 0x20(%rax)
    pop     %rcx                        /* VTL0 RAX */
    mov     %rcx, 0x00(%rax)
    fxsave  0x80(%rax)
    add     $16, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbp
    pop     %rbx
    ret
    .size vtl_return, . - vtl_return

/* The image's copy of the hypercall page (filled by sidecar_main). */
    .section .hcpage, "ax", @progbits
    .balign 4096
    .globl hypercall_page_copy
hypercall_page_copy:
    ud2
    .fill   4094, 1, 0xcc

    .section .note.GNU-stack, "", @progbits
