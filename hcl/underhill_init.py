"""underhill_init, PID 1 of the paravisor (openhcl/underhill_init; shared/design/openhcl-userspace.md
section 1), in its order: logging to /dev/kmsg before any mount, the four mounts, the twelve
writes, host entropy, setup scripts, modules in the background, RLIMIT_NOFILE, then spawn
openvmm_hcl and reap every child until it exits, exiting with its status (255 if a signal
killed it). Any error: "fatal: ..." in kmsg and exit 1.

Linux re-parents every orphan to PID 1, which reaps them. hclsim's PID 1 is not the host's, so
it makes itself a child subreaper first (prctl PR_SET_CHILD_SUBREAPER): the VM's orphans are
re-parented to it, and its wait loop reaps them (and tells the kernel, EXITED).
"""
import os
import resource
import subprocess
import threading
import time

from hclsim.defs import kabi
from hclsim.hcl import klog, linux

CRATE = "underhill_init"
MOUNTS = (("proc", "/proc", "proc", kabi.MS_NOSUID | kabi.MS_NODEV | kabi.MS_NOEXEC | kabi.MS_RELATIME),
          ("sysfs", "/sys", "sysfs", kabi.MS_NOSUID | kabi.MS_NODEV | kabi.MS_NOEXEC | kabi.MS_RELATIME),
          ("dev", "/dev", "devtmpfs", kabi.MS_NOSUID | kabi.MS_NOEXEC | kabi.MS_RELATIME),
          ("devpts", "/dev/pts", "devpts", kabi.MS_NOSUID | kabi.MS_NOEXEC | kabi.MS_RELATIME))
UIO_NEW_ID = "/sys/bus/vmbus/drivers/uio_hv_generic/new_id"
GET_GUID = "8dedd1aa-9056-49e4-bfd6-1bf90dc38ef0"
UART_GUID = "8b60ccf6-709f-4c11-90b5-229c959a9e6a"
CRASHDUMP_GUID = "427b03e7-4ceb-4286-b5fc-486f4a1dd439"
ENTROPY_PATH = "/proc/device-tree/openhcl/entropy/reg"
MAX_ENTROPY = 256
NOFILE = 0x100000
CONTROL = "/bin/openvmm_hcl"
PID_FILE = "/run/underhill.pid"
PR_SET_CHILD_SUBREAPER = 36


class InitError(Exception):
    pass


def parse_options(args: list[str]) -> tuple[list[str], list[str]]:
    """(setup scripts, the arguments passed through to openvmm_hcl): leading --setup-script
    options; parsing stops at the first other word or unknown --name; a bare -- is consumed."""
    scripts, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg == "--setup-script":
            if i + 1 >= len(args):
                raise InitError("--setup-script needs a command")
            scripts.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--setup-script="):
            scripts.append(arg.split("=", 1)[1])
            i += 1
            continue
        break
    return scripts, args[i:]


def _env_on(env, name: str) -> bool:
    """underhill_confidentiality's rule: OPENHCL_<name> (else UNDERHILL_<name>) non-empty, not "0"."""
    return env.get("OPENHCL_" + name, env.get("UNDERHILL_" + name, "")) not in ("", "0")


def confidential(env) -> bool:
    return _env_on(env, "CONFIDENTIAL")


def confidential_filtering(env) -> bool:
    return _env_on(env, "CONFIDENTIAL") and not _env_on(env, "CONFIDENTIAL_DEBUG")


def init_logging() -> klog.Logger:
    """stdin and stdout on /dev/null, stderr on /dev/ttyprintk (panic output), log to kmsg."""
    null = linux.open_file("/dev/null", kabi.O_RDWR)
    os.dup2(null.fileno(), 0)
    os.dup2(null.fileno(), 1)
    null.close()
    log = klog.Logger(klog.INIT_FACILITY, CRATE)
    try:
        tty = linux.open_file("/dev/ttyprintk", kabi.O_WRONLY)
    except OSError as exc:
        log.error(f"failed to open /dev/ttyprintk: {exc.strerror}")
        raise InitError("cannot open /dev/ttyprintk") from None
    os.dup2(tty.fileno(), 2)
    tty.close()
    return log


def setup(log: klog.Logger, env) -> None:
    for source, target, fstype, flags in MOUNTS:
        linux.mkdir_all(target, 0o755)
        try:
            linux.mount(source, target, fstype, flags)
        except OSError as exc:
            raise InitError(f"failed to mount {source} on {target}: {exc.strerror}") from None
    log.info(f"mounted {', '.join(m[1] for m in MOUNTS)}")
    writes = [("/proc/sys/kernel/threads-max", "32768"), ("/proc/sys/kernel/kptr_restrict", "1"),
              ("/sys/kernel/mm/transparent_hugepage/enabled", "madvise"),
              (UIO_NEW_ID, GET_GUID), (UIO_NEW_ID, UART_GUID), (UIO_NEW_ID, CRASHDUMP_GUID),
              ("/proc/sys/kernel/core_pattern", "" if confidential_filtering(env) else "|/bin/underhill-crash %p %i %s %e"),
              ("/proc/sys/kernel/core_pipe_limit", "1"), ("/proc/sys/vm/panic_on_oom", "1"),
              ("/proc/sys/vm/min_free_kbytes", "1024"), ("/proc/sys/vm/watermark_scale_factor", "1"),
              ("/proc/sys/vm/watermark_boost_factor", "0")]
    for path, value in writes:
        try:
            linux.write_file(path, value)
        except OSError as exc:
            raise InitError(f"failed to write {value!r} to {path}: {exc.strerror}") from None
    feed_entropy(log, env)


