"""The console of one run: the guest's serial output echoed on stdout, and progress lines on
stderr while a phase lasts more than a second."""
import sys

PROGRESS_AFTER_S, PROGRESS_EVERY_S = 1.0, 5.0   # first progress line after 1 s, then every 5 s


class Console:
    """The console of one run: the guest's serial output echoed on stdout (unless quiet), and
    progress lines on stderr while a phase of the run has lasted more than a second (never with
    --quiet or --json), written only between whole lines of serial output."""

    def __init__(self, echo: bool, progress: bool):
        import threading
        self.echo, self.progress = echo, progress
        self.lock = threading.Lock()
        self.mid_line = False
        self.last_line = ""
        self._partial = ""
        self._phase = None            # [what, start, next report time, reported yet]
        self._thread = None

    def serial(self, _name: str, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        with self.lock:
            if self.echo:
                sys.stdout.write(text)
                sys.stdout.flush()
            self.mid_line = not text.endswith("\n")
            lines = (self._partial + text).split("\n")
            self._partial = lines[-1]
            done = [line for line in lines[:-1] if line.strip()]
            if done:
                self.last_line = done[-1].strip()

    def phase(self, what: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def run():
            if not self.progress:
                yield
                return
            start = time.monotonic()
            with self.lock:
                self._phase = [what, start, start + PROGRESS_AFTER_S, False]
            self._start_thread()
            try:
                yield
            except BaseException:
                with self.lock:
                    self._phase = None
                raise
            with self.lock:
                shown, self._phase = self._phase[3], None
                if shown:
                    self._say(f"hclsim: {what}: done in {time.monotonic() - start:.1f} s")
        return run()

    def note(self, text: str) -> None:
        """A line for the person running hclsim (stderr), even with progress off."""
        with self.lock:
            self._say(text)

    def switch(self, what: str) -> None:
        """Inside phase(): the run goes on to its next phase (its own second before progress)."""
        import time
        if not self.progress:
            return
        with self.lock:
            if self._phase is None:
                return
            if self._phase[3]:
                self._say(f"hclsim: {self._phase[0]}: done in {time.monotonic() - self._phase[1]:.1f} s")
            now = time.monotonic()
            self._phase = [what, now, now + PROGRESS_AFTER_S, False]

    def _start_thread(self) -> None:
        import threading
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hclsim-progress", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        import time
        while True:
            time.sleep(0.1)
            with self.lock:
                phase = self._phase
                now = time.monotonic()
                if phase is None or now < phase[2] or (self.echo and self.mid_line):
                    continue
                what, start = phase[0], phase[1]
                last = self.last_line if len(self.last_line) <= 90 else self.last_line[:87] + "..."
                seen = f" (last serial line: {last})" if last else ""
                self._say(f"hclsim: {what}: {now - start:.0f} s so far{seen}")
                phase[2], phase[3] = now + PROGRESS_EVERY_S, True

    @staticmethod
    def _say(line: str) -> None:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
