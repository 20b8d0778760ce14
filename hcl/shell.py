"""sh, the rootfs's small shell: runs the commands hcl/shell_parse.py parses, with its builtins."""
import os

from hclsim.defs import kabi
from hclsim.hcl import linux
from hclsim.hcl.tools import (USAGE, DEFAULT_PATH, Fail, STDERR, STDIN, STDOUT, absolute, find_program, follow, stat,
                              strerror, wait_child, warn, write_fd)
from hclsim.hcl.shell_parse import (Incomplete, ShellExit, ShellSyntax, _Command, _identifier, parse_shell)


class _Redirections:
    """What a command's redirections opened: host fds (rootfs files) to close, kernel files
    (pseudo files, devices: no host descriptor) written or read by a pump thread through a
    pipe when an external program gets them."""

    def __init__(self):
        self.files, self.close_after_start, self.pumps = [], [], []
        self.reading = set()             # ids of the kernel files opened by '<'

    def for_child(self, fds: dict) -> dict:
        """fds with every kernel file replaced by a pipe end, its pump started."""
        import threading
        out, ends = dict(fds), {}
        for n, target in fds.items():
            if isinstance(target, int):
                continue
            if id(target) not in ends:
                r, w = os.pipe()
                reading = id(target) in self.reading
                pump = threading.Thread(target=_pump_in if reading else _pump_out, args=(target, w if reading else r),
                                        daemon=True)
                pump.start()
                self.pumps.append(pump)
                ends[id(target)] = r if reading else w
                self.close_after_start.append(r if reading else w)
            out[n] = ends[id(target)]
        return out

    def started(self) -> None:
        for fd in self.close_after_start:
            os.close(fd)
        self.close_after_start = []

    def finish(self) -> None:
        self.started()
        for pump in self.pumps:
            pump.join()
        for f in self.files:
            f.close()
        self.files, self.pumps = [], []


def _pump_out(f, r: int) -> None:
    try:
        while chunk := os.read(r, kabi.MAX_READ):
            f.write(chunk)
    except OSError as exc:
        warn("sh", f"{f.path}: write error: {strerror(exc)}")
    finally:
        os.close(r)


def _pump_in(f, w: int) -> None:
    try:
        while True:
            try:
                chunk = f.read(kabi.MAX_READ)
            except OSError as exc:
                if exc.errno == kabi.EAGAIN:
                    break
                raise
            if not chunk:
                break
            write_fd(w, chunk)
    except BrokenPipeError:
        pass
    except OSError as exc:
        warn("sh", f"{f.path}: read error: {strerror(exc)}")
    finally:
        os.close(w)


