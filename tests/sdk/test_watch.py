"""Directory watching.

The sync SDK polls: Filesystem.CreateWatcher, then GetWatcherEvents, then RemoveWatcher.
The async SDK streams: Filesystem.WatchDir (first message `start`, then `filesystem` events).
"""

import asyncio
import contextlib
import time

import pytest

from e2b import FileNotFoundException, FilesystemEventType, FileType, InvalidArgumentException

from support import wait_until


class EventLog:
    """Accumulates the events of a sync WatchHandle across polls."""

    def __init__(self, handle):
        self.handle = handle
        self.events = []

    def poll(self):
        self.events.extend(self.handle.get_new_events())
        return self.events

    def has(self, name, kind):
        return any(e.name == name and e.type == kind for e in self.events)

    def wait_for(self, name, kind, timeout=5.0):
        def seen():
            self.poll()
            return self.has(name, kind)

        wait_until(seen, timeout=timeout, interval=0.1,
                   message=lambda: f"{kind} event for {name!r}; got {[(e.name, e.type) for e in self.events]}")

    def settle(self, count, timeout=5.0):
        """All events once at least `count` arrived and a short quiet spell passed, as
        (name, type) pairs: what a sequence of exactly `count` events is compared with."""
        wait_until(lambda: len(self.poll()) >= count, timeout=timeout, interval=0.05,
                   message=lambda: f"{count} events; got {self.pairs()}")
        time.sleep(0.3)
        self.poll()
        return self.pairs()

    def pairs(self):
        return [(e.name, e.type) for e in self.events]


@contextlib.contextmanager
def watching(sandbox, path, **options):
    """Watch `path` (sync SDK, `watch_dir` options as given) for the length of the block,
    yielding an EventLog of its events; the watcher is removed when the block ends."""
    handle = sandbox.files.watch_dir(path, **options)
    try:
        yield EventLog(handle)
    finally:
        handle.stop()


CREATE, CHMOD, WRITE = FilesystemEventType.CREATE, FilesystemEventType.CHMOD, FilesystemEventType.WRITE
REMOVE, RENAME = FilesystemEventType.REMOVE, FilesystemEventType.RENAME


def test_watch_shell_write(sandbox, workdir):
    with watching(sandbox, workdir) as log:
        sandbox.commands.run(f"echo hi > {workdir}/shell.txt")
        log.wait_for("shell.txt", FilesystemEventType.CREATE)
        log.wait_for("shell.txt", FilesystemEventType.WRITE)
        sandbox.commands.run(f"rm {workdir}/shell.txt")
        log.wait_for("shell.txt", FilesystemEventType.REMOVE)


def test_watch_create_write_remove(sandbox, workdir):
    # E2B's envd writes an upload in place, so a watcher sees CREATE, CHMOD, WRITE on the
    # file's own name, as E2B's SDK tests assert.
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/watched.txt", "hello")
        log.wait_for("watched.txt", FilesystemEventType.CREATE)
        log.wait_for("watched.txt", FilesystemEventType.WRITE)
        sandbox.files.remove(f"{workdir}/watched.txt")
        log.wait_for("watched.txt", FilesystemEventType.REMOVE)
        assert all(e.entry is None for e in log.events)  # include_entry was not asked for
        # the upload wrote the file in place: no other (temporary) name shows up
        assert {e.name for e in log.events} == {"watched.txt"}, [(e.name, e.type) for e in log.events]


# --- exact sequences, as E2B's envd produces them (and E2B's SDK tests assert) ------------


def test_watch_new_file_is_create_chmod_write(sandbox, workdir):
    # E2B's test_watch_directory_changes: exactly 3 events, CREATE, CHMOD, WRITE.
    sandbox.files.make_dir(f"{workdir}/w")
    with watching(sandbox, f"{workdir}/w") as log:
        sandbox.files.write(f"{workdir}/w/test_watch.txt", "This file will be watched.")
        assert log.settle(3) == [("test_watch.txt", CREATE), ("test_watch.txt", CHMOD), ("test_watch.txt", WRITE)]


