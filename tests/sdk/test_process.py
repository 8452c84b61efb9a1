"""Managing running processes: commands.connect / list / kill / send_stdin / close_stdin / stream_input."""

import uuid

import pytest

from e2b import CommandExitException, NotFoundException

from support import OutputCollector, wait_until


def test_connect_receives_subsequent_output(sandbox):
    first = sandbox.commands.run('read x; echo "got:$x"; read y; echo "then:$y"', background=True, stdin=True)
    pid = first.pid
    first.disconnect()  # disconnecting must not kill the process

    second = sandbox.commands.connect(pid)
    assert second.pid == pid
    collector = OutputCollector(second)
    sandbox.commands.send_stdin(pid, "one\n")
    collector.wait_for_stdout("got:one\n")
    sandbox.commands.send_stdin(pid, "two\n")
    collector.join()
    assert collector.error is None, collector.error
    assert collector.result.stdout == "got:one\nthen:two\n"
    assert collector.result.exit_code == 0


def test_two_handles_see_the_same_output(sandbox):
    first = sandbox.commands.run('read x; echo "echo:$x"', background=True, stdin=True)
    second = sandbox.commands.connect(first.pid)
    c1, c2 = OutputCollector(first), OutputCollector(second)
    first.send_stdin("hi\n")
    c1.join()
    c2.join()
    assert c1.error is None and c2.error is None, (c1.error, c2.error)
    assert c1.result.stdout == "echo:hi\n"
    assert c2.result.stdout == "echo:hi\n"


def test_connect_to_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(2_000_000_000)


def test_list_shows_running_commands(sandbox, workdir):
    marker = f"list-marker-{uuid.uuid4().hex[:8]}"
    cmd = f"sleep 30 # {marker}"
    handle = sandbox.commands.run(cmd, background=True, envs={"MARK": marker}, cwd=workdir)
    try:
        procs = {p.pid: p for p in sandbox.commands.list()}
        assert handle.pid in procs, f"pid {handle.pid} not in {sorted(procs)}"
        p = procs[handle.pid]
        assert p.cmd == "/bin/bash"
        assert p.args == ["-l", "-c", cmd]
        assert p.envs.get("MARK") == marker
        assert p.cwd == workdir
        assert p.tag is None
    finally:
        assert handle.kill() is True


def test_kill_running_command(sandbox):
    marker = f"kill-marker-{uuid.uuid4().hex[:8]}"
    handle = sandbox.commands.run(f"sleep 30 # {marker}", background=True)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1  # killed by SIGKILL
    wait_until(lambda: all(p.pid != handle.pid for p in sandbox.commands.list()), timeout=5,
               message="killed process gone from commands.list()")


def test_kill_unknown_pid_returns_false(sandbox):
    assert sandbox.commands.kill(2_000_000_000) is False


def test_send_stdin_to_cat(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "abc\n")
    sandbox.commands.send_stdin(handle.pid, b"\x00\x01binary\n")
    sandbox.commands.close_stdin(handle.pid)
    r = handle.wait()
    assert r.stdout == "abc\n\x00\x01binary\n"


def test_send_stdin_to_unknown_pid(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(2_000_000_000, "x")


def test_stream_input(sandbox):
    # SDK 2.63 sends these chunks over one client-streaming Process.StreamInput call.
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["first\n", b"second\n", "third\n"])
    sandbox.commands.close_stdin(handle.pid)
    r = handle.wait()
    assert r.stdout == "first\nsecond\nthird\n"
