"""What Linux does with the words of its command line that are not its own (init/main.c): a
word with a '.' in its name is a module parameter; a known kernel parameter is consumed; any
other NAME=VALUE goes into init's environment and any other word into init's argv, as do the
words after "--". `rdinit=` names the init program (default /init)."""
from dataclasses import dataclass, field

from hclsim.kernel_stub.handoff import kernel_params

# Kernel parameters the stand-in knows (so they are not handed to init): those the boot shim
# writes, and the common ones a host may add.
KNOWN_PARAMS = frozenset("""
    acpi apic boot_cpus clearcpuid console console_msg_format coredump_filter crashkernel debug
    earlycon earlyprintk hugepages idle ignore_loglevel init initcall_blacklist initrd iommu
    isolcpus lpj log_buf_len loglevel maxcpus mem memmap mitigations nmi_watchdog no_timer_check
    noapic nokaslr nosmp noxsave nr_cpus oops panic panic_on_warn panic_print pci print_fatal_signals
    quiet rcupdate rdinit reboot ro root rootfstype rw swiotlb tsc unknown_nmi_panic vdso
""".split())
DEFAULT_INIT_ENV = {"HOME": "/", "TERM": "linux"}     # Linux's envp_init


@dataclass
class InitArgs:
    rdinit: str = "/init"
    argv: list = field(default_factory=list)           # after argv[0]
    env: dict = field(default_factory=dict)
    unknown: list = field(default_factory=list)        # what Linux logs as passed to user space
    panic_timeout: int = 0                             # panic=: <0 reboots at once, 0 waits forever


def init_args(cmdline: bytes) -> InitArgs:
    params, after = kernel_params(cmdline)
    out = InitArgs(env=dict(DEFAULT_INIT_ENV))
    for p in params:
        name = p.name.decode("ascii", "replace") if isinstance(p.name, bytes) else str(p.name)
        value = None if p.value is None else p.value.decode("utf-8", "surrogateescape")
        key = name.replace("-", "_")
        if key == "rdinit" and value:
            out.rdinit = value
        elif key == "panic" and value is not None:
            try:
                out.panic_timeout = int(value, 0)
            except ValueError:
                pass
        if "." in name or key in KNOWN_PARAMS:
            continue
        out.unknown.append(name if value is None else f"{name}={value}")
        if value is None:
            out.argv.append(name)
        else:
            out.env[name] = value
    if after is not None:       # set_init_arg: every word after "--" goes to init, as next_arg splits it
        for p in kernel_params(after)[0]:
            word = p.name if p.value is None else p.name + b"=" + p.value
            out.argv.append(word.decode("utf-8", "surrogateescape"))
    return out