class Shell:
    """The shell's state: variables (the environment's exported), $?, the working directory
    ($PWD, which its programs resolve relative paths against), $0 and the positional
    parameters."""

    def __init__(self, arg0: str, args: list[str]):
        self.vars = dict(os.environ)
        self.exported = set(self.vars)
        pwd = self.vars.get("PWD", "")
        self.vars["PWD"] = absolute(pwd, "/") if pwd.startswith("/") else "/"
        self.exported.add("PWD")
        self.arg0, self.args, self.status = arg0, list(args), 0

    @property
    def pwd(self) -> str:
        return self.vars.get("PWD") or "/"

    # ---- running text -------------------------------------------------------------------
    def run_text(self, text: str) -> int:
        try:
            program = parse_shell(text)
        except ShellSyntax as exc:
            warn("sh", f"syntax error: {exc}")
            return 2
        try:
            self.run_program(program)
        except ShellExit as exc:
            return exc.status
        return self.status

    def run_stdin(self) -> int:
        interactive = os.isatty(STDIN)
        pending = ""
        while True:
            if interactive:
                _say("> " if pending else "# ")          # prompts go to stderr, as sh's do
            try:
                line = _read_line(STDIN)
            except KeyboardInterrupt:
                if not interactive:
                    return 130
                _say("\n")
                pending = ""
                continue
            if line is None:
                if pending:
                    warn("sh", "syntax error: unexpected end of input")
                    return 2
                if interactive:
                    _say("\n")
                return self.status
            pending += line
            try:
                program = parse_shell(pending)
            except Incomplete:
                continue
            except ShellSyntax as exc:
                warn("sh", f"syntax error: {exc}")
                pending = ""
                self.status = 2
                if not interactive:
                    return 2
                continue
            pending = ""
            try:
                self.run_program(program)
            except ShellExit as exc:
                return exc.status
            except KeyboardInterrupt:
                if not interactive:
                    return 130
                _say("\n")
                self.status = 130

    def run_program(self, program: list) -> None:
        for and_or in program:
            for connector, pipeline in and_or:
                if connector == "&&" and self.status != 0 or connector == "||" and self.status == 0:
                    continue
                self.status = self.run_pipeline(pipeline)

    # ---- expansion ---------------------------------------------------------------------------
    def param(self, name: str) -> str:
        if name == "?":
            return str(self.status)
        if name == "$":
            return str(os.getpid())
        if name == "#":
            return str(len(self.args))
        if name in ("@", "*"):
            return " ".join(self.args)
        if name in ("!", "-"):
            return ""
        if name.isdigit():
            n = int(name)
            return self.arg0 if n == 0 else self.args[n - 1] if n <= len(self.args) else ""
        return self.vars.get(name, "")

    def expand(self, parts) -> list[str]:
        """A word's fields: parameters expanded, unquoted expansions split at whitespace, an
        unquoted expansion that is empty gives no field (no globbing)."""
        fields, cur = [], None
        for kind, value, quoted in parts:
            if kind == "lit":
                cur = (cur or "") + value
                continue
            if quoted and value == "@":                 # "$@": one field per parameter
                for k, arg in enumerate(self.args):
                    if k:
                        fields.append(cur)
                        cur = arg
                    else:
                        cur = (cur or "") + arg
                continue
            text = self.param(value)
            if quoted:
                cur = (cur or "") + text
                continue
            pieces = text.split()
            if not pieces:
                if text and cur is not None:
                    fields.append(cur)
                    cur = None
                continue
            if text[0].isspace() and cur is not None:
                fields.append(cur)
                cur = None
            for k, piece in enumerate(pieces):
                if k:
                    fields.append(cur)
                    cur = piece
                else:
                    cur = (cur or "") + piece
            if text[-1].isspace():
                fields.append(cur)
                cur = None
        if cur is not None:
            fields.append(cur)
        return fields

    def expand_flat(self, parts) -> str:
        """A word as one string (assignments, redirection targets: no splitting)."""
        return "".join(value if kind == "lit" else self.param(value) for kind, value, _q in parts)

    # ---- commands ------------------------------------------------------------------------
    def run_pipeline(self, pipeline) -> int:
        negate, commands = pipeline
        if len(commands) == 1:
            status = self.run_command(commands[0], {STDIN: STDIN, STDOUT: STDOUT, STDERR: STDERR})
        else:
            waits, prev = [], None
            for k, cmd in enumerate(commands):
                fds = {STDIN: STDIN if prev is None else prev, STDOUT: STDOUT, STDERR: STDERR}
                r = w = None
                if k < len(commands) - 1:
                    r, w = os.pipe()
                    fds[STDOUT] = w
                try:
                    waits.append(self.run_command(cmd, fds, wait=False))
                finally:
                    if prev is not None:
                        os.close(prev)
                    if w is not None:
                        os.close(w)
                prev = r
            status = 0
            for item in waits:
                status = item() if callable(item) else item
        return (0 if status else 1) if negate else status

    def run_command(self, cmd: _Command, fds: dict, wait: bool = True):
        """Run one simple command; its $? (or, with wait=False, a function waiting for it)."""
        argv = [field for word in cmd.words for field in self.expand(word)]
        assigns = [(name, self.expand_flat(value)) for name, value in cmd.assigns]
        res = _Redirections()
        done = True
        try:
            try:
                fds = self.redirect(fds, cmd.redirs, res)
            except Fail as exc:
                self.error(fds, str(exc))
                return 1
            if not argv:
                for name, value in assigns:
                    self.vars[name] = value
                return 0
            builtin = BUILTINS.get(argv[0])
            if builtin is not None:
                if argv[0] in ("export", "exit", ":", "unset"):
                    self.vars.update(assigns)
                return builtin(self, argv, fds)
            pid, status = self.spawn(argv, assigns, fds, res)
            if pid is None:                 # not run (the error is written): its status
                return status
            res.started()
            done = False
            if wait:
                return self._wait(pid, res)
            return lambda: self._wait(pid, res)
        finally:
            if done:
                res.finish()

    def _wait(self, pid: int, res: _Redirections) -> int:
        try:
            return wait_child(pid)
        finally:
            res.finish()

    def spawn(self, argv: list[str], assigns: list, fds: dict, res: _Redirections) -> tuple[int | None, int]:
        """(pid, 0) of the rootfs program argv[0] started, or (None, 127 / 126) with the error
        written: not found on PATH, or not a program the kernel runs."""
        name = argv[0]
        path = find_program(name, self.vars["PATH"] if "PATH" in self.vars else DEFAULT_PATH, self.pwd)
        if path is None:
            self.error(fds, f"{name}: not found")
            return None, 127
        environ = {k: self.vars[k] for k in self.exported if k in self.vars}
        environ.update(assigns)
        child = res.for_child(fds)
        try:
            return linux.spawn(path, argv, environ,
                               stdio=tuple(None if child[n] == n else child[n] for n in (STDIN, STDOUT, STDERR)),
                               fds={n: v for n, v in child.items() if n > STDERR and n != v}), 0
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            if exc.errno == kabi.ENOENT:
                self.error(fds, f"{name}: not found")
                return None, 127
            self.error(fds, f"{name}: {strerror(exc)}")
            return None, 126

    def redirect(self, fds: dict, redirs: list, res: _Redirections) -> dict:
        fds = dict(fds)
        for fd, op, parts in redirs:
            target = self.expand_flat(parts)
            if op in (">&", "<&"):
                if not target.isdigit() or int(target) not in fds:
                    raise Fail(f"{target}: bad file descriptor" if target != "-" else
                               "closing a descriptor (N>&-) is not supported")
                fds[fd] = fds[int(target)]
                continue
            flags = {">": kabi.O_WRONLY | kabi.O_CREAT | kabi.O_TRUNC, ">>": kabi.O_WRONLY | kabi.O_CREAT | kabi.O_APPEND,
                     "<": kabi.O_RDONLY | kabi.O_NONBLOCK}[op]
            try:
                f = linux.open_file(absolute(target, self.pwd), flags, 0o666)
            except OSError as exc:
                if isinstance(exc, linux.KernelGone):
                    raise
                raise Fail(f"cannot {'open' if op == '<' else 'create'} {target}: {strerror(exc)}") from None
            res.files.append(f)
            if f.host_fd is not None:
                os.set_inheritable(f.host_fd, False)
                fds[fd] = f.host_fd
            else:
                if op == "<":
                    res.reading.add(id(f))
                fds[fd] = f
        return fds

    # ---- output of the shell and its builtins ----------------------------------------------
    def emit(self, fds: dict, n: int, text: str, who: str) -> int:
        target = fds.get(n)
        data = text.encode("utf-8", "surrogateescape")
        try:
            if isinstance(target, int):
                write_fd(target, data)
            elif target is not None and data:
                target.write(data)              # a kernel file: one write(2), as a store wants
        except BrokenPipeError:
            return 141
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            self.error(fds, f"{who}: write error: {strerror(exc)}")
            return 1
        return 0

    def error(self, fds: dict, message: str) -> None:
        target = fds.get(STDERR, STDERR)
        data = f"sh: {message}\n".encode("utf-8", "surrogateescape")
        try:
            if isinstance(target, int):
                write_fd(target, data)
            else:
                target.write(data)
        except OSError:
            pass


