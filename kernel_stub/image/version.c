/* The banner Linux prints first; loaders and tools find the kernel version by this string. */
#define UTS_RELEASE "6.6.0-hclsim-standin"

const char linux_banner[] __attribute__((used, aligned(16))) =
	"Linux version " UTS_RELEASE " (hclsim@hclsim) (gcc, GNU ld) #1 SMP PREEMPT_DYNAMIC hclsim\n";

/* Physical address of boot_params, saved by startup_64 (in .bss, like the real kernel's). */
unsigned long boot_params_ptr;
