/* What MODULE_LICENSE() and friends, and modpost's .mod.c, leave in a .ko: NUL-terminated
 * "tag=value" strings packed in .modinfo (modinfo(8) and the module loader read them).
 * KBUILD_MODNAME comes from the command line, as kbuild passes it. */
#define __MODINFO_CAT2(a, b) a##b
#define __MODINFO_CAT(a, b) __MODINFO_CAT2(a, b)
#define MODINFO(tag, value)                                                           \
	static const char __MODINFO_CAT(__modinfo_, __COUNTER__)[]                    \
		__attribute__((section(".modinfo"), used, aligned(1))) = tag "=" value

#define MODULE_LICENSE(x) MODINFO("license", x)
#define MODULE_DESCRIPTION(x) MODINFO("description", x)
#define MODULE_PARM_DESC(p, d) MODINFO("parm", #p ":" d)
#define MODULE_PARM_TYPE(p, t) MODINFO("parmtype", #p ":" t)
/* modpost's part: dependencies, name and the kernel it was built for (the stand-in's). */
#define MODULE_MODPOST(deps)                                                         \
	MODINFO("depends", deps);                                                     \
	MODINFO("name", KBUILD_MODNAME);                                              \
	MODINFO("vermagic", "6.6.0-hclsim-standin SMP preempt mod_unload ")

/* Entry points the loader calls; the stand-in's modules have nothing to set up. */
#define MODULE_STUB_INIT                                                              \
	int init_module(void) { return 0; }                                           \
	void cleanup_module(void) {}
