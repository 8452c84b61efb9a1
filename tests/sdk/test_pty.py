"""`sandbox.pty`: Process.Start with `pty.size`, input via SendInput{pty}, resize via Update.

Each typed command prints something its own echoed input does not contain (arithmetic,
upper-casing), so finding the expected text proves the command ran.
"""

import asyncio

import pytest

from e2b import CommandExitException, PtySize

from support import OutputCollector, screen_lines, wait_until


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


def _type(sandbox, pid, *lines):
    for line in lines:
        sandbox.pty.send_stdin(pid, line)


def test_pty_connect_gets_command_output_while_the_first_handle_is_open(sandbox):
    # The case: a second handle on the terminal, then `export FOO=bar` and `echo $FOO`
    # typed: the second handle sees the output line `bar`, not only the echo of the typing. The
    # first handle stays open and unread.
    handle = sandbox.pty.create(size=PtySize(rows=24, cols=80))
    try:
        second = sandbox.pty.connect(handle.pid)
        assert second.pid == handle.pid
        out2 = OutputCollector(second)
        _type(sandbox, handle.pid, b"export FOO=bar\n", b"echo $FOO\n")
        out2.wait_for_pty_line("bar")
    finally:
        sandbox.pty.kill(handle.pid)


def test_pty_connect_and_the_first_handle_both_get_everything(sandbox, pty):
    handle, out1 = pty()
    second = sandbox.pty.connect(handle.pid)
    out2 = OutputCollector(second)
    third = sandbox.pty.connect(handle.pid)
    out3 = OutputCollector(third)
    # a fourth handle that nobody reads, then leaves
    fourth = sandbox.pty.connect(handle.pid)
    _type(sandbox, handle.pid, b"export FOO=bar\n", b"echo $FOO\n")
    for out in (out1, out2, out3):
        out.wait_for_pty_line("bar")
    fourth.disconnect()
    _type(sandbox, handle.pid, b"echo $((6*7))$FOO\n")
    for out in (out1, out2, out3):
        out.wait_for_pty_line("42bar")


def test_pty_connect_after_the_first_handle_disconnected(sandbox):
    handle = sandbox.pty.create(size=PtySize(rows=24, cols=80))
    try:
        handle.disconnect()
        second = sandbox.pty.connect(handle.pid)
        out2 = OutputCollector(second)
        _type(sandbox, handle.pid, b"export FOO=bar\n", b"echo $FOO\n")
        out2.wait_for_pty_line("bar")
        # and it sees the end
        _type(sandbox, handle.pid, b"exit\n")
        out2.join()
        assert out2.error is None and out2.result.exit_code == 0, (out2.error, out2.pty)
    finally:
        try:
            sandbox.pty.kill(handle.pid)
        except Exception:
            pass


def test_pty_connect_after_the_first_handle_was_dropped(sandbox):
    # Dropped without disconnect(): its stream is closed when the handle is collected.
    import gc

    handle = sandbox.pty.create(size=PtySize(rows=24, cols=80))
    pid = handle.pid
    try:
        del handle
        gc.collect()
        second = sandbox.pty.connect(pid)
        out2 = OutputCollector(second)
        _type(sandbox, pid, b"export FOO=bar\n", b"echo $FOO\n")
        out2.wait_for_pty_line("bar")
    finally:
        sandbox.pty.kill(pid)


def test_e2b_connect_to_pty(sandbox):
    # E2B's python-sdk tests/sync/sandbox_sync/pty/test_pty_connect.py.
    output = []
    terminal = sandbox.pty.create(PtySize(80, 24), envs={"FOO": "bar"})
    sandbox.pty.send_stdin(terminal.pid, b"echo $FOO\n")
    terminal.disconnect()
    reconnect_handle = sandbox.pty.connect(terminal.pid)
    sandbox.pty.send_stdin(terminal.pid, b"echo $FOO\nexit\n")
    result = reconnect_handle.wait(on_pty=lambda x: output.append(x.decode("utf-8")))
    assert terminal.pid == reconnect_handle.pid
    assert result.exit_code == 0
    assert "bar" in screen_lines("".join(output).encode())


async def test_e2b_connect_to_pty_async(async_sandbox):
    # E2B's python-sdk tests/async/sandbox_async/pty/test_pty_connect.py.
    output1, output2 = bytearray(), bytearray()
    terminal = await async_sandbox.pty.create(PtySize(80, 24), on_data=output1.extend, envs={"FOO": "bar"})
    await async_sandbox.pty.send_stdin(terminal.pid, b"echo $FOO\n")
    await asyncio.sleep(0.3)
    await terminal.disconnect()
    reconnect_handle = await async_sandbox.pty.connect(terminal.pid, on_data=output2.extend)
    await async_sandbox.pty.send_stdin(terminal.pid, b"echo $FOO\nexit\n")
    await reconnect_handle.wait()
    assert terminal.pid == reconnect_handle.pid
    assert reconnect_handle.exit_code == 0
    assert "bar" in screen_lines(bytes(output1))
    assert "bar" in screen_lines(bytes(output2))


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
