/*
 * hclsim stand-in kernel: the 64-bit entry of a vmlinux, as the boot shim jumps to it
 * (x86 boot protocol: long mode, identity map, RSI = &boot_params, RDI = 0).
 *
 * The simulator's Python kernel stand-in takes over when RIP reaches this entry, so the code only
 * has to be a real, plausible entry: keep boot_params like Linux does, then halt forever.
 * Everything is RIP-relative: the image runs at its load address, not at its link address.
 */
	.section .head.text, "ax"
	.code64
	.globl startup_64
	.type startup_64, @function
startup_64:
	cli
	movq	%rsi, boot_params_ptr(%rip)	/* Linux copies the zero page from here */
	leaq	linux_banner(%rip), %rax	/* keep the banner referenced (gc-sections) */
1:	hlt
	jmp	1b
	.size startup_64, . - startup_64

	.section .note.GNU-stack, "", @progbits
