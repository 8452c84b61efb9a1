"""The real `e2b` SDK's snapshots, forks and pauses without memory against `wrenn up`: a snapshot
starts sandboxes with the files and the running processes of its moment, a fork makes sandboxes
that diverge from one checkpoint, a pause may keep the disk alone, and nothing is left once every
sandbox and snapshot is deleted."""

import glob
import json
import os
import subprocess
import time
import urllib.request

import pytest
from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException

# A process that appends a line to ~/ticks every 0.2 s, started in the background.
TICKER = "nohup sh -c 'while true; do date +%s%N >> /home/user/ticks; sleep 0.2; done' >/dev/null 2>&1 & echo $!"


def ticking(sandbox: Sandbox, pid: str) -> tuple[bool, int]:
    """Whether the ticker `pid` runs in `sandbox`, and how many lines it has written."""
    out = sandbox.commands.run(
        f"kill -0 {pid} 2>/dev/null && echo alive || echo gone; cat /home/user/ticks 2>/dev/null | wc -l"
    ).stdout.split()
    return out[0] == "alive", int(out[1])


def still_ticking(sandbox: Sandbox, pid: str) -> bool:
    alive, before = ticking(sandbox, pid)
    time.sleep(1.2)
    _, after = ticking(sandbox, pid)
    return alive and after > before


def test_a_snapshot_starts_sandboxes_with_its_files_and_running_processes(wrenn):
    source = Sandbox.create(timeout=300, envs={"ORIGIN": "source"})
    made = []
    try:
        source.files.write("/home/user/before.txt", "written before the snapshot\n")
        pid = source.commands.run(TICKER).stdout.strip()
        snapshot = source.create_snapshot("sdk-snap")
        assert snapshot.snapshot_id == "sdk-snap:default"
        assert snapshot.names == ["sdk-snap:default"]
        # The source goes on, and what it does next stays its own.
        assert source.is_running()
        assert still_ticking(source, pid)
        source.files.write("/home/user/after.txt", "written after the snapshot\n")

        for _ in range(3):
            made.append(Sandbox.create(snapshot.snapshot_id, timeout=120))
        ids = {sandbox.sandbox_id for sandbox in made}
        assert len(ids) == 3 and source.sandbox_id not in ids
        for sandbox in made:
            assert sandbox.files.read("/home/user/before.txt") == "written before the snapshot\n"
            assert not sandbox.files.exists("/home/user/after.txt")
            assert still_ticking(sandbox, pid), "the process started before the snapshot runs"
            assert sandbox.commands.run("echo $ORIGIN").stdout == "source\n"
        # They diverge: a file one writes is in neither the others nor the source.
        made[0].files.write("/home/user/mine.txt", "the first one's\n")
        for other in [made[1], made[2], source]:
            assert not other.files.exists("/home/user/mine.txt")
        assert source.files.read("/home/user/after.txt") == "written after the snapshot\n"

        # Listed (by its sandbox, by name); a snapshot a sandbox was made from is not deleted.
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert listed == ["sdk-snap:default"]
        with pytest.raises(SandboxException) as refused:
            Sandbox.delete_snapshot(snapshot.snapshot_id)
        assert "409" in str(refused.value) and "in use" in str(refused.value)
    finally:
        for sandbox in made:
            sandbox.kill()
        source.kill()
    # Once they are gone, it is; it survived its source.
    assert Sandbox.delete_snapshot("sdk-snap:default") is True
    assert Sandbox.delete_snapshot("sdk-snap:default") is False
    assert Sandbox.list_snapshots(name="sdk-snap").next_items() == []


def test_snapshots_are_listed_a_page_at_a_time_and_only_to_their_team(wrenn):
    source = Sandbox.create(timeout=300)
    try:
        taken = [source.create_snapshot().snapshot_id for _ in range(3)]
        assert len(set(taken)) == 3 and all(s.endswith(":default") for s in taken)
        paginator = Sandbox.list_snapshots(sandbox_id=source.sandbox_id, limit=2)
        pages = []
        while paginator.has_next:
            pages.append([s.snapshot_id for s in paginator.next_items()])
        assert [len(page) for page in pages] == [2, 1]
        assert sorted(sum(pages, [])) == sorted(taken)

        other_key = wrenn.new_team_key("snapshot-outsiders")
        assert Sandbox.list_snapshots(api_key=other_key).next_items() == []
        with pytest.raises(SandboxException) as refused:
            Sandbox.create(taken[0], api_key=other_key, timeout=60)
        assert "404" in str(refused.value)
        assert Sandbox.delete_snapshot(taken[0], api_key=other_key) is False
        with pytest.raises(NotFoundException):
            Sandbox.create_snapshot(source.sandbox_id, api_key=other_key)
    finally:
        source.kill()
    for snapshot in taken:
        assert Sandbox.delete_snapshot(snapshot) is True


