"""Egress rules through the real `e2b` SDK, against real QEMU guests.

"The internet" is a network namespace on the host (`Internet`): several addresses, each serving
HTTP on port 80 (answering which address it is and the headers it got) and a TCP echo on port
7000. A `wrenn up` of its own, with internet access on and the namespace's range opened by the
operator (`--guest-open-range`), runs the sandboxes; their guests reach the targets through their
slots, the host's routing and its masquerade, as they would reach the internet.
"""

import json
import os
import shutil
import subprocess
import textwrap
import time

import pytest
from e2b import Sandbox

from conftest import FIRST_SLOT, SLOT_PREFIX, Wrenn

# Each platform run (SQLite, PostgreSQL) has its own namespace, range and slots.
NET = f"10.252.{(FIRST_SLOT // 8) % 200 + 20}"
NETNS = f"{SLOT_PREFIX}-inet"
HOST_SIDE = f"{SLOT_PREFIX}in0"
TARGETS = {"a": f"{NET}.2", "b": f"{NET}.3", "c": f"{NET}.17", "d": f"{NET}.18"}

SERVER = textwrap.dedent(
    """
    import json, socket, socketserver, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Who(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({
                "address": self.connection.getsockname()[0],
                "headers": dict(self.headers.items()),
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                data = self.request.recv(4096)
                if not data:
                    return
                self.request.sendall(data)

    class Threaded(socketserver.ThreadingMixIn, socketserver.TCPServer):
        allow_reuse_address = True
        daemon_threads = True

    ThreadingHTTPServer.allow_reuse_address = True
    http = ThreadingHTTPServer(("0.0.0.0", 80), Who)
    echo = Threaded(("0.0.0.0", 7000), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    print("serving", flush=True)
    http.serve_forever()
    """
)


def ip(*args: str, check: bool = True):
    return subprocess.run(["ip", *args], check=check, capture_output=True)


class Internet:
    """The namespace playing the internet, and its servers."""

    def __init__(self):
        self.remove()
        ip("netns", "add", NETNS)
        ip("link", "add", HOST_SIDE, "type", "veth", "peer", "name", "inet0", "netns", NETNS)
        ip("addr", "add", f"{NET}.1/24", "dev", HOST_SIDE)
        ip("link", "set", HOST_SIDE, "up")
        for address in TARGETS.values():
            ip("-n", NETNS, "addr", "add", f"{address}/24", "dev", "inet0")
        ip("-n", NETNS, "link", "set", "inet0", "up")
        ip("-n", NETNS, "link", "set", "lo", "up")
        ip("-n", NETNS, "route", "add", "default", "via", f"{NET}.1")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, "python3", "-c", SERVER],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert self.server.stdout.readline().strip() == b"serving"

    @staticmethod
    def remove():
        subprocess.run(["pkill", "-f", f"ip netns exec {NETNS} "], capture_output=True)
        ip("link", "del", HOST_SIDE, check=False)
        ip("netns", "del", NETNS, check=False)

    def stop(self):
        self.server.kill()
        self.server.wait()
        self.remove()


@pytest.fixture(scope="module")
def net(wrenn):
    """A `wrenn up` with internet access, and the internet namespace. (Takes the session's
    `wrenn` first, so the SDK's environment points there and this one is reached by options.)"""
    internet = Internet()
    instance = None
    try:
        instance = Wrenn(
            os.environ["WRENN_BIN"],
            slot_prefix=f"{SLOT_PREFIX}n",
            first_slot=FIRST_SLOT + 32,
            slots=8,
            internet=True,
            extra_args=["--guest-open-range", f"{NET}.0/24"],
        )
        yield instance
    finally:
        if instance is not None:
            instance.stop()
            shutil.rmtree(instance.data, ignore_errors=True)
        internet.stop()


def create(net, **options) -> Sandbox:
    return Sandbox.create(timeout=180, **net.sdk, **options)


