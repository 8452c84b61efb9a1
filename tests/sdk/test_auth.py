"""Access-token auth (X-Access-Token, set by POST /init) and signed /files URLs.

These run against a second envd (`secure_envd`) whose token was set by `POST /init`.
"""

import base64
import contextlib
import urllib.parse
import uuid

import httpx
import pytest

from e2b import AuthenticationException

from support import make_secure_sandbox


def _file_path() -> str:
    return f"/tmp/wrenn-sdk-signed-{uuid.uuid4().hex[:12]}.txt"


@contextlib.contextmanager
def _sandbox_file(sbx, content=None, path=None, user=None):
    """A file path in `sbx` (a fresh one under /tmp unless `path` is given), written with
    `content` first unless that is None, and removed (as `user`) when the block ends."""
    path = path or _file_path()
    if content is not None:
        sbx.files.write(path, content, user=user)
    try:
        yield path
    finally:
        sbx.files.remove(path, user=user)


def _assert_downloads(url: str, content: bytes) -> None:
    """GET `url` answers 200 with exactly `content`."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    assert r.content == content


def _assert_json_401(r: httpx.Response) -> dict:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert body["code"] == 401
    assert isinstance(body["message"], str) and body["message"]
    return body


# --- the SDK with the right, a wrong and no token ----------------------------------------


def test_sdk_with_token_works(secure_sandbox):
    with _sandbox_file(secure_sandbox) as path:
        assert secure_sandbox.commands.run("echo secure").stdout == "secure\n"
        secure_sandbox.files.write(path, "secret content")
        assert secure_sandbox.files.read(path) == "secret content"
        assert secure_sandbox.files.exists(path) is True
        assert secure_sandbox.is_running() is True


def test_default_user_after_init_without_default_user_is_user(secure_sandbox, test_user):
    # /init set only a token: the default stays `user` (where it exists), in its home.
    r = secure_sandbox.commands.run("whoami; pwd")
    assert r.stdout == f"{test_user}\n/home/{test_user}\n"


# SDK calls refused with a token that does not match, by case id; the /files ones
# (read, write) are refused too, signature or not.
WRONG_TOKEN_CALLS = {
    "commands.run": lambda sbx: sbx.commands.run("echo never"),
    "commands.list": lambda sbx: sbx.commands.list(),
    "files.list": lambda sbx: sbx.files.list("/tmp"),
    "files.exists": lambda sbx: sbx.files.exists("/tmp"),
    "files.read": lambda sbx: sbx.files.read("/etc/hostname"),
    "files.write": lambda sbx: sbx.files.write(_file_path(), "never"),
}

# SDK calls refused without any token, by case id.
NO_TOKEN_CALLS = {
    "commands.run": lambda sbx: sbx.commands.run("echo never"),
    "files.get_info": lambda sbx: sbx.files.get_info("/tmp"),
    "files.read": lambda sbx: sbx.files.read("/etc/hostname"),
}


@pytest.mark.parametrize("call", WRONG_TOKEN_CALLS.values(), ids=WRONG_TOKEN_CALLS.keys())
def test_wrong_token_is_rejected(secure_envd, call):
    wrong = make_secure_sandbox(secure_envd.url, "0" * 64)
    with pytest.raises(AuthenticationException):
        call(wrong)


@pytest.mark.parametrize("call", NO_TOKEN_CALLS.values(), ids=NO_TOKEN_CALLS.keys())
def test_no_token_is_rejected(secure_envd, call):
    anonymous = make_secure_sandbox(secure_envd.url, None)
    with pytest.raises(AuthenticationException):
        call(anonymous)


def test_rpc_without_token_is_a_json_401(secure_envd):
    r = httpx.post(
        f"{secure_envd.url}/process.Process/List",
        content=b"{}",
        headers={"Content-Type": "application/json", "Connect-Protocol-Version": "1"},
        timeout=10,
    )
    _assert_json_401(r)


def test_health_needs_no_token(secure_envd):
    r = httpx.get(f"{secure_envd.url}/health", timeout=5)
    assert r.status_code == 204


def test_init_keeps_the_first_token(secure_envd):
    r = httpx.post(f"{secure_envd.url}/init", json={"accessToken": "f" * 64}, timeout=10)
    assert r.status_code == 401
    r = httpx.post(f"{secure_envd.url}/init", json={"accessToken": secure_envd.token}, timeout=10)
    assert r.status_code == 204


# --- signed URLs -------------------------------------------------------------------------


def _tamper(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    sig = query["signature"][0]
    assert sig.startswith("v1_")
    last = sig[-1]
    query["signature"] = [sig[:-1] + ("A" if last != "A" else "B")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, doseq=True)))


def test_signed_download_url(secure_sandbox):
    with _sandbox_file(secure_sandbox, "download me") as path:
        url = secure_sandbox.download_url(path)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert query["path"] == [path]
        assert query["signature"][0].startswith("v1_")
        assert "signature_expiration" not in query
        _assert_downloads(url, b"download me")


def test_signed_download_url_with_expiration(secure_sandbox):
    with _sandbox_file(secure_sandbox, "expiring") as path:
        url = secure_sandbox.download_url(path, use_signature_expiration=120)
        assert "signature_expiration=" in url
        _assert_downloads(url, b"expiring")


def test_signed_upload_url(secure_sandbox):
    with _sandbox_file(secure_sandbox) as path:
        url = secure_sandbox.upload_url(path, use_signature_expiration=120)
        r = httpx.post(url, files={"file": ("upload.txt", b"uploaded via signed url")}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list) and len(body) == 1
        assert body[0]["path"] == path
        assert body[0]["name"] == path.rsplit("/", 1)[1]
        assert body[0]["type"] == "file"
        assert secure_sandbox.files.read(path) == "uploaded via signed url"


def test_signed_urls_for_a_user(secure_sandbox, test_user):
    home_file = f"/home/{test_user}/wrenn-sdk-signed-{uuid.uuid4().hex[:8]}.txt"
    with _sandbox_file(secure_sandbox, path=home_file) as path:
        up = secure_sandbox.upload_url(path, user=test_user)
        assert f"username={test_user}" in up
        r = httpx.post(up, files={"file": ("f", b"user's file")}, timeout=10)
        assert r.status_code == 200, r.text
        assert secure_sandbox.files.get_info(path).owner == test_user
        _assert_downloads(secure_sandbox.download_url(path, user=test_user), b"user's file")
        # the user is part of what is signed
        tampered = secure_sandbox.download_url(path, user=test_user).replace(f"username={test_user}", "username=root")
        _assert_json_401(httpx.get(tampered, timeout=10))


def test_expired_signature(secure_sandbox):
    with _sandbox_file(secure_sandbox, "too late") as path:
        url = secure_sandbox.download_url(path, use_signature_expiration=-30)
        r = httpx.get(url, timeout=10)
        assert r.status_code == 401
        assert r.json() == {"code": 401, "message": "signature is already expired"}
        url = secure_sandbox.upload_url(path, use_signature_expiration=-30)
        r = httpx.post(url, files={"file": ("f", b"nope")}, timeout=10)
        assert r.status_code == 401
        assert r.json() == {"code": 401, "message": "signature is already expired"}
        assert secure_sandbox.files.read(path) == "too late"


def test_tampered_signature(secure_sandbox):
    with _sandbox_file(secure_sandbox, "guarded") as path:
        _assert_json_401(httpx.get(_tamper(secure_sandbox.download_url(path)), timeout=10))
        _assert_json_401(httpx.get(_tamper(secure_sandbox.download_url(path, use_signature_expiration=60)), timeout=10))
        r = httpx.post(_tamper(secure_sandbox.upload_url(path)), files={"file": ("f", b"evil")}, timeout=10)
        _assert_json_401(r)
        assert secure_sandbox.files.read(path) == "guarded"


def test_signature_is_bound_to_path_operation_and_expiration(secure_sandbox):
    with _sandbox_file(secure_sandbox, "a") as path, _sandbox_file(secure_sandbox, "b") as other:
        # a read signature for `path` used for `other`
        url = secure_sandbox.download_url(path)
        _assert_json_401(httpx.get(url.replace(urllib.parse.quote(path, safe=""), urllib.parse.quote(other, safe="")), timeout=10))
        # a read signature used to write
        read_url = secure_sandbox.download_url(path)
        _assert_json_401(httpx.post(read_url, files={"file": ("f", b"evil")}, timeout=10))
        # a write signature used to read
        write_url = secure_sandbox.upload_url(path)
        _assert_json_401(httpx.get(write_url, timeout=10))
        # a prolonged expiration
        url = secure_sandbox.download_url(path, use_signature_expiration=60)
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        query["signature_expiration"] = [str(int(query["signature_expiration"][0]) + 3600)]
        longer = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, doseq=True)))
        _assert_json_401(httpx.get(longer, timeout=10))
        assert secure_sandbox.files.read(path) == "a"


def test_no_token_and_no_signature(secure_envd, secure_sandbox):
    with _sandbox_file(secure_sandbox, "x") as path:
        _assert_json_401(httpx.get(f"{secure_envd.url}/files", params={"path": path}, timeout=10))
        _assert_json_401(
            httpx.post(f"{secure_envd.url}/files", params={"path": path}, files={"file": ("f", b"evil")}, timeout=10)
        )
        assert secure_sandbox.files.read(path) == "x"


def test_a_signed_url_grants_its_own_user_and_no_basic_header_changes_it(secure_envd, secure_sandbox, test_user):
    # Readable by root only. The URL is signed with no username: it grants envd's default user
    # (`user`, as no /init named another) and nothing else; a Basic header naming root must not
    # turn the grant into root's (before, it did: a URL signed for the default user could be
    # replayed as root's).
    root_file = f"/root/wrenn-sdk-signed-{uuid.uuid4().hex[:8]}.txt"
    with _sandbox_file(secure_sandbox, "root's secret", path=root_file, user="root") as path:
        secure_sandbox.commands.run(f"chmod 600 {path}", user="root")
        url = secure_sandbox.download_url(path)
        assert "username=" not in url
        basic = "Basic " + base64.b64encode(b"root:").decode()
        r = httpx.get(url, headers={"Authorization": basic}, timeout=10)
        assert r.status_code in (401, 403), (r.status_code, r.text)
        # With the token instead of a signature, the Basic user does choose the user.
        r = httpx.get(
            url.split("?")[0],
            params={"path": path},
            headers={"Authorization": basic, "X-Access-Token": secure_envd.token},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert r.content == b"root's secret"
        # And the default user with the token is `user`, who may not read it.
        r = httpx.get(
            url.split("?")[0],
            params={"path": path},
            headers={"X-Access-Token": secure_envd.token},
            timeout=10,
        )
        assert r.status_code in (401, 403), (r.status_code, r.text)