def test_watch_new_file_events_are_there_when_write_returns(sandbox, workdir):
    # E2B's own test polls once, right after the write.
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/at-once.txt", "now")
        events = log.handle.get_new_events()
        assert [(e.name, e.type) for e in events] == [("at-once.txt", CREATE), ("at-once.txt", CHMOD), ("at-once.txt", WRITE)]


def test_watch_overwrite_is_chmod_write(sandbox, workdir):
    path = f"{workdir}/over.txt"
    sandbox.files.write(path, "first")
    with watching(sandbox, workdir) as log:
        sandbox.files.write(path, "This file has been modified.")
        assert log.settle(2) == [("over.txt", CHMOD), ("over.txt", WRITE)]


def test_watch_empty_new_file_has_no_write(sandbox, workdir):
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/empty.txt", "")
        assert log.settle(2) == [("empty.txt", CREATE), ("empty.txt", CHMOD)]


def test_watch_metadata_adds_a_chmod(sandbox, workdir):
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/meta.txt", "m", metadata={"team": "blue"})
        assert log.settle(4) == [("meta.txt", CREATE), ("meta.txt", CHMOD), ("meta.txt", WRITE), ("meta.txt", CHMOD)]
        log.events.clear()
        sandbox.files.write(f"{workdir}/meta.txt", "n", metadata={"team": "red"})
        assert log.settle(3) == [("meta.txt", CHMOD), ("meta.txt", WRITE), ("meta.txt", CHMOD)]


def test_watch_recursive_new_file_is_create_chmod_write(sandbox, workdir):
    # E2B's test_watch_recursive_directory_changes: 3 events, the first a CREATE of the nested name.
    sandbox.files.make_dir(f"{workdir}/r/nested")
    with watching(sandbox, f"{workdir}/r", recursive=True) as log:
        sandbox.files.write(f"{workdir}/r/nested/test_watch.txt", "deep")
        name = "nested/test_watch.txt"
        assert log.settle(3) == [(name, CREATE), (name, CHMOD), (name, WRITE)]


def test_watch_make_dir_rename_remove_exactly(sandbox, workdir):
    with watching(sandbox, workdir) as log:
        sandbox.files.make_dir(f"{workdir}/made/inner")
        assert log.settle(2) == [("made", CREATE), ("made", CHMOD)]
        log.events.clear()
        sandbox.files.rename(f"{workdir}/made", f"{workdir}/moved")
        assert log.settle(2) == [("made", RENAME), ("moved", CREATE)]
        log.events.clear()
        sandbox.commands.run(f"chmod 700 {workdir}/moved")
        assert log.settle(1) == [("moved", CHMOD)]
        log.events.clear()
        sandbox.files.remove(f"{workdir}/moved")
        assert log.settle(1) == [("moved", REMOVE)]


def test_watch_rename_and_chmod(sandbox, workdir):
    sandbox.files.write(f"{workdir}/before.txt", "x")
    with watching(sandbox, workdir) as log:
        sandbox.files.rename(f"{workdir}/before.txt", f"{workdir}/after.txt")
        log.wait_for("before.txt", FilesystemEventType.RENAME)
        log.wait_for("after.txt", FilesystemEventType.CREATE)
        sandbox.commands.run(f"chmod 600 {workdir}/after.txt")
        log.wait_for("after.txt", FilesystemEventType.CHMOD)


