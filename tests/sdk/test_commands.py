"""`sandbox.commands.run`: the SDK sends Process.Start{cmd:"/bin/bash", args:["-l","-c",cmd]}."""

import time
import uuid

import pytest

from e2b import (
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    SandboxException,
    TimeoutException,
)

from support import wait_until


def test_stdout(sandbox):
    r = sandbox.commands.run("echo hello")
    assert r.stdout == "hello\n"
    assert r.stderr == ""
    assert r.exit_code == 0
    assert r.error is None


def test_stderr(sandbox):
    r = sandbox.commands.run("echo oops >&2")
    assert r.stdout == ""
    assert r.stderr == "oops\n"
    assert r.exit_code == 0


def test_stdout_and_stderr_are_kept_apart(sandbox):
    r = sandbox.commands.run("echo a; echo b >&2; echo c; echo d >&2")
    assert r.stdout == "a\nc\n"
    assert r.stderr == "b\nd\n"


def test_nonzero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("echo out; echo err >&2; exit 3")
    e = info.value
    assert isinstance(e, SandboxException)
    assert e.exit_code == 3
    assert e.stderr == "err\n"
    assert e.stdout == "out\n"


def test_exit_code_of_a_failing_command(sandbox):
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("ls /definitely/not/here")
    assert info.value.exit_code == 2
    assert "/definitely/not/here" in info.value.stderr


def test_exit_code_of_a_signalled_process_is_minus_one(sandbox):
    # envd reports ProcessState.ExitCode(): -1 when the process was killed by a signal.
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("kill -9 $$")
    assert info.value.exit_code == -1


def test_large_output_is_streamed_completely(sandbox):
    r = sandbox.commands.run("seq 1 200000")
    lines = r.stdout.splitlines()
    assert len(lines) == 200000
    assert lines[0] == "1" and lines[-1] == "200000"


def test_background_and_wait(sandbox):
    handle = sandbox.commands.run("sleep 0.3; echo done", background=True)
    assert isinstance(handle.pid, int) and handle.pid > 0
    r = handle.wait()
    assert r.stdout == "done\n"
    assert r.exit_code == 0


def test_background_wait_raises_on_nonzero_exit(sandbox):
    handle = sandbox.commands.run("echo bye >&2; exit 5", background=True)
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == 5
    assert info.value.stderr == "bye\n"


def test_background_handle_iterates_output(sandbox):
    handle = sandbox.commands.run("echo one; echo two >&2", background=True)
    stdout, stderr = "", ""
    for out, err, _pty in handle:
        stdout += out or ""
        stderr += err or ""
    assert stdout == "one\n"
    assert stderr == "two\n"


def _processes_with_marker(sandbox, marker):
    return [p for p in sandbox.commands.list() if any(marker in a for a in p.args)]


def test_timeout_raises_and_kills_the_process(sandbox):
    # The SDK sends Connect-Timeout-Ms: 1000; envd must kill the process when it expires.
    marker = f"timeout-marker-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep 60 # {marker}", timeout=1)
    # Not a speed target: the call must end at its timeout, not with the process (60 s).
    assert time.monotonic() - started < 30
    wait_until(lambda: not _processes_with_marker(sandbox, marker), timeout=5,
               message="the timed-out process is gone from commands.list()")


def test_background_timeout_kills_the_process(sandbox):
    marker = f"bg-timeout-marker-{uuid.uuid4().hex[:8]}"
    handle = sandbox.commands.run(f"sleep 10 # {marker}", background=True, timeout=1)
    pid = handle.pid
    assert any(p.pid == pid for p in sandbox.commands.list())
    with pytest.raises(TimeoutException):
        handle.wait()
    wait_until(lambda: all(p.pid != pid for p in sandbox.commands.list()), timeout=5,
               message=f"pid {pid} gone from commands.list() after its timeout")


def test_envs(sandbox):
    r = sandbox.commands.run('echo "$FOO|$WITH_SPACE"', envs={"FOO": "bar", "WITH_SPACE": "a b=c"})
    assert r.stdout == "bar|a b=c\n"


def test_sandbox_env_marker(sandbox):
    # envd exports E2B_SANDBOX=true to every process.
    r = sandbox.commands.run("echo $E2B_SANDBOX")
    assert r.stdout == "true\n"


def test_cwd(sandbox, workdir):
    r = sandbox.commands.run("pwd", cwd=workdir)
    assert r.stdout == f"{workdir}\n"


def test_missing_cwd_is_an_invalid_argument(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/nonexistent/wrenn-sdk-test")


def test_default_user_is_user(sandbox, test_user):
    # No /init named a default user: envd runs calls as `user`, in its home, as E2B's templates
    # do (envd falls back to root only where `user` does not exist; a unit test covers that).
    uid = sandbox.commands.run(f"id -u {test_user}", user="root").stdout.strip()
    r = sandbox.commands.run('whoami; echo "$HOME"; echo "$USER"; pwd; id -u')
    assert r.stdout.splitlines() == [test_user, f"/home/{test_user}", test_user, f"/home/{test_user}", uid]


def test_naming_root_runs_as_root(sandbox):
    r = sandbox.commands.run('whoami; echo "$HOME"; pwd; id -u', user="root")
    assert r.stdout.splitlines() == ["root", "/root", "/root", "0"]


def test_run_as_user(sandbox, test_user):
    # what the system says about the user, asked as root
    uid = sandbox.commands.run(f"id -u {test_user}", user="root").stdout.strip()
    expected_groups = sandbox.commands.run(f"id -G {test_user}", user="root").stdout.split()
    r = sandbox.commands.run('whoami; echo "$HOME"; echo "$USER"; pwd; id -u; id -G', user=test_user)
    lines = r.stdout.splitlines()
    assert lines[:5] == [test_user, f"/home/{test_user}", test_user, f"/home/{test_user}", uid]
    assert sorted(lines[5].split()) == sorted(expected_groups)


def test_unknown_user_is_rejected(sandbox):
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("true", user="no-such-user-wrenn")


def test_invalid_utf8_becomes_replacement_characters(sandbox):
    r = sandbox.commands.run(r"printf 'a\xff\xfeb'")
    assert r.stdout == "a\ufffd\ufffdb"


def test_output_callbacks(sandbox):
    out, err = [], []
    r = sandbox.commands.run(
        "echo a; echo b >&2; echo c",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "a\nc\n"
    assert "".join(err) == "b\n"
    assert r.stdout == "a\nc\n"


def test_stdin_is_closed_without_stdin_flag(sandbox):
    # Without stdin=True the process gets no input: `cat` ends at once with no output.
    r = sandbox.commands.run("cat", timeout=10)
    assert r.stdout == ""


def test_stdin_send_and_close(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    handle.send_stdin("hello ")
    handle.send_stdin(b"world\n")
    handle.close_stdin()
    r = handle.wait()
    assert r.stdout == "hello world\n"


def test_stdin_read_line(sandbox):
    handle = sandbox.commands.run('read line; echo "got:$line"', background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "abc\n")
    r = handle.wait()
    assert r.stdout == "got:abc\n"