def test_a_fork_makes_sandboxes_that_diverge_from_one_checkpoint(wrenn):
    source = Sandbox.create(timeout=300, envs={"ORIGIN": "source"})
    forks = []
    try:
        source.files.write("/home/user/state.txt", "shared state\n")
        pid = source.commands.run(TICKER).stdout.strip()
        source_end = source.get_info().end_at
        results = source.fork(count=3, timeout=120)
        assert all(not isinstance(fork, Exception) for fork in results), results
        forks = results
        assert len({fork.sandbox_id for fork in forks} | {source.sandbox_id}) == 4
        for i, fork in enumerate(forks):
            assert fork.files.read("/home/user/state.txt") == "shared state\n"
            assert still_ticking(fork, pid)
            assert fork.commands.run("echo $ORIGIN").stdout == "source\n"
            fork.files.write("/home/user/state.txt", f"fork {i}\n")
        for i, fork in enumerate(forks):
            assert fork.files.read("/home/user/state.txt") == f"fork {i}\n"
        # The source is unchanged: its id, its end, its files and processes.
        assert source.files.read("/home/user/state.txt") == "shared state\n"
        assert source.get_info().end_at == source_end
        assert still_ticking(source, pid)
        # Forks are the team's sandboxes like any other; a fork's own token guards it.
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        assert {fork.sandbox_id for fork in forks} <= listed
    finally:
        for fork in forks:
            fork.kill()
    # A paused sandbox cannot be forked; a killed one is not found.
    source.pause()
    with pytest.raises(SandboxException) as refused:
        Sandbox.fork(source.sandbox_id, count=1)
    assert "409" in str(refused.value) and "paused" in str(refused.value)
    source.kill()
    with pytest.raises(NotFoundException):
        Sandbox.fork(source.sandbox_id, count=1)


def detail(wrenn, sandbox_id: str) -> dict:
    """`GET /sandboxes/{id}` as the REST API answers it (the SDK's SandboxInfo leaves out
    `pauseMode` and `envdAccessToken`)."""
    request = urllib.request.Request(
        f"{wrenn.api_url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": wrenn.key}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_a_pause_without_memory_keeps_the_files_the_token_and_the_variables(wrenn):
    sandbox = Sandbox.create(timeout=300, envs={"KEPT": "yes"})
    try:
        token = detail(wrenn, sandbox.sandbox_id)["envdAccessToken"]
        sandbox.files.write("/home/user/kept.txt", "on the disk\n")
        pid = sandbox.commands.run(TICKER).stdout.strip()
        assert still_ticking(sandbox, pid)
        assert sandbox.pause(mode="filesystem") is True
        paused = detail(wrenn, sandbox.sandbox_id)
        assert (paused["state"], paused["pauseMode"]) == ("paused", "filesystem")
        assert sandbox.pause(mode="filesystem") is False, "already paused"
        sandbox.connect(timeout=300)
        resumed = detail(wrenn, sandbox.sandbox_id)
        assert resumed["state"] == "running" and "pauseMode" not in resumed
        assert resumed["envdAccessToken"] == token
        # The SDK's handle still holds that token: envd takes it.
        assert sandbox.files.read("/home/user/kept.txt") == "on the disk\n"
        alive, ticks = ticking(sandbox, pid)
        assert not alive, "a boot leaves no process of before"
        assert ticks > 0, "what the process wrote before the pause is on the disk"
        assert sandbox.commands.run("echo $KEPT").stdout == "yes\n"
        # A pause with the memory, for comparison, says so.
        assert sandbox.pause() is True
        assert detail(wrenn, sandbox.sandbox_id)["pauseMode"] == "full"
    finally:
        sandbox.kill()


def test_the_cli_snapshots_forks_lists_and_deletes(wrenn):
    env = dict(os.environ, WRENN_API_URL=wrenn.api_url, WRENN_API_KEY=wrenn.key)

    def cli(*args, check=True):
        return subprocess.run([wrenn.binary, *args, "--json"], capture_output=True, text=True,
                              timeout=600, env=env, check=check)

    source = Sandbox.create(timeout=300)
    try:
        taken = json.loads(cli("sandbox", "snapshot", source.sandbox_id, "--name", "cli-snap").stdout)
        assert taken["snapshotID"] == "cli-snap:default"
        listed = json.loads(cli("snapshot", "list", "--sandbox", source.sandbox_id).stdout)
        assert [s["snapshotID"] for s in listed] == ["cli-snap:default"]
        forks = json.loads(cli("sandbox", "fork", source.sandbox_id, "-n", "2", "--timeout", "60").stdout)
        assert len(forks) == 2 and all("sandbox" in fork for fork in forks), forks
        for fork in forks:
            cli("sandbox", "kill", fork["sandbox"]["sandboxID"])
    finally:
        source.kill()
    cli("snapshot", "delete", "cli-snap")
    assert json.loads(cli("snapshot", "list").stdout) == []


def test_nothing_is_left_once_every_sandbox_and_snapshot_is_gone(wrenn):
    # The tests above deleted what they made: no snapshot is listed, and the host keeps no
    # snapshot's template nor any fork's checkpoint (both name the sandbox they were taken of).
    assert Sandbox.list_snapshots().next_items() == []
    left = []
    for record in glob.glob(os.path.join(wrenn.data, "agent", "templates", "*", "template.json")):
        with open(record) as f:
            if json.load(f).get("source_sandbox"):
                left.append(os.path.basename(os.path.dirname(record)))
    assert left == [], f"checkpoints left on the host: {left}"
    # Nor anything in the template store of theirs.
    stored = glob.glob(os.path.join(wrenn.data, "template-store", "templates", "*.json"))
    for artifact in stored:
        with open(artifact) as f:
            assert not json.load(f)["record"].get("source_sandbox"), artifact
