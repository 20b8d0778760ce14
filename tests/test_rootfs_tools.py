"""The rootfs's small programs (hcl/tools.py: /usr/bin/hcltools and its links sh, cat, ls, ps,
env, kill) as real processes under a running stand-in kernel with the shipped rootfs: what
they print of the simulated /proc, /dev and rootfs, the shell's language, and bad input as one
clear line on stderr, never a traceback.

One VM for the module: 1 vCPU, OPENHCL_WAIT_FOR_START=1 so that underhill-init and openvmm_hcl
run and idle (no VM worker spins the engine). Each tool is started the way the kernel's binfmt
starts a rootfs program (kabi.binfmt_argv of the host file RESOLVE names), with the kernel's
run folder at KERNEL_FD, as a child of the test."""
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from hclsim.config import BootConfig
from hclsim.defs import kabi
from hclsim.kernel_stub.userspace import Userspace
from hclsim.machine import Machine

ENV = {"HOME": "/", "TERM": "linux", "PATH": "/bin:/usr/bin"}     # what init's environment holds
PID_FILE = "/run/underhill.pid"


@pytest.fixture(scope="module")
def vm():
    machine = Machine(BootConfig(cpus=1, host_bootargs="OPENHCL_WAIT_FOR_START=1"))
    run_dir = tempfile.mkdtemp(prefix="hclsim-test-tools-")
    us = None
    saved = None
    try:
        result = machine.run_to_handoff()
        us = Userspace(result.linux, result.handoff, machine.initrd.data, run_dir)
        us.start()
        deadline = time.monotonic() + 30
        while "waiting for a diag Start request" not in us.kmsg.text() and time.monotonic() < deadline \
                and not us.finished.is_set():
            time.sleep(0.01)
        assert "waiting for a diag Start request" in us.kmsg.text(), us.kmsg.text()
        try:
            saved = os.dup(kabi.KERNEL_FD)           # whatever the test process had there
        except OSError:
            saved = None
        os.dup2(us.server.dir_fd, kabi.KERNEL_FD)     # inherited by the tools (pass_fds)
        yield us
    finally:
        if saved is not None:
            os.dup2(saved, kabi.KERNEL_FD)
            os.close(saved)
        else:
            try:
                os.close(kabi.KERNEL_FD)
            except OSError:
                pass
        if us is not None:
            us.shutdown()
        machine.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def command(vm, argv) -> list[str]:
    """The host command line the kernel's binfmt runs for the rootfs program argv[0]."""
    return kabi.binfmt_argv(sys.executable, vm.namespace.host_path(argv[0]), list(argv))


def run(vm, *argv, input: str | None = None, env: dict | None = None, timeout: float = 30):
    return subprocess.run(command(vm, argv), input=input, capture_output=True, text=True, env=env or ENV,
                          pass_fds=(kabi.KERNEL_FD,), timeout=timeout)