def _say(text: str) -> None:
    try:
        write_fd(STDERR, text.encode())
    except OSError:
        pass


def _read_line(fd: int) -> str | None:
    """One line of fd, read a byte at a time (what follows stays for the programs the shell
    runs, which share the descriptor); None at the end."""
    data = bytearray()
    while True:
        try:
            b = os.read(fd, 1)
        except OSError as exc:
            if exc.errno != kabi.EIO:                  # EIO: the terminal hung up, an end too
                raise Fail(f"read error: {strerror(exc)}", 2) from None
            b = b""
        if not b:
            return data.decode("utf-8", "surrogateescape") if data else None
        data += b
        if b == b"\n":
            return data.decode("utf-8", "surrogateescape")


# ---- the shell's builtins -------------------------------------------------------------------
def _b_echo(shell: Shell, argv: list[str], fds: dict) -> int:
    args, newline, escapes = argv[1:], True, False
    while args and len(args[0]) > 1 and args[0][0] == "-" and set(args[0][1:]) <= set("neE"):
        for ch in args[0][1:]:
            if ch == "n":
                newline = False
            else:
                escapes = ch == "e"
        args = args[1:]
    text = " ".join(args)
    if escapes:
        text, stop = _echo_escapes(text)
        newline = newline and not stop
    return shell.emit(fds, STDOUT, text + ("\n" if newline else ""), "echo")


_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _echo_escapes(text: str) -> tuple[str, bool]:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\" or i + 1 >= len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "c":
            return "".join(out), True
        if nxt == "0":
            j = i + 2
            while j < len(text) and j < i + 5 and text[j] in "01234567":
                j += 1
            out.append(chr(int(text[i + 2:j] or "0", 8)))
            i = j
            continue
        out.append(_ESCAPES.get(nxt, "\\" + nxt))
        i += 2
    return "".join(out), False


