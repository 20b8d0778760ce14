"""The profiler (openhcl/profiler_worker; shared/design/openhcl-userspace.md section 5).

ProfilerWorker runs in the "profiler" mesh host (underhill-profiler, started on the first
Profile and kept for later ones). It refuses when MemFree is under 10 MB, appends
LimitMB:<75% of MemFree>, and starts the profiler binary
`/usr/bin/underhill_profiler_binary <duration> <socket fd> <args...> LimitMB:N` with the data
connection inherited; it waits duration + 1 s, then looks every second, 15 times, and kills it
at the 15th (the run fails then). The binary's stdout is logged at info, its stderr at error.

The real binary is Microsoft-internal; hclsim's (main() below) samples every VP's guest RIP from
the kernel (/proc/hclsim/vp_samples: symbolized with the shim, sidecar and VTL0 images) and the
paravisor processes' Python stacks (SIGPROF, /proc/hclsim/stacks), and writes a profile a
standard viewer opens into the socket: speedscope JSON (the default), or collapsed stacks
(profiler_args "format=collapsed") for flamegraph.pl. "hz=N" sets the VP sampling rate.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time

from hclsim.hcl import linux
from hclsim.hcl import mesh_pb2 as pb

BINARY = "/usr/bin/underhill_profiler_binary"
MIN_FREE_MB = 10
LIMIT_PERCENT = 75
POLLS = 15
SOCKET_FD = 3                    # where the binary finds the data connection
VP_HZ = 200
STACK_HZ = 10
SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def limit_arg(free: int) -> str:
    """The LimitMB argument for free MB of memory; RuntimeError under the 10 MB floor."""
    if free < MIN_FREE_MB:
        raise RuntimeError(f"Not enough memory: {free} MB free, {MIN_FREE_MB} MB needed")
    return f"LimitMB:{free * LIMIT_PERCENT // 100}"


def free_mb() -> int:
    for line in linux.read_file("/proc/meminfo").decode().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) // 1024
    raise OSError("no MemFree in /proc/meminfo")


class ProfilerWorker:
    """One Profile request: params are a ProfilerParams; the data connection came with it."""
    ends_host = False                 # the host stays for the next request

    def __init__(self, params: bytes, channel, log, fds=()):
        self.params = pb.ProfilerParams.FromString(params)
        self.channel, self.log = channel, log
        self.sock_fd = fds[0] if fds else None
        self.proc = None

    def run(self) -> None:
        if self.sock_fd is None:
            raise RuntimeError("no data connection came with the request")
        try:
            limit = limit_arg(free_mb())
            duration = self.params.duration
            argv = [BINARY, str(duration), str(SOCKET_FD), *self.params.profiler_args, limit]
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                pid = linux.spawn(BINARY, argv, dict(os.environ), stdio=(None, out_w, err_w),
                                  fds={SOCKET_FD: self.sock_fd})
            finally:
                os.close(out_w)
                os.close(err_w)
            readers = [threading.Thread(target=self._log_lines, args=(out_r, self.log.info), daemon=True),
                       threading.Thread(target=self._log_lines, args=(err_r, self.log.error), daemon=True)]
            for r in readers:
                r.start()
            status = self._wait(pid, duration)
            for r in readers:
                r.join(2)
        finally:
            os.close(self.sock_fd)
        if status is None:
            raise RuntimeError(f"the profiler did not exit within {duration + 1 + POLLS} s and was killed")
        if linux.wait_status_code(status):
            raise RuntimeError(f"the profiler failed (exit status {linux.wait_status_code(status)})")

    @staticmethod
    def _wait(pid: int, duration: int):
        """duration + 1 s, then a look every second, POLLS times; the wait status, or None when it
        had to be killed."""
        time.sleep(duration + 1)
        for i in range(POLLS):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                linux.exited(pid, status)
                return status
            if i == POLLS - 1:
                os.kill(pid, signal.SIGKILL)
                _pid, status = os.waitpid(pid, 0)
                linux.exited(pid, status)
                return None
            time.sleep(1)
        return None

    @staticmethod
    def _log_lines(fd: int, log) -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                log(f"profiler: {line.decode('utf-8', 'replace').rstrip()}")

    def stop(self) -> None:
        pass


# ---- the profiler binary ---------------------------------------------------------------------
def main(argv: list[str]) -> int:
    linux.start_process("underhill_profiler_binary", argv)
    try:
        duration, fd = float(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        print("usage: underhill_profiler_binary DURATION FD [format=speedscope|collapsed] [hz=N] [LimitMB:N]",
              file=__import__("sys").stderr)
        return 2
    opts = dict(a.split("=", 1) for a in argv[3:] if "=" in a)
    fmt = opts.get("format", "speedscope")
    hz = max(1, min(1000, int(opts.get("hz", VP_HZ))))
    vp_counts, proc_counts, started = sample(duration, hz)
    sock = socket.socket(fileno=fd)
    try:
        if fmt == "collapsed":
            data = collapsed(vp_counts, proc_counts).encode()
        else:
            data = json.dumps(speedscope(vp_counts, proc_counts, started, duration)).encode()
        sock.sendall(data)
    finally:
        sock.close()
    print(f"{sum(sum(c.values()) for c in vp_counts.values())} VP samples and "
          f"{sum(sum(c.values()) for c in proc_counts.values())} process samples in {duration:g} s, "
          f"{len(data)} bytes of {fmt}")
    return 0


def _vp_sample(counts: dict) -> None:
    for line in linux.read_file("/proc/hclsim/vp_samples").decode().splitlines():
        parts = line.split()
        if len(parts) >= 5:
            vp, where, vtl, _rip, func = parts[:5]
            key = (f"vp{vp}", where, f"vtl{vtl}", *func.split(":", 1))
            counts.setdefault(f"vp {vp}", {}).setdefault(key, 0)
            counts[f"vp {vp}"][key] += 1


def _registered() -> list[tuple[int, str]]:
    out = []
    for block in linux.read_file("/proc/hclsim/stacks").decode().split("\n\n"):
        head = block.split("\n", 1)[0].split()
        if len(head) >= 2 and head[0].isdigit():
            out.append((int(head[0]), head[1]))
    return out


def _stack_sample(counts: dict, me: int) -> None:
    procs = [(pid, comm) for pid, comm in _registered() if pid != me]
    for pid, _comm in procs:
        try:
            os.kill(pid, signal.SIGPROF)
        except OSError:
            pass
    time.sleep(0.02)                                 # they answer at their next bytecode
    for block in linux.read_file("/proc/hclsim/stacks").decode().split("\n\n"):
        lines = block.strip("\n").split("\n")
        head = lines[0].split()
        if len(head) < 3 or not head[0].isdigit() or int(head[0]) == me or head[2] == "-" or int(head[2]) > 100:
            continue
        name = f"{head[1]} ({head[0]})"
        for stack in lines[1:]:
            if stack:
                key = tuple(stack.split(";"))
                counts.setdefault(name, {}).setdefault(key, 0)
                counts[name][key] += 1


def sample(duration: float, hz: int):
    vp_counts: dict = {}
    proc_counts: dict = {}
    started = time.time()
    end = time.monotonic() + duration
    next_stack = time.monotonic()
    me = os.getpid()
    period = 1.0 / hz
    while time.monotonic() < end:
        t = time.monotonic()
        _vp_sample(vp_counts)
        if t >= next_stack:
            _stack_sample(proc_counts, me)
            next_stack = t + 1.0 / STACK_HZ
        time.sleep(max(0.0, period - (time.monotonic() - t)))
    return vp_counts, proc_counts, started


def collapsed(vp_counts: dict, proc_counts: dict) -> str:
    """Brendan Gregg's folded format: 'frame;frame;frame count' per line."""
    lines = []
    for counts in (vp_counts, proc_counts):
        for name, stacks in sorted(counts.items()):
            for key, n in sorted(stacks.items()):
                lines.append(";".join((name.replace(" ", "_"),) + tuple(k.replace(" ", "_") for k in key[1:]))
                             + f" {n}")
    return "\n".join(lines) + "\n"


def speedscope(vp_counts: dict, proc_counts: dict, started: float, duration: float) -> dict:
    """speedscope's file format: shared frames, a "sampled" profile per VP and per process."""
    frames, index = [], {}

    def frame(name: str) -> int:
        if name not in index:
            index[name] = len(frames)
            frames.append({"name": name})
        return index[name]
    profiles = []
    for counts in (vp_counts, proc_counts):
        for name, stacks in sorted(counts.items()):
            samples, weights = [], []
            for key, n in sorted(stacks.items()):
                samples.append([frame(k) for k in key[1:]])
                weights.append(n)
            profiles.append({"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                             "endValue": sum(weights), "samples": samples, "weights": weights})
    return {"$schema": SPEEDSCOPE_SCHEMA, "shared": {"frames": frames}, "profiles": profiles,
            "name": f"hclsim profile, {duration:g} s from {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(started))}",
            "activeProfileIndex": 0, "exporter": "hclsim"}