def feed_entropy(log: klog.Logger, env) -> None:
    try:
        data = linux.read_file(ENTROPY_PATH)
    except OSError as exc:
        log.warn(f"no host entropy ({ENTROPY_PATH}: {exc.strerror})")
        return
    if len(data) > MAX_ENTROPY:
        log.warn(f"Truncating host entropy from {len(data)} to {MAX_ENTROPY} bytes")
        data = data[:MAX_ENTROPY]
    with linux.open_file("/dev/random", kabi.O_WRONLY) as rnd:
        if confidential(env):
            rnd.write(data)                       # a CVM does not trust the host's entropy
            log.info(f"mixed {len(data)} bytes of host entropy in (not credited: confidential VM)")
        else:
            rnd.ioctl(kabi.RNDADDENTROPY, kabi.RND_POOL_INFO.pack(len(data) * 8, len(data)) + data)
            log.info(f"added {len(data)} bytes of host entropy")


def run_setup_scripts(log: klog.Logger, scripts: list[str], env: dict) -> list[tuple[str, str]]:
    """Each script runs as `sh -c CMD`; every stdout line with '=' becomes KEY=VALUE."""
    new_env = []
    for cmd in scripts:
        log.info(f"running setup script {cmd!r}")
        proc = subprocess.run(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE, env=env, cwd=linux.root_dir())
        if proc.returncode != 0:
            raise InitError(f"setup script failed: {cmd!r} exited with status {proc.returncode}")
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                log.info(f"setting env var {key}={value}")
                new_env.append((key, value))
    return new_env


def module_params(cmdline: str) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for word in cmdline.split():
        name, sep, _ = word.partition("=")
        if sep and "." in name:
            module, key = name.split(".", 1)
            params.setdefault(module.replace("-", "_"), []).append(f"{key}={word.split('=', 1)[1]}")
    return params


def load_modules(log: klog.Logger, failed: list) -> None:
    """finit_module() every file under /lib/modules, sorted by name, then remove the folder."""
    try:
        params = module_params(linux.read_file("/proc/cmdline").decode("utf-8", "replace"))
        files = []
        for sub in linux.listdir("/lib/modules"):
            for name in linux.listdir(f"/lib/modules/{sub}"):
                files.append(f"/lib/modules/{sub}/{name}")
        for path in sorted(files):
            name = os.path.basename(path).removesuffix(".ko").replace("-", "_")
            start = time.monotonic()
            linux.finit_module(path, " ".join(params.get(name, [])))
            log.info(f"loaded module {name} in {(time.monotonic() - start) * 1e3:.1f} ms")
        import shutil
        shutil.rmtree(os.path.join(linux.root_dir(), "lib", "modules"))
    except OSError as exc:
        log.error(f"module load failed: {exc.strerror} ({exc.filename or ''})")
        failed.append(exc)
        os.kill(os.getpid(), 9)          # a module failing to load kills PID 1 (the real one panics)


def run(log: klog.Logger, args: list[str], env: dict) -> int:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.warn(f"RLIMIT_NOFILE {NOFILE:#x} is beyond this host's hard limit; using {hard}")
    argv = [CONTROL, "--pid", PID_FILE, *args]
    log.info(f"running {' '.join(argv)}")
    child = linux.spawn(CONTROL, argv, env)
    while True:
        pid, status = os.wait()
        linux.exited(pid, status)
        if pid != child:
            continue
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
            if code == 0:
                log.info("child exited successfully")
            else:
                log.error(f"child terminated unsuccessfully: exit status {code}")
            return code
        log.error(f"child terminated unsuccessfully: killed by signal {os.WTERMSIG(status)}")
        return 255


def become_subreaper() -> int:
    """What being PID 1 gives the real init: the orphans of the system are re-parented to it.
    0, or the errno of the prctl."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 else ctypes.get_errno()


def main(argv: list[str]) -> int:
    boot_time = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    linux.start_process("underhill-init", argv)
    subreaper_error = become_subreaper()
    log = None
    try:
        log = init_logging()
        if subreaper_error:
            log.warn(f"cannot reap orphans: PR_SET_CHILD_SUBREAPER: {os.strerror(subreaper_error)}")
        log.info(f"Initial process: crate_name={CRATE}, crate_revision=hclsim, crate_branch=main")
        scripts, passthrough = parse_options(argv[1:])
        env = dict(os.environ)
        setup(log, env)
        new_env = run_setup_scripts(log, scripts, env)
        new_env.append(("KERNEL_BOOT_TIME", str(boot_time)))
        if env.get("OPENHCL_NVME_VFIO") in ("true", "1"):
            linux.write_file("/sys/bus/pci/drivers/vfio-pci/new_id", "ffffffff ffffffff ffffffff ffffffff 010802 ffffff")
        failed: list = []
        modules = threading.Thread(target=load_modules, args=(log, failed), name="modules")
        modules.start()
        if env.get("OPENHCL_WAIT_FOR_MODULES") == "1":
            modules.join()
        child_env = dict(env)
        child_env.update(new_env)
        return run(log, passthrough, child_env)
    except (InitError, OSError) as exc:
        if log is not None:
            log.error(f"fatal: {exc}")
        return 1
