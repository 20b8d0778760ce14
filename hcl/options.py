"""openvmm_hcl's options (underhill_core/src/options.rs; shared/design/openhcl-userspace.md 2.3):
the command line takes only --wait-for-start, --reformat-vmgs, --pid PATH and --vnc-port N;
everything else comes from the environment, OPENHCL_<NAME> first, then the legacy
UNDERHILL_<NAME>. Booleans: "1"/"true" true, "0"/"false" false, anything else false."""
from dataclasses import dataclass


class OptionsError(Exception):
    pass


def env_value(env, name: str, legacy: bool = True) -> str | None:
    value = env.get("OPENHCL_" + name)
    if value is None and legacy:
        value = env.get("UNDERHILL_" + name)
    return value


def env_bool(env, name: str, legacy: bool = True) -> bool:
    value = env_value(env, name, legacy)
    return value is not None and value.lower() in ("1", "true")


@dataclass
class Options:
    wait_for_start: bool = False
    reformat_vmgs: bool = False
    pid: str | None = None
    vnc_port: int = 3
    signal_vtl0_started: bool = False
    no_sidecar_hotplug: bool = False
    vtl0_starts_paused: bool = False
    halt_on_guest_halt: bool = False


def parse(args: list[str], env) -> Options:
    opts = Options(wait_for_start=env_bool(env, "WAIT_FOR_START"), reformat_vmgs=env_bool(env, "REFORMAT_VMGS"),
                   pid=env_value(env, "PID_FILE_PATH"), signal_vtl0_started=env_bool(env, "SIGNAL_VTL0_STARTED", False),
                   no_sidecar_hotplug=env_bool(env, "NO_SIDECAR_HOTPLUG"),
                   vtl0_starts_paused=env_bool(env, "VTL0_STARTS_PAUSED"),
                   halt_on_guest_halt=env_bool(env, "HALT_ON_GUEST_HALT"))
    port = env_value(env, "VNC_PORT")
    if port is not None:
        opts.vnc_port = _port(port)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if arg == "--wait-for-start":
            opts.wait_for_start = True
        elif arg == "--reformat-vmgs":
            opts.reformat_vmgs = True
        elif name in ("--pid", "--vnc-port"):
            if not eq:
                i += 1
                if i >= len(args):
                    raise OptionsError(f"{name} needs a value")
                inline = args[i]
            if name == "--pid":
                opts.pid = inline
            else:
                opts.vnc_port = _port(inline)
        else:
            raise OptionsError(f"Unrecognized argument: {arg}")
        i += 1
    return opts


def _port(text: str) -> int:
    try:
        port = int(text, 0)
    except ValueError:
        raise OptionsError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 0xFFFFFFFF:
        raise OptionsError(f"not a port number: {text!r}")
    return port