def test_watch_is_not_recursive_by_default(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/sub/inner.txt", "in")
        sandbox.files.write(f"{workdir}/outer.txt", "out")
        log.wait_for("outer.txt", FilesystemEventType.CREATE)
        log.poll()
        assert not any(e.name.endswith("inner.txt") for e in log.events), log.events


def test_watch_recursive(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    with watching(sandbox, workdir, recursive=True) as log:
        sandbox.commands.run(f"echo in > {workdir}/sub/inner.txt")
        log.wait_for("sub/inner.txt", FilesystemEventType.CREATE)
        log.wait_for("sub/inner.txt", FilesystemEventType.WRITE)
        # a directory created after the watch started is watched too
        sandbox.files.make_dir(f"{workdir}/sub/new")
        # envd watches a new directory before it reports it: once its CREATE is seen, what
        # happens inside it is seen too (no pause needed).
        log.wait_for("sub/new", FilesystemEventType.CREATE)
        sandbox.commands.run(f"echo deep > {workdir}/sub/new/deep.txt")
        log.wait_for("sub/new/deep.txt", FilesystemEventType.CREATE)
        log.wait_for("sub/new/deep.txt", FilesystemEventType.WRITE)


def test_watch_include_entry(sandbox, workdir):
    with watching(sandbox, workdir, include_entry=True) as log:
        sandbox.commands.run(f"printf 12345 > {workdir}/entry.txt")
        log.wait_for("entry.txt", FilesystemEventType.WRITE)
        creates = [e for e in log.events if e.name == "entry.txt" and e.type == FilesystemEventType.CREATE]
        assert creates and creates[0].entry is not None
        assert creates[0].entry.path == f"{workdir}/entry.txt"
        assert creates[0].entry.name == "entry.txt"
        assert creates[0].entry.type == FileType.FILE


def test_watch_events_are_drained(sandbox, workdir):
    with watching(sandbox, workdir) as log:
        sandbox.files.write(f"{workdir}/once.txt", "1")
        # An upload's last event is its WRITE: once it is in, every event is.
        log.wait_for("once.txt", FilesystemEventType.WRITE)
        # every event is returned by exactly one get_new_events call
        assert log.handle.get_new_events() == []
        assert log.pairs() == [("once.txt", CREATE), ("once.txt", CHMOD), ("once.txt", WRITE)]


def test_watch_a_file_is_refused(sandbox, workdir):
    sandbox.files.write(f"{workdir}/plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(f"{workdir}/plain.txt")


def test_watch_missing_dir(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{workdir}/does-not-exist")


async def test_async_watch_dir_stream(async_sandbox, workdir):
    events = []
    exits = []
    handle = await async_sandbox.files.watch_dir(
        workdir, on_event=events.append, on_exit=exits.append, recursive=True, timeout=30
    )
    try:
        await async_sandbox.files.make_dir(f"{workdir}/adir")
        # envd watches a new directory before it reports it (see test_watch_recursive).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(e.name == "adir" for e in events):
            await asyncio.sleep(0.05)
        await async_sandbox.commands.run(f"echo s > {workdir}/adir/streamed.txt")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(e.name == "adir/streamed.txt" and e.type == FilesystemEventType.WRITE for e in events):
                break
            await asyncio.sleep(0.05)
        kinds = {(e.name, e.type) for e in events}
        assert ("adir", FilesystemEventType.CREATE) in kinds, kinds
        assert ("adir/streamed.txt", FilesystemEventType.CREATE) in kinds, kinds
        assert ("adir/streamed.txt", FilesystemEventType.WRITE) in kinds, kinds
        assert exits == []  # the stream is still open
    finally:
        await handle.stop()
    assert exits == [None]


async def test_async_watch_dir_stream_upload_sequence(async_sandbox, workdir):
    events = []
    handle = await async_sandbox.files.watch_dir(workdir, on_event=events.append, timeout=30)
    try:
        await async_sandbox.files.write(f"{workdir}/streamed.txt", "s")
        deadline = time.monotonic() + 5
        while len(events) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert [(e.name, e.type) for e in events] == [
            ("streamed.txt", CREATE), ("streamed.txt", CHMOD), ("streamed.txt", WRITE)
        ]
    finally:
        await handle.stop()


async def test_async_watch_dir_timeout_ends_the_stream(async_sandbox, workdir):
    exits = []
    await async_sandbox.files.watch_dir(workdir, on_event=lambda e: None, on_exit=exits.append, timeout=1)
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(exits) == 1
    assert exits[0] is not None  # the stream ended with deadline_exceeded


async def test_async_watch_missing_dir(async_sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.watch_dir(f"{workdir}/missing", on_event=lambda e: None)
