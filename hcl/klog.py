"""Logging to /dev/kmsg the way the paravisor's processes do: one write(2) per record,
`<N>target: message` with N = level | facility << 3 (kmsg_defs: underhill_init uses facility
2, openvmm_hcl and its hosts facility 3). Levels: error 3, warn 4, info 5 (NOTICE), debug 6,
trace 7, as the real level map gives them."""
import threading

from hclsim.defs import kabi
from hclsim.hcl import linux

INIT_FACILITY = 2
UNDERHILL_FACILITY = 3
ERROR, WARN, INFO, DEBUG, TRACE = 3, 4, 5, 6, 7
LOG_LINE_MAX = 992            # a longer write to /dev/kmsg is EINVAL (and would be lost)


class Logger:
    def __init__(self, facility: int, target: str, max_level: int = INFO):
        self.facility, self.target, self.max_level = facility, target, max_level
        self._file = None
        self._lock = threading.Lock()

    def log(self, level: int, message: str) -> None:
        if level > self.max_level:
            return
        record = f"<{level | self.facility << 3}>{self.target}: {message}\n".encode("utf-8", "replace")
        with self._lock:
            try:
                if self._file is None:
                    self._file = linux.open_file("/dev/kmsg", kabi.O_WRONLY)
                self._file.write(record[:LOG_LINE_MAX])
            except OSError:
                pass               # the kernel is going away: nothing left to log to

    def error(self, message: str) -> None:
        self.log(ERROR, message)

    def warn(self, message: str) -> None:
        self.log(WARN, message)

    def info(self, message: str) -> None:
        self.log(INFO, message)

    def debug(self, message: str) -> None:
        self.log(DEBUG, message)
