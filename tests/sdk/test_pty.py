"""`sandbox.pty`: Process.Start with `pty.size`, input via SendInput{pty}, resize via Update.

Each typed command prints something its own echoed input does not contain (arithmetic,
upper-casing), so finding the expected text proves the command ran.
"""

import pytest

from e2b import CommandExitException, PtySize

from support import OutputCollector, wait_until


@pytest.fixture
def pty(sandbox):
    handles = []

    def create(**kwargs):
        kwargs.setdefault("size", PtySize(rows=24, cols=80))
        handle = sandbox.pty.create(**kwargs)
        handles.append(handle)
        return handle, OutputCollector(handle)

    yield create
    for handle in handles:
        try:
            sandbox.pty.kill(handle.pid)
        except Exception:
            pass


def test_pty_create_runs_commands(sandbox, pty):
    handle, out = pty()
    assert handle.pid > 0
    sandbox.pty.send_stdin(handle.pid, b"echo $((40+2))xyz\n")
    out.wait_for_pty(b"42xyz")


def test_pty_is_a_terminal_with_the_requested_size(sandbox, pty):
    handle, out = pty(size=PtySize(rows=33, cols=101))
    sandbox.pty.send_stdin(handle.pid, b"stty size | tr 0-9 a-j; tty | tr a-z A-Z\n")
    # "33 101" -> "dd bab"
    out.wait_for_pty(b"dd bab")
    out.wait_for_pty(b"/DEV/PTS/")


def test_pty_environment(sandbox, pty):
    handle, out = pty(envs={"WRENN_PTY_VAR": "abc"})
    sandbox.pty.send_stdin(handle.pid, b'echo "$WRENN_PTY_VAR-$TERM" | tr a-z A-Z\n')
    out.wait_for_pty(b"ABC-XTERM-256COLOR")


def test_pty_resize(sandbox, pty):
    handle, out = pty(size=PtySize(rows=24, cols=80))
    sandbox.pty.resize(handle.pid, PtySize(rows=50, cols=120))
    sandbox.pty.send_stdin(handle.pid, b"stty size | tr 0-9 a-j\n")
    # "50 120" -> "fa bca"
    out.wait_for_pty(b"fa bca")


def test_pty_exit_code(sandbox, pty):
    handle, out = pty()
    sandbox.pty.send_stdin(handle.pid, b"exit 7\n")
    out.join()
    assert isinstance(out.error, CommandExitException), out.error
    assert out.error.exit_code == 7


def test_pty_kill(sandbox, pty):
    handle, out = pty()
    sandbox.pty.send_stdin(handle.pid, b"echo $((2+3))ready\n")
    out.wait_for_pty(b"5ready")
    assert sandbox.pty.kill(handle.pid) is True
    out.join()
    assert isinstance(out.error, CommandExitException), out.error
    wait_until(lambda: all(p.pid != handle.pid for p in sandbox.commands.list()), timeout=5,
               message="killed PTY gone from commands.list()")


def test_pty_listed_while_running(sandbox, pty):
    handle, _out = pty()
    procs = {p.pid: p for p in sandbox.commands.list()}
    assert handle.pid in procs
    assert procs[handle.pid].cmd == "/bin/bash"
    assert procs[handle.pid].args == ["-i", "-l"]


def test_pty_connect(sandbox, pty):
    handle, _out = pty()
    second = sandbox.pty.connect(handle.pid)
    assert second.pid == handle.pid
    out2 = OutputCollector(second)
    sandbox.pty.send_stdin(handle.pid, b"echo $((6*7))conn\n")
    out2.wait_for_pty(b"42conn")


def test_pty_as_user(sandbox, pty, test_user):
    uid = int(sandbox.commands.run(f"id -u {test_user}").stdout)
    handle, out = pty(user=test_user)
    sandbox.pty.send_stdin(handle.pid, b"echo $(( $(id -u) + 1 ))uid; pwd | tr a-z A-Z\n")
    out.wait_for_pty(f"{uid + 1}uid".encode())
    out.wait_for_pty(f"/HOME/{test_user.upper()}".encode())


def test_pty_stream_input(sandbox, pty):
    handle, out = pty()
    sandbox.pty.stream_input(handle.pid, [b"echo $((9", b"*9))", b"sq\n"])
    out.wait_for_pty(b"81sq")