def probe(sandbox: Sandbox, names=tuple(TARGETS), port: int = 80) -> dict:
    """HTTP to each target from the guest, all at once: name -> "open" (it answered as
    itself) or "timeout" (nothing came back) or "refused"/"reset"/"error"."""
    script = "\n".join(
        f"(out=$(curl -s -m 3 http://{TARGETS[name]}:{port}/); echo \"{name} $? $out\") &"
        for name in names
    ) + "\nwait\n"
    ran = sandbox.commands.run(script, timeout=30)
    results = {}
    for line in ran.stdout.splitlines():
        name, code, *rest = line.split(" ", 2)
        code = int(code)
        if code == 0:
            answer = json.loads(rest[0])
            assert answer["address"] == TARGETS[name], line
            results[name] = "open"
        else:
            results[name] = {28: "timeout", 7: "refused", 56: "reset"}.get(code, f"error {code}")
    assert set(results) == set(names), ran.stdout
    return results


def test_allow_one_cidr_and_deny_everything_else(net):
    sandbox = create(net, network={
        "allow_out": [f"{NET}.16/29"],
        "deny_out": lambda ctx: [ctx.all_traffic],
    })
    try:
        # c and d are in the allowed range; a and b time out (dropped, as E2B's do).
        assert probe(sandbox) == {"a": "timeout", "b": "timeout", "c": "open", "d": "open"}
        # The echo port of an allowed address is open too: rules are by address.
        assert "hello" in sandbox.commands.run(
            f"python3 -c \"import socket; s=socket.create_connection(('{TARGETS['c']}', 7000), 3);"
            f" s.sendall(b'hello'); print(s.recv(5).decode())\""
        ).stdout
        info = Sandbox.get_info(sandbox.sandbox_id, **net.sdk)
        assert info.network["allow_out"] == [f"{NET}.16/29"]
        assert info.network["deny_out"] == ["0.0.0.0/0"]
    finally:
        sandbox.kill()


def test_deny_one_address_and_allowed_entries_win(net):
    sandbox = create(net, network={"deny_out": [TARGETS["d"]]})
    try:
        # Only d is denied: the rest of the range is open by default.
        assert probe(sandbox) == {"a": "open", "b": "open", "c": "open", "d": "timeout"}
        # Denying one address inside an allowed range does nothing: allowed entries win.
        sandbox.update_network({"allow_out": [f"{NET}.16/29"], "deny_out": [TARGETS["d"], TARGETS["a"]]})
        assert probe(sandbox) == {"a": "timeout", "b": "open", "c": "open", "d": "open"}
    finally:
        sandbox.kill()


ECHO_CLIENT = textwrap.dedent(
    """
    import socket, time
    s = socket.create_connection(("{address}", 7000), 3)
    open("/tmp/echo-ok", "w").close()
    try:
        while True:
            s.sendall(b"ping")
            if s.recv(4) != b"ping":
                raise EOFError("the echo ended")
            time.sleep(0.1)
    except Exception as error:
        with open("/tmp/echo-cut.part", "w") as f:
            f.write(type(error).__name__)
        import os
        os.rename("/tmp/echo-cut.part", "/tmp/echo-cut")
    """
)


def wait_for_file(sandbox: Sandbox, path: str, seconds: float) -> float:
    """Seconds until `path` exists in the guest (polled by a command there)."""
    started = time.monotonic()
    ran = sandbox.commands.run(
        f"for i in $(seq {int(seconds * 20)}); do [ -e {path} ] && exit 0; sleep 0.05; done; exit 1",
        timeout=seconds + 30,
    )
    assert ran.exit_code == 0
    return time.monotonic() - started


