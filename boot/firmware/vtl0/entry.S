/* VTL0 test guest entry.  Every VP starts here concurrently, in long mode on
 * the simulator's identity map and GDT, IF = 0:
 *   RDI = VP index, RSI = VP count, RDX = results page GPA,
 *   RCX = loop iterations (ITER), R8 = flags (VTL0_FLAG_TPM), R9 = command line GPA,
 *   R10 = the image's span, RSP = top of this VP's own 16 KiB stack (16-byte aligned).
 * The image has no relocations (link.ld asserts it), so there is nothing to
 * fix up and no VP has to wait for another. */
    .section .text.entry, "ax", @progbits
    .globl vtl0_entry
    .type vtl0_entry, @function
vtl0_entry:
    cld
    xor     %ebp, %ebp                  /* end of the frame chain for debuggers */
    /* RDI/RSI/RDX/RCX/R8/R9 are already vtl0_main's first six arguments; the span
     * is its seventh, on the stack.  The pad keeps RSP 16-aligned at the call. */
    sub     $8, %rsp
    push    %r10
    call    vtl0_main
    .globl vtl0_halt
vtl0_halt:                              /* step 14: park the VP for good */
    cli
1:  hlt
    jmp     1b
    .size vtl0_entry, . - vtl0_entry

    .section .note.GNU-stack, "", @progbits