def _b_cd(shell: Shell, argv: list[str], fds: dict) -> int:
    args = [a for a in argv[1:] if a not in ("-L", "-P")]
    if len(args) > 1:
        shell.error(fds, "cd: too many arguments")
        return 1
    show = False
    if not args:
        target = shell.vars.get("HOME")
        if not target:
            shell.error(fds, "cd: HOME not set")
            return 1
    elif args[0] == "-":
        target, show = shell.vars.get("OLDPWD"), True
        if not target:
            shell.error(fds, "cd: OLDPWD not set")
            return 1
    else:
        target = args[0]
    path = absolute(target, shell.pwd)
    try:
        kind = stat(follow(path))[0]
    except OSError as exc:
        if isinstance(exc, linux.KernelGone):
            raise
        shell.error(fds, f"cd: {target}: {strerror(exc)}")
        return 1
    if kind != kabi.KIND_DIR:
        shell.error(fds, f"cd: {target}: {os.strerror(kabi.ENOTDIR)}")
        return 1
    shell.vars["OLDPWD"], shell.vars["PWD"] = shell.pwd, path
    return shell.emit(fds, STDOUT, path + "\n", "cd") if show else 0


def _b_pwd(shell: Shell, argv: list[str], fds: dict) -> int:
    return shell.emit(fds, STDOUT, shell.pwd + "\n", "pwd")


def _b_exit(shell: Shell, argv: list[str], fds: dict) -> int:
    if len(argv) > 1:
        if not argv[1].lstrip("-").isdigit() or not argv[1].isascii():
            shell.error(fds, f"exit: Illegal number: {argv[1]}")
            raise ShellExit(2)
        raise ShellExit(int(argv[1]) & 0xFF)
    raise ShellExit(shell.status)


def _b_export(shell: Shell, argv: list[str], fds: dict) -> int:
    args = [a for a in argv[1:] if a != "-p"]
    if not args:
        lines = "".join("export {}='{}'\n".format(k, shell.vars[k].replace("'", "'\\''"))
                        for k in sorted(shell.exported) if k in shell.vars)
        return shell.emit(fds, STDOUT, lines, "export")
    status = 0
    for a in args:
        name, eq, value = a.partition("=")
        if not _identifier(name):
            shell.error(fds, f"export: {name}: bad variable name")
            status = 1
            continue
        if eq:
            shell.vars[name] = value
        shell.exported.add(name)
    return status


def _b_unset(shell: Shell, argv: list[str], fds: dict) -> int:
    status = 0
    for name in argv[1:]:
        if name in ("-v", "-f"):
            continue
        if not _identifier(name):
            shell.error(fds, f"unset: {name}: bad variable name")
            status = 1
            continue
        shell.vars.pop(name, None)
        shell.exported.discard(name)
    return status


BUILTINS = {"echo": _b_echo, "cd": _b_cd, "pwd": _b_pwd, "exit": _b_exit, "export": _b_export, "unset": _b_unset,
            "true": lambda shell, argv, fds: 0, "false": lambda shell, argv, fds: 1, ":": lambda shell, argv, fds: 0}


def sh(argv: list[str]) -> int:
    """sh -c COMMAND [NAME [ARG...]], sh FILE [ARG...], or commands from stdin line by line
    (prompt "# " on a terminal, on stderr).

    The language: words with '...', "..." and backslash quoting; $NAME ${NAME} $? $$ $# $0-$9
    $@ $* (unquoted expansions split at whitespace; no globbing); NAME=VALUE assignments (alone:
    shell variables; before a command: its environment only); ; && || ! and | pipelines;
    redirections < > >> N> N>&M (a pseudo file or device, which has no host descriptor, is
    written or read through a pipe for a program, and written directly, one write per echo,
    by a builtin); # comments; lines continued after a backslash, an open quote, && || or |. Builtins:
    cd pwd exit echo export unset true false :. Anything else is a rootfs program found on PATH
    (default /bin:/usr/bin), started with linux.spawn and waited for. Not there (a syntax error,
    status 2): if/for/while/case, { }, ( ), &, $(...), `...`, <<, ${NAME:-...}."""
    args = argv[1:]
    if args[:1] == ["-c"]:
        if len(args) < 2:
            raise Fail("-c: option requires an argument", 2)
        return Shell(args[2] if len(args) > 2 else "sh", args[3:]).run_text(args[1])
    if args and args[0].startswith("-") and args[0] != "-":
        raise Fail(f"{args[0]}: option not supported (usage: {USAGE['sh']})", 2)
    if args and args[0] != "-":
        name = args[0]
        try:
            text = linux.read_file(absolute(name)).decode("utf-8", "surrogateescape")
        except OSError as exc:
            if isinstance(exc, linux.KernelGone):
                raise
            raise Fail(f"cannot open {name}: {strerror(exc)}", 127) from None
        return Shell(name, args[1:]).run_text(text)
    return Shell("sh", args[1:]).run_stdin()