def test_a_live_update_opens_and_closes_and_cuts_a_connection_now_forbidden(net):
    sandbox = create(net)
    try:
        assert probe(sandbox, ["a", "b"]) == {"a": "open", "b": "open"}
        sandbox.files.write("/tmp/echo.py", ECHO_CLIENT.format(address=TARGETS["a"]))
        sandbox.commands.run("python3 /tmp/echo.py", background=True)
        wait_for_file(sandbox, "/tmp/echo-ok", 10)
        time.sleep(0.5)
        assert sandbox.commands.run("ls /tmp/echo-cut 2>/dev/null; true").stdout == ""

        sandbox.update_network({"deny_out": [TARGETS["a"]]})
        took = wait_for_file(sandbox, "/tmp/echo-cut", 10)
        # The guest's connection was reset, not left hanging.
        assert sandbox.files.read("/tmp/echo-cut") == "ConnectionResetError"
        print(f"the connection was cut {took:.2f} s after the update returned (with a poll)")
        assert probe(sandbox, ["a", "b"]) == {"a": "timeout", "b": "open"}

        # Omitting every field clears the rules.
        sandbox.update_network({})
        assert probe(sandbox, ["a", "b"]) == {"a": "open", "b": "open"}
        sandbox.update_network({"allow_internet_access": False})
        assert probe(sandbox, ["a", "b"]) == {"a": "timeout", "b": "timeout"}
        sandbox.update_network({"allow_internet_access": False, "allow_out": [TARGETS["b"]]})
        assert probe(sandbox, ["a", "b"]) == {"a": "timeout", "b": "open"}
        info = Sandbox.get_info(sandbox.sandbox_id, **net.sdk)
        assert info.allow_internet_access is False
        assert info.network["allow_out"] == [TARGETS["b"]]
    finally:
        sandbox.kill()


def test_rules_are_kept_across_a_pause_and_a_resume(net):
    sandbox = create(net, network={"deny_out": [TARGETS["b"]]})
    try:
        assert probe(sandbox, ["a", "b"]) == {"a": "open", "b": "timeout"}
        sandbox.pause()
        # Changed while paused: in force at the resume.
        Sandbox.update_network(sandbox.sandbox_id, {"deny_out": [TARGETS["a"]]}, **net.sdk)
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=180, **net.sdk)
        assert probe(resumed, ["a", "b"]) == {"a": "timeout", "b": "open"}
        resumed.pause()
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=180, **net.sdk)
        assert probe(resumed, ["a", "b"]) == {"a": "timeout", "b": "open"}
        assert Sandbox.get_info(sandbox.sandbox_id, **net.sdk).network["deny_out"] == [TARGETS["a"]]
    finally:
        sandbox.kill()


def test_bad_rules_are_refused_with_400_naming_them(net):
    from e2b.exceptions import InvalidArgumentException, SandboxException

    for network, says in [
        ({"allow_out": ["10.0.0.0/33"]}, "10.0.0.0/33"),
        ({"deny_out": ["not an address"]}, "not an address"),
        ({"allow_out": [""]}, "empty domain"),
        ({"allow_out": [f"10.1.{i // 250}.{i % 250}" for i in range(600)]}, "at most"),
    ]:
        with pytest.raises((InvalidArgumentException, SandboxException)) as refused:
            create(net, network=network)
        assert "400" in str(refused.value) or says in str(refused.value), refused.value
        assert says in str(refused.value), refused.value
    sandbox = create(net)
    try:
        with pytest.raises((InvalidArgumentException, SandboxException)) as refused:
            sandbox.update_network({"deny_out": ["1.2.3.4/40"]})
        assert "1.2.3.4/40" in str(refused.value)
        # Nothing was left half made: the sandbox runs with its old (no) rules.
        assert probe(sandbox, ["a"]) == {"a": "open"}
    finally:
        sandbox.kill()
    assert Sandbox.list(**net.sdk).next_items() == []


def test_the_host_mask_is_the_host_a_guest_server_sees(net):
    sandbox = create(net, network={"mask_request_host": "custom-host.example.com:${PORT}"})
    try:
        sandbox.commands.run(
            "python3 -c \"import http.server, json\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        body = self.headers.get('Host', '').encode()\n"
            "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers(); self.wfile.write(body)\n"
            "    def log_message(self, *a): pass\n"
            "http.server.HTTPServer(('', 8080), H).serve_forever()\"",
            background=True,
        )
        import urllib.request
        deadline = time.monotonic() + 20
        while True:
            request = urllib.request.Request(
                f"{net.proxy_url}/",
                headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8080"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    seen = response.read().decode()
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert seen == "custom-host.example.com:8080"
        info = Sandbox.get_info(sandbox.sandbox_id, **net.sdk)
        assert info.network["mask_request_host"] == "custom-host.example.com:${PORT}"
    finally:
        sandbox.kill()
