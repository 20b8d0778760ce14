"""The one program of the rootfs, dispatched on the name it was run by, as
openhcl/underhill_entry does: underhill-init, underhill-crash, underhill-dump, hclsim's profiler
binary (underhill_profiler_binary), else openvmm_hcl."""
import os


def main(argv: list[str]) -> int:
    from hclsim.hcl import linux
    name = os.path.basename(argv[0])
    if name == "underhill-init":
        from hclsim.hcl import underhill_init
        return underhill_init.main(argv)
    if name == "underhill_profiler_binary":
        from hclsim.hcl import profiler
        return profiler.main(argv)
    if name in ("underhill-crash", "underhill-dump"):
        from hclsim.hcl import klog
        linux.start_process(name, argv)
        klog.Logger(3, name).error(f"{name} is not part of this simulation yet")
        return 1
    from hclsim.hcl import control
    return control.main(argv)
