/* /init's entry point.  The kernel starts PID 1 with rsp at argc (argv, envp and the
 * auxiliary vector above it), 16-byte aligned, every other register zero.  init_main() gets
 * that stack pointer and never returns; should it, ud2 kills PID 1 loudly rather than
 * running off into whatever follows. */
    .section .text.entry, "ax"
    .globl _start
    .type _start, @function
_start:
    xor     %ebp, %ebp
    mov     %rsp, %rdi
    and     $-16, %rsp
    call    init_main
    ud2
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
