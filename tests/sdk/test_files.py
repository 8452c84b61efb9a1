"""`sandbox.files`: GET/POST /files (read/write) and the Filesystem RPCs."""

import datetime
import gzip
import io
import os
import uuid

import httpx
import pytest

from e2b import (
    AuthenticationException,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry


# --- read / write -------------------------------------------------------------------------


def test_write_and_read_text(sandbox, workdir):
    path = f"{workdir}/hello.txt"
    info = sandbox.files.write(path, "hello wörld\n")
    assert info.path == path
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(path) == "hello wörld\n"
    assert sandbox.commands.run(f"cat {path}").stdout == "hello wörld\n"


def test_write_and_read_bytes(sandbox, workdir):
    path = f"{workdir}/all-bytes.bin"
    data = bytes(range(256)) * 4
    sandbox.files.write(path, data)
    content = sandbox.files.read(path, format="bytes")
    assert isinstance(content, bytearray)
    assert bytes(content) == data
    assert sandbox.commands.run(f"stat -c %s {path}").stdout.strip() == str(len(data))


def test_read_stream(sandbox, workdir):
    path = f"{workdir}/big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    sandbox.files.write(path, data)
    with sandbox.files.read(path, format="stream") as stream:
        chunks = list(stream)
    assert b"".join(chunks) == data


def test_write_file_like_object_uses_octet_stream(sandbox, workdir):
    # A file-like object makes the SDK upload with Content-Type: application/octet-stream.
    path = f"{workdir}/from-io.bin"
    data = os.urandom(200_000)
    info = sandbox.files.write(path, io.BytesIO(data))
    assert info.path == path
    assert bytes(sandbox.files.read(path, format="bytes")) == data


def test_write_iterable_of_chunks(sandbox, workdir):
    path = f"{workdir}/chunks.txt"
    sandbox.files.write(path, (f"line {i}\n".encode() for i in range(1000)))
    assert sandbox.files.read(path) == "".join(f"line {i}\n" for i in range(1000))


def test_write_empty_file(sandbox, workdir):
    path = f"{workdir}/empty"
    sandbox.files.write(path, "")
    assert sandbox.files.read(path) == ""
    assert sandbox.files.get_info(path).size == 0


def test_write_files_many_at_once(sandbox, workdir):
    # Several str/bytes entries go in one multipart request; each part's filename is its path.
    entries = [
        {"path": f"{workdir}/multi/a.txt", "data": "A"},
        {"path": f"{workdir}/multi/sub/b.txt", "data": b"BB"},
        {"path": f"{workdir}/multi/c with space.txt", "data": "CCC"},
    ]
    infos = sandbox.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    assert all(i.type == FileType.FILE for i in infos)
    assert sandbox.files.read(f"{workdir}/multi/a.txt") == "A"
    assert sandbox.files.read(f"{workdir}/multi/sub/b.txt") == "BB"
    assert sandbox.files.read(f"{workdir}/multi/c with space.txt") == "CCC"


def test_write_creates_parent_directories(sandbox, workdir):
    path = f"{workdir}/a/b/c/deep.txt"
    sandbox.files.write(path, "deep")
    assert sandbox.files.read(path) == "deep"
    assert sandbox.files.get_info(f"{workdir}/a/b").type == FileType.DIR


def _assert_made_for(sandbox, user, dirs):
    """Each of `dirs` was created by envd for `user`: owned by them, mode 0755."""
    for d in dirs:
        info = sandbox.files.get_info(d)
        assert info.type == FileType.DIR, d
        assert (info.owner, info.permissions, info.mode & 0o777) == (user, "drwxr-xr-x", 0o755), d


def test_write_files_into_new_directories_as_the_default_user(sandbox, test_user):
    # The default user is `user`, who may not write `/`: envd still creates every missing
    # directory (0755, owned by `user`, top-down) and writes the files, as E2B's envd does.
    tag = uuid.uuid4().hex[:8]
    home = f"/home/{test_user}"
    top0, top1, in_tmp, rel = f"/wrenn-sdk-{tag}-0", f"/wrenn-sdk-{tag}-1", f"/tmp/wrenn-sdk-{tag}", f"wrenn-sdk-{tag}"
    entries = [
        WriteEntry(path=f"{top0}/multi_test_file0.txt", data="zero"),
        WriteEntry(path=f"{top1}/deep/multi_test_file1.txt", data="one"),
        WriteEntry(path=f"{in_tmp}/a/b/multi_test_file2.txt", data=b"two"),
        WriteEntry(path=f"{rel}/x/multi_test_file3.txt", data="three"),
        WriteEntry(path=f"{rel}/x/y/multi_test_file4.txt", data="four"),
    ]
    expected = [e["path"] if e["path"].startswith("/") else f"{home}/{e['path']}" for e in entries]
    try:
        infos = sandbox.files.write_files(entries)
        assert [i.path for i in infos] == expected
        for path, entry in zip(expected, entries):
            data = entry["data"]
            assert sandbox.files.read(path) == (data.decode() if isinstance(data, bytes) else data)
            assert sandbox.files.get_info(path).owner == test_user
        _assert_made_for(sandbox, test_user, [
            top0, top1, f"{top1}/deep", f"{in_tmp}/a", f"{in_tmp}/a/b",
            f"{home}/{rel}", f"{home}/{rel}/x", f"{home}/{rel}/x/y",
        ])
        # /tmp existed: it is untouched
        assert sandbox.files.get_info("/tmp").owner == "root"
    finally:
        for path in (top0, top1, in_tmp, f"{home}/{rel}"):
            sandbox.files.remove(path, user="root")


@pytest.mark.parametrize("how", ["multipart", "octet-stream", "gzip"])
def test_write_into_a_new_directory_outside_home(sandbox, test_user, how):
    # files.write with one entry: a one-part multipart upload, a raw body, a gzip-encoded body.
    top = f"/wrenn-sdk-{uuid.uuid4().hex[:8]}"
    path = f"{top}/sub/single.txt"
    kwargs = {"multipart": {}, "octet-stream": {"use_octet_stream": True}, "gzip": {"gzip": True}}[how]
    try:
        info = sandbox.files.write(path, f"via {how}", **kwargs)
        assert info.path == path
        assert sandbox.files.read(path) == f"via {how}"
        assert sandbox.files.get_info(path).owner == test_user
        _assert_made_for(sandbox, test_user, [top, f"{top}/sub"])
    finally:
        sandbox.files.remove(top, user="root")


def test_write_into_an_existing_directory_keeps_the_permission_check(sandbox, test_user):
    # `/` exists and is root's: the default user (`user`) may not add a file to it.
    path = f"/wrenn-sdk-{uuid.uuid4().hex[:8]}.txt"
    with pytest.raises((SandboxException, AuthenticationException)):
        sandbox.files.write(path, "no")
    assert sandbox.files.exists(path) is False


def test_write_through_a_file_is_an_error(sandbox, workdir):
    sandbox.files.write(f"{workdir}/plain", "x")
    with pytest.raises(SandboxException):
        sandbox.files.write(f"{workdir}/plain/sub/f.txt", "no")
    with pytest.raises(SandboxException):
        sandbox.files.write(f"{workdir}/plain/f.txt", "no")
    assert sandbox.files.read(f"{workdir}/plain") == "x"


def test_overwrite_truncates(sandbox, workdir):
    path = f"{workdir}/over.txt"
    sandbox.files.write(path, "a much longer original content")
    sandbox.files.write(path, "short")
    assert sandbox.files.read(path) == "short"


def test_relative_path_is_under_home(sandbox, test_user):
    # The default user is `user`, so a relative path is under /home/user.
    name = f"wrenn-sdk-rel-{uuid.uuid4().hex[:8]}.txt"
    home = f"/home/{test_user}"
    try:
        info = sandbox.files.write(name, "rel")
        assert info.path == f"{home}/{name}"
        assert sandbox.files.read(f"{home}/{name}") == "rel"
        assert sandbox.files.read(name) == "rel"
        assert sandbox.files.get_info(name).owner == test_user
        assert name in [e.name for e in sandbox.files.list(".")]
    finally:
        sandbox.files.remove(f"{home}/{name}")


def test_read_missing_file(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")
    assert issubclass(FileNotFoundException, NotFoundException)


def test_read_a_directory_is_an_invalid_argument(sandbox, workdir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)


def test_write_to_a_directory_is_an_invalid_argument(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/adir")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{workdir}/adir", "x")
    assert sandbox.files.get_info(f"{workdir}/adir").type == FileType.DIR


# --- gzip -------------------------------------------------------------------------------


def test_gzip_write_and_read(sandbox, workdir):
    # gzip=True: upload as octet-stream with Content-Encoding: gzip; download with Accept-Encoding: gzip.
    path = f"{workdir}/gz.txt"
    data = "compress me " * 5000
    info = sandbox.files.write(path, data, gzip=True)
    assert info.path == path
    assert sandbox.commands.run(f"wc -c < {path}").stdout.strip() == str(len(data))
    assert sandbox.files.read(path, gzip=True) == data


def test_envd_gzips_downloads_on_request(sandbox, workdir):
    path = f"{workdir}/gz-raw.txt"
    data = b"0123456789" * 1000
    sandbox.files.write(path, data)
    with httpx.Client(base_url=sandbox.envd_api_url, timeout=10) as client:
        r = client.get("/files", params={"path": path}, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers.get("content-encoding") == "gzip"
        assert r.content == data  # httpx decoded it
        r = client.get("/files", params={"path": path}, headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200
        assert r.headers.get("content-encoding") in (None, "identity")
        assert r.content == data


def test_envd_accepts_a_gzipped_octet_stream_upload(sandbox, workdir):
    # What the SDK's gzip=True upload sends, spelled out.
    path = f"{workdir}/raw-gz-upload.txt"
    data = b"raw gzip upload\n" * 100
    with httpx.Client(base_url=sandbox.envd_api_url, timeout=10) as client:
        r = client.post(
            "/files",
            params={"path": path},
            content=gzip.compress(data),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["path"] == path and body[0]["name"] == "raw-gz-upload.txt" and body[0]["type"] == "file"
    assert bytes(sandbox.files.read(path, format="bytes")) == data


# --- list / exists / get_info -----------------------------------------------------------


@pytest.fixture
def tree(sandbox, workdir):
    sandbox.files.write_files(
        [
            {"path": f"{workdir}/tree/f1.txt", "data": "1"},
            {"path": f"{workdir}/tree/d1/f2.txt", "data": "22"},
            {"path": f"{workdir}/tree/d1/d2/f3.txt", "data": "333"},
        ]
    )
    return f"{workdir}/tree"


def test_list_depth_1(sandbox, tree):
    entries = sandbox.files.list(tree)
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {"f1.txt", "d1"}
    assert by_name["f1.txt"].type == FileType.FILE
    assert by_name["f1.txt"].path == f"{tree}/f1.txt"
    assert by_name["f1.txt"].size == 1
    assert by_name["d1"].type == FileType.DIR
    assert by_name["d1"].path == f"{tree}/d1"


def test_list_depth_2(sandbox, tree):
    entries = sandbox.files.list(tree, depth=2)
    paths = {e.path for e in entries}
    assert paths == {f"{tree}/f1.txt", f"{tree}/d1", f"{tree}/d1/f2.txt", f"{tree}/d1/d2"}
    assert {e.path: e.type for e in entries}[f"{tree}/d1/d2"] == FileType.DIR


def test_list_depth_3_reaches_the_bottom(sandbox, tree):
    paths = {e.path for e in sandbox.files.list(tree, depth=3)}
    assert f"{tree}/d1/d2/f3.txt" in paths
    assert len(paths) == 5


def test_list_missing_dir(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/nope")


def test_list_a_file_is_an_invalid_argument(sandbox, tree):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{tree}/f1.txt")


def test_exists(sandbox, tree):
    assert sandbox.files.exists(f"{tree}/f1.txt") is True
    assert sandbox.files.exists(f"{tree}/d1") is True
    assert sandbox.files.exists(f"{tree}/nope") is False


def test_get_info_file(sandbox, workdir, default_user):
    path = f"{workdir}/info.txt"
    before = datetime.datetime.now(datetime.timezone.utc)
    sandbox.files.write(path, "12345")
    sandbox.commands.run(f"chmod 0644 {path}")
    info = sandbox.files.get_info(path)
    assert info.name == "info.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.mode & 0o777 == 0o644
    assert info.permissions == "-rw-r--r--"
    # written by the default user (`user`)
    assert info.owner == default_user
    assert info.group == sandbox.commands.run(f"id -gn {default_user}").stdout.strip()
    assert info.symlink_target is None
    modified = info.modified_time
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=datetime.timezone.utc)
    assert before - datetime.timedelta(seconds=5) <= modified <= datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)


def test_get_info_dir(sandbox, workdir):
    path = f"{workdir}/infodir"
    sandbox.files.make_dir(path)
    sandbox.commands.run(f"chmod 0755 {path}")
    info = sandbox.files.get_info(path)
    assert info.type == FileType.DIR
    assert info.name == "infodir"
    assert info.permissions == "drwxr-xr-x"
    assert info.mode & 0o777 == 0o755


def test_get_info_symlink(sandbox, workdir):
    target = f"{workdir}/target.txt"
    link = f"{workdir}/link.txt"
    sandbox.files.write(target, "t")
    sandbox.commands.run(f"ln -s {target} {link}")
    info = sandbox.files.get_info(link)
    assert info.type == FileType.SYMLINK
    assert info.symlink_target == target
    assert info.path == link
    assert info.name == "link.txt"
    listed = {e.name: e for e in sandbox.files.list(workdir)}
    assert listed["link.txt"].type == FileType.SYMLINK
    assert listed["link.txt"].symlink_target == target


def test_get_info_missing(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/missing")


# --- make_dir / remove / rename ----------------------------------------------------------


def test_make_dir(sandbox, workdir):
    path = f"{workdir}/x/y/z"
    assert sandbox.files.make_dir(path) is True
    assert sandbox.files.get_info(path).type == FileType.DIR
    assert sandbox.files.make_dir(path) is False


def test_make_dir_over_a_file_is_an_invalid_argument(sandbox, workdir):
    sandbox.files.write(f"{workdir}/plain", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{workdir}/plain")


def test_remove_file_and_directory(sandbox, tree):
    sandbox.files.remove(f"{tree}/f1.txt")
    assert sandbox.files.exists(f"{tree}/f1.txt") is False
    sandbox.files.remove(f"{tree}/d1")  # recursive
    assert sandbox.files.exists(f"{tree}/d1") is False
    assert sandbox.files.list(tree) == []


def test_rename(sandbox, workdir):
    old, new = f"{workdir}/old.txt", f"{workdir}/sub/new.txt"
    sandbox.files.write(old, "moved")
    sandbox.files.make_dir(f"{workdir}/sub")
    info = sandbox.files.rename(old, new)
    assert info.path == new
    assert info.name == "new.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.exists(old) is False
    assert sandbox.files.read(new) == "moved"


def test_rename_missing(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/nope", f"{workdir}/nope2")


# --- metadata (envd >= 0.6.2: X-Metadata-<key> upload headers, user.e2b.* xattrs) ---------


def test_metadata_on_write_and_info(sandbox, workdir):
    path = f"{workdir}/meta.txt"
    info = sandbox.files.write(path, "m", metadata={"Team": "infra", "note": "two words"})
    assert info.metadata == {"team": "infra", "note": "two words"}
    assert sandbox.files.get_info(path).metadata == {"team": "infra", "note": "two words"}
    listed = {e.name: e for e in sandbox.files.list(workdir)}
    assert listed["meta.txt"].metadata == {"team": "infra", "note": "two words"}
    renamed = sandbox.files.rename(path, f"{workdir}/meta2.txt")
    assert renamed.metadata == {"team": "infra", "note": "two words"}


def test_metadata_is_replaced_by_the_next_upload(sandbox, workdir):
    path = f"{workdir}/meta-replace.txt"
    sandbox.files.write(path, "1", metadata={"a": "1", "b": "2"})
    sandbox.files.write(path, "2", metadata={"c": "3"})
    assert sandbox.files.get_info(path).metadata == {"c": "3"}
    sandbox.files.write(path, "3")
    assert sandbox.files.get_info(path).metadata is None


def test_metadata_on_write_files(sandbox, workdir):
    infos = sandbox.files.write_files(
        [{"path": f"{workdir}/m1", "data": "1"}, {"path": f"{workdir}/m2", "data": "2"}],
        metadata={"k": "v"},
    )
    assert [i.metadata for i in infos] == [{"k": "v"}, {"k": "v"}]
    assert sandbox.files.get_info(f"{workdir}/m2").metadata == {"k": "v"}


def test_metadata_key_too_long_is_rejected(sandbox, workdir):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{workdir}/meta-long", "x", metadata={"k" * 300: "v"})


# --- users ------------------------------------------------------------------------------


def test_write_and_read_as_user(sandbox, test_user):
    path = f"/home/{test_user}/wrenn-sdk-{uuid.uuid4().hex[:8]}/owned.txt"
    try:
        info = sandbox.files.write(path, "mine", user=test_user)
        assert info.path == path
        assert sandbox.files.read(path, user=test_user) == "mine"
        entry = sandbox.files.get_info(path, user=test_user)
        assert entry.owner == test_user
        expected_group = sandbox.commands.run(f"id -gn {test_user}").stdout.strip()
        assert entry.group == expected_group
        # the parent directory envd created is the user's too
        assert sandbox.files.get_info(os.path.dirname(path)).owner == test_user
    finally:
        sandbox.files.remove(os.path.dirname(path))


def test_relative_path_as_user_is_under_their_home(sandbox, test_user):
    name = f"wrenn-sdk-rel-{uuid.uuid4().hex[:8]}.txt"
    try:
        info = sandbox.files.write(name, "r", user=test_user)
        assert info.path == f"/home/{test_user}/{name}"
        assert sandbox.files.exists(name, user=test_user) is True
    finally:
        sandbox.files.remove(f"/home/{test_user}/{name}")


def test_user_cannot_read_roots_private_file(sandbox, workdir, test_user):
    path = f"{workdir}/secret.txt"
    sandbox.files.write(path, "top secret", user="root")
    sandbox.commands.run(f"chmod 0600 {path}", user="root")
    with pytest.raises((SandboxException, AuthenticationException)):
        sandbox.files.read(path, user=test_user)
    # the default user is `user` too
    with pytest.raises((SandboxException, AuthenticationException)):
        sandbox.files.read(path)


def test_unknown_user_on_files(sandbox, workdir):
    sandbox.files.write(f"{workdir}/u.txt", "u")
    with pytest.raises(AuthenticationException):
        sandbox.files.read(f"{workdir}/u.txt", user="no-such-user-wrenn")
    with pytest.raises(AuthenticationException):
        sandbox.files.list(workdir, user="no-such-user-wrenn")


# --- plain URLs on a sandbox without a token ----------------------------------------------


def test_download_and_upload_url_without_token(sandbox, workdir):
    path = f"{workdir}/url.txt"
    up = sandbox.upload_url(path)
    assert "signature" not in up
    r = httpx.post(up, files={"file": ("ignored-name", b"via url")}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == path
    down = sandbox.download_url(path)
    r = httpx.get(down, timeout=10)
    assert r.status_code == 200
    assert r.content == b"via url"


def test_health(sandbox):
    assert sandbox.is_running() is True
    r = httpx.get(f"{sandbox.envd_api_url}/health", timeout=5)
    assert r.status_code == 204
    assert r.content == b""