def one_error_line(proc, text: str | None = None) -> str:
    """The single line a failing tool printed on stderr (checked to be one line, no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if text is not None:
        assert lines[0] == text, proc.stderr
    return lines[0]


def vm_process(vm, comm: str):
    return next(p for p in vm.server.processes.values() if p.comm == comm)


# ---- cat ----------------------------------------------------------------------------------
def test_cat_proc_cmdline_is_the_command_line_the_shim_built(vm):
    proc = run(vm, "/bin/cat", "/proc/cmdline")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.encode() == vm.handoff.cmdline_bytes + b"\n"
    assert "OPENHCL_WAIT_FOR_START=1" in proc.stdout and "rdinit=/underhill-init" in proc.stdout
    # The tool is a process of the VM: it introduced itself with its argv, under its own name.
    me = next(p for p in vm.server.processes.values() if p.argv == ["/bin/cat", "/proc/cmdline"])
    assert me.comm == "cat"


def test_cat_reads_stdin_files_and_char_devices(vm):
    proc = run(vm, "/bin/cat", "-n", "-", "/etc/kernel-build-info.json", input="from stdin\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "     1\tfrom stdin"
    assert '"kernel_version": "6.6.0-hclsim-standin"' in proc.stdout
    # /dev/kmsg is read until it would block: the log so far, as /dev/kmsg records, then the end.
    kmsg = run(vm, "/bin/cat", "/dev/kmsg", timeout=10)
    assert kmsg.returncode == 0, kmsg.stderr
    assert kmsg.stdout.startswith("5,0,") and ";Linux version " in kmsg.stdout.splitlines()[0]
    assert "underhill_init: Initial process" in kmsg.stdout
    assert run(vm, "/bin/cat", "/dev/null").stdout == ""


# ---- ls -----------------------------------------------------------------------------------
def test_ls_dev_lists_kmsg(vm):
    proc = run(vm, "/bin/ls", "/dev")
    assert proc.returncode == 0 and proc.stderr == ""
    names = proc.stdout.splitlines()
    assert {"kmsg", "null", "mshv", "pts"} <= set(names) and names == sorted(names)


def test_ls_long_of_the_root(vm):
    proc = run(vm, "/bin/ls", "-l", "/")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = {line.split()[2]: line for line in proc.stdout.splitlines()}
    assert {"bin", "dev", "etc", "proc", "sys", "tmp", "usr", "underhill-init"} <= set(lines)
    assert lines["bin"].startswith("lrwxrwxrwx ") and lines["bin"].endswith("bin -> /usr/bin")
    assert lines["underhill-init"].endswith("underhill-init -> /usr/bin/openvmm_hcl")
    assert lines["tmp"].startswith("drwxrwxrwt ")
    assert lines["proc"].startswith("dr-xr-xr-x ")         # procfs, mounted by underhill-init
    assert lines["etc"].split()[:2] == ["drwxr-xr-x", "4096"]


def test_ls_options_and_several_paths(vm):
    proc = run(vm, "/bin/ls", "-la", "/usr/bin")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(" .") and lines[1].endswith(" ..")
    hcltools = next(line for line in lines if line.endswith(" hcltools") and " -> " not in line)
    assert hcltools.startswith("-rwxr-xr-x ")
    for tool in ("sh", "cat", "ls", "ps", "env", "kill"):
        assert f"lrwxrwxrwx 8 {tool} -> hcltools" in " ".join(" ".join(l.split()) for l in lines), tool
    both = run(vm, "/bin/ls", "-1", "/proc/sys", "/etc/kernel-build-info.json")
    assert both.stdout == "/etc/kernel-build-info.json\n\n/proc/sys:\nkernel\nvm\n"
    assert run(vm, "/bin/ls", "-d", "/bin", "/proc").stdout == "/bin\n/proc\n"
    assert run(vm, "/bin/ls", "/bin").stdout.splitlines() == run(vm, "/bin/ls", "/usr/bin").stdout.splitlines()


# ---- ps -----------------------------------------------------------------------------------
def test_ps_shows_the_vms_processes(vm):
    proc = run(vm, "/bin/ps")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 3) for line in proc.stdout.splitlines()]
    assert rows[0] == ["PID", "PPID", "COMM", "ARGS"]
    by_pid = {int(r[0]): r for r in rows[1:]}
    init, control = vm_process(vm, "underhill-init"), vm_process(vm, "openvmm_hcl")
    if "no per-process directories" in proc.stderr:
        # Today's procfs has no /proc/<pid>: ps shows itself and the pid file's process.
        one_error_line(proc)
        me = next(r for r in rows[1:] if r[2] == "ps")
        assert me[3] == "/bin/ps" and int(me[1]) == os.getpid()
        assert by_pid[control.pid][3] == f"(pid file {PID_FILE})"
        assert vm.namespace.rootfs.resolve(PID_FILE).read_text() == str(control.pid)
    else:                         # a procfs with /proc/<pid>: every process, by name
        assert by_pid[init.pid][2] == "underhill-init" and by_pid[control.pid][2] == "openvmm_hcl"
        assert int(by_pid[control.pid][1]) == init.pid
        assert by_pid[control.pid][3] == "/bin/openvmm_hcl --pid /run/underhill.pid"
    picked = run(vm, "/bin/ps", "-o", "pid,comm", "--no-headers", "-p", str(control.pid))
    assert picked.stdout.split()[0] == str(control.pid)


# ---- env ----------------------------------------------------------------------------------
def test_env_prints_and_runs(vm):
    proc = run(vm, "/bin/env")
    assert proc.returncode == 0 and proc.stderr == ""
    printed = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert {k: printed[k] for k in ENV} == ENV
    assert run(vm, "/bin/env", "-i", "A=1", "B=x y").stdout == "A=1\nB=x y\n"
    assert "HOME=/" not in run(vm, "/bin/env", "-u", "HOME").stdout
    child = run(vm, "/bin/env", "-i", "A=1", "/bin/env")
    assert "A=1" in child.stdout.splitlines() and "HOME=/" not in child.stdout
    status = run(vm, "/bin/env", "GREETING=hi", "sh", "-c", "echo $GREETING; exit 3")
    assert status.returncode == 3 and status.stdout == "hi\n"


# ---- kill ---------------------------------------------------------------------------------
def test_kill_lists_signals(vm):
    proc = run(vm, "/bin/kill", "-l")
    assert proc.returncode == 0
    assert proc.stdout == ("HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM TERM STKFLT\n"
                           "CHLD CONT STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF WINCH POLL PWR SYS\n")
    assert run(vm, "/bin/kill", "-l", "9", "137", "TERM", "SIGUSR1", "RTMIN+1").stdout == "KILL\nKILL\n15\n10\n35\n"
    assert " 9 KILL" in run(vm, "/bin/kill", "-L").stdout


def test_kill_signals_a_process(vm):
    victim = subprocess.Popen(command(vm, ["/bin/cat"]), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              env=ENV, pass_fds=(kabi.KERNEL_FD,))
    try:
        deadline = time.monotonic() + 10           # it is a process of the kernel once it said HELLO
        while victim.pid not in vm.server.processes and time.monotonic() < deadline:
            time.sleep(0.01)
        proc = run(vm, "/bin/kill", "-s", "TERM", str(victim.pid))
        assert proc.returncode == 0, proc.stderr
        assert victim.wait(10) == -15
    finally:
        victim.kill()
        victim.wait()
    gone = run(vm, "/bin/kill", "-9", str(victim.pid))
    assert gone.returncode == 1 and one_error_line(gone) in (f"kill: ({victim.pid}) - No such process",
                                                           f"kill: ({victim.pid}) - not a process of this VM")
    # The VM's processes (PID 1's session, which openvmm_hcl's pid file names) can be signalled;
    # never a host process outside it or kill's own session (the test's tools run in the test's).
    control = run(vm, "/bin/kill", "-0", str(vm_process(vm, "openvmm_hcl").pid))
    assert control.returncode == 0 and control.stderr == ""
    # A host process in a session of its own (host PID 1 may share the test's session in a container).
    outsider = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        host = run(vm, "/bin/kill", "-0", str(outsider.pid))
        assert host.returncode == 1 and one_error_line(host) == f"kill: ({outsider.pid}) - not a process of this VM"
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


# ---- sh -----------------------------------------------------------------------------------
def test_sh_runs_the_briefs_line(vm):
    proc = run(vm, "/bin/sh", "-c", "echo $HOME; false || echo ok; cat /nope; echo $?")
    assert proc.returncode == 0
    assert proc.stdout == "/\nok\n1\n"
    assert proc.stderr == "cat: /nope: No such file or directory\n"


def test_sh_words_quotes_and_variables(vm):
    script = ('A="x  y"; echo $A "$A" ${A}z \'$A\' a\\ b "q\\"d"; B=1; echo [$B] [$UNSET]; '
              'C=2 sh -c \'echo [$C] [$B]\'; export B; sh -c \'echo [$B]\'; '
              'true && echo and; false && echo never; false; echo $?; ! false && echo not; '
              'echo "$0 $# $1 $2"')
    proc = run(vm, "/bin/sh", "-c", script, "myname", "one", "two")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["x y x  y x yz $A a b q\"d", "[1] []", "[2] []", "[1]", "and", "1",
                                        "not", "myname 2 one two"]


def test_sh_cd_pwd_and_relative_paths(vm):
    proc = run(vm, "/bin/sh", "-c", "pwd; cd /proc; pwd; cat cmdline; cd ../usr/bin; ls -d ../bin; cd; pwd; "
                                    "cd -; cd /nope; echo $?")
    assert proc.stdout.splitlines() == ["/", "/proc", vm.handoff.cmdline_bytes.decode(), "../bin", "/", "/usr/bin",
                                        "1"]
    assert proc.stderr == "sh: cd: /nope: No such file or directory\n"


def test_sh_exit_status_and_unknown_commands(vm):
    assert run(vm, "/bin/sh", "-c", "exit 7").returncode == 7
    assert run(vm, "/bin/sh", "-c", "false").returncode == 1
    proc = run(vm, "/bin/sh", "-c", "nope arg; echo $?; /etc; echo $?")
    assert proc.stdout == "127\n126\n"
    assert proc.stderr == "sh: nope: not found\nsh: /etc: Permission denied\n"
    empty_path = run(vm, "/bin/sh", "-c", "PATH=/nowhere; ls; echo $?; /bin/ls -d /")
    assert empty_path.stdout == "127\n/\n" and empty_path.stderr == "sh: ls: not found\n"


def test_sh_pipes_and_redirections(vm):
    proc = run(vm, "/bin/sh", "-c",
               "echo hi > /tmp/f; echo there >> /tmp/f; cat < /tmp/f | cat -n; cat /tmp/f /nope 2>&1 | cat -n; "
               "echo 2 > /proc/sys/kernel/kptr_restrict; cat /proc/sys/kernel/kptr_restrict; "
               "echo 99 > /proc/sys/kernel/kptr_restrict; echo $?; echo 1 | cat > /proc/sys/kernel/kptr_restrict; "
               "cat < /proc/sys/kernel/kptr_restrict")
    assert proc.stdout.splitlines() == ["     1\thi", "     2\tthere", "     1\thi", "     2\tthere",
                                        "     3\tcat: /nope: No such file or directory", "2", "1", "1"]
    assert proc.stderr == "sh: echo: write error: Invalid argument\n"       # 99 is outside 0..2
    assert vm.sysctl["kernel/kptr_restrict"] == 1
    assert ("/proc/sys/kernel/kptr_restrict", 2) in vm.sysctl.writes
    assert vm.namespace.rootfs.resolve("/tmp/f").read_text() == "hi\nthere\n"


def test_sh_reads_commands_from_stdin(vm):
    script = 'echo a\nnope\necho $?\necho "two\nlines"\necho con\\\ntinued &&\n  echo next\nexit 4\necho never\n'
    proc = run(vm, "/bin/sh", input=script)
    assert proc.returncode == 4
    assert proc.stdout == "a\n127\ntwo\nlines\ncontinued\nnext\n"
    assert proc.stderr == "sh: nope: not found\n"          # no prompt: stdin is not a terminal
    # A program the shell runs reads the rest of the shell's stdin (the shell read only its line).
    shared = run(vm, "/bin/sh", input="cat\necho not a command, cat's input\n")
    assert shared.stdout == "echo not a command, cat's input\n"


def test_sh_prompts_on_a_terminal(vm):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(command(vm, ["/bin/sh"]), stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV, pass_fds=(kabi.KERNEL_FD,))
        os.close(slave)
        slave = None
        os.write(master, b"echo $HOME\nexit 3\n")
        out, err = proc.communicate(timeout=30)
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 3
    assert out == b"/\n" and err == b"# # "


def test_sh_runs_a_script_file(vm):
    proc = run(vm, "/bin/sh", "-c", "echo 'echo script $0 $1; exit 3' > /tmp/s.sh; sh /tmp/s.sh arg; echo $?")
    assert proc.stdout == "script /tmp/s.sh arg\n3\n", proc.stderr


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, status, line", [
    (["/bin/cat", "/nope"], 1, "cat: /nope: No such file or directory"),
    (["/bin/cat", "/proc"], 1, "cat: /proc: Is a directory"),
    (["/bin/cat", "-x"], 1, "cat: invalid option -- 'x'"),
    (["/bin/ls", "/nope"], 2, "ls: cannot access '/nope': No such file or directory"),
    (["/bin/ls", "-z"], 2, "ls: invalid option -- 'z'"),
    (["/bin/ps", "-o", "pid,bogus"], 1, None),
    (["/bin/ps", "--bad"], 1, "ps: unsupported option '--bad' (ps [-ef] [-o FIELD,...] [-p PID,...])"),
    (["/bin/env", "nope"], 127, "env: 'nope': No such file or directory"),
    (["/bin/env", "/etc/kernel-build-info.json"], 126, "env: '/etc/kernel-build-info.json': Permission denied"),
    (["/bin/env", "-x"], 125, "env: invalid option -- 'x'"),
    (["/bin/kill"], 1, "kill: not enough arguments (kill [-s SIGNAL | -SIGNAL] PID... or kill -l)"),
    (["/bin/kill", "-s", "FOO", "1"], 1, "kill: unknown signal: FOO; valid signals: kill -l"),
    (["/bin/kill", "abc"], 1, "kill: abc: arguments must be process IDs"),
    (["/bin/kill", "-9", "--", "-1"], 1,
     "kill: (-1) - process groups are not supported (the VM's processes are host processes)"),
    (["/bin/sh", "-c", "echo \"open"], 2, "sh: syntax error: unterminated quoted string"),
    (["/bin/sh", "-c", "if true; then echo x; fi"], 2,
     "sh: syntax error: 'if' is not supported by this shell (no if, for, while, case or { } blocks)"),
    (["/bin/sh", "-c", "echo $(ls)"], 2, "sh: syntax error: command substitution $(...) is not supported"),
    (["/bin/sh", "-c", "echo a &"], 2, "sh: syntax error: background jobs ('&') are not supported"),
    (["/bin/sh", "-c", "echo a |"], 2, "sh: syntax error: unexpected end of input after '|'"),
    (["/bin/sh", "-c", "exit abc"], 2, "sh: exit: Illegal number: abc"),
    (["/bin/sh", "-c"], 2, "sh: -c: option requires an argument"),
    (["/bin/sh", "/nope.sh"], 127, "sh: cannot open /nope.sh: No such file or directory"),
    (["/usr/bin/hcltools", "nope"], 127, "hcltools: nope: applet not found (one of cat, env, kill, ls, ps, sh)"),
])
def test_bad_input_is_one_clear_line(vm, argv, status, line):
    proc = run(vm, *argv)
    assert proc.returncode == status, proc.stderr
    text = one_error_line(proc, line)
    assert text.startswith(os.path.basename(argv[0] if argv[0] != "/usr/bin/hcltools" else "hcltools") + ": ")


def test_outside_a_vm_is_one_line_too(vm, tmp_path):
    """Run with no kernel descriptor (as on the host): the tool says so and stops."""
    launcher = vm.namespace.host_path("/usr/bin/hcltools")
    proc = subprocess.run([sys.executable, "-I", "-c", kabi.BINFMT_LOADER, launcher, "cat", "/proc/cmdline"],
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert proc.returncode == 1
    assert one_error_line(proc).startswith(f"cat: cannot reach the kernel (descriptor {kabi.KERNEL_FD} must be")


def test_hcltools_by_its_own_name(vm):
    proc = run(vm, "/usr/bin/hcltools", "cat", "/proc/sys/kernel/core_pattern")
    assert proc.returncode == 0 and proc.stdout.strip() == vm.sysctl.core_pattern
    listing = run(vm, "/usr/bin/hcltools", "--help")
    assert listing.returncode == 0 and "kill -l" in listing.stdout


def test_the_vm_kept_running(vm):
    """Last: the tools left the kernel and its processes as they were."""
    assert vm.panic is None and vm.init_proc.returncode is None
    assert "BUG" not in vm.kmsg.text()
