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
import tempfile
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

# The internet's names (its DNS server answers these, and nothing else).
NAMES = {
    "allowed.test": TARGETS["c"],
    "other.test": TARGETS["c"],
    "api.wild.test": TARGETS["d"],
    "far.test": TARGETS["b"],
}

SERVER = textwrap.dedent(
    """
    import json, socket, socketserver, ssl, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    NAMES = json.loads(sys.argv[1])

    class Who(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            # Every request's headers are recorded here, for the tests to read from the host;
            # a "/quiet" request's answer does not carry them back.
            SEEN.write(json.dumps({"path": self.path, "headers": dict(self.headers.items())}) + "\\n")
            answer = {"address": self.connection.getsockname()[0]}
            if not self.path.startswith("/quiet"):
                answer["headers"] = dict(self.headers.items())
            body = json.dumps(answer).encode()
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

    def dns():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 53))
        while True:
            query, peer = udp.recvfrom(512)
            labels, at = [], 12
            while query[at]:
                labels.append(query[at + 1:at + 1 + query[at]].decode())
                at += 1 + query[at]
            end = at + 5
            name, qtype = ".".join(labels).lower(), int.from_bytes(query[at + 1:at + 3], "big")
            address = NAMES.get(name)
            found = address is not None and qtype == 1
            header = query[:2] + bytes([0x81, 0x80 if address else 0x83]) + query[4:6]
            header += (1 if found else 0).to_bytes(2, "big") + bytes(4)
            answer = header + query[12:end]
            if found:
                answer += bytes([0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4])
                answer += bytes(int(part) for part in address.split("."))
            udp.sendto(answer, peer)

    LOG = open(sys.argv[4], "a", buffering=1)
    SEEN = open(sys.argv[5], "a", buffering=1)

    def pipe(a, b):
        def one_way(x, y):
            try:
                while True:
                    data = x.recv(65536)
                    if not data:
                        break
                    y.sendall(data)
            except OSError:
                pass
            for s in (x, y):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        threading.Thread(target=one_way, args=(a, b), daemon=True).start()
        one_way(b, a)

    class Connect(socketserver.BaseRequestHandler):
        # An HTTP CONNECT proxy: what it was asked to reach goes to the log.
        def handle(self):
            head = b""
            while not head.endswith(b"\\r\\n\\r\\n"):
                byte = self.request.recv(1)
                if not byte:
                    return
                head += byte
            target = head.split()[1].decode()
            LOG.write("connect " + target + "\\n")
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((NAMES.get(host, host), int(port)), 5)
            self.request.sendall(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
            pipe(self.request, upstream)

    class Socks(socketserver.BaseRequestHandler):
        # A SOCKS5 proxy that wants user/secret; it resolves names itself.
        def handle(self):
            r = self.request
            version, count = r.recv(2)
            methods = r.recv(count)
            if 2 not in methods:
                r.sendall(bytes([5, 255]))
                return
            r.sendall(bytes([5, 2]))
            r.recv(1)
            user = r.recv(r.recv(1)[0]).decode()
            password = r.recv(r.recv(1)[0]).decode()
            if (user, password) != ("user", "secret"):
                r.sendall(bytes([1, 1]))
                return
            r.sendall(bytes([1, 0]))
            _, command, _, kind = r.recv(4)
            if kind == 3:
                host = r.recv(r.recv(1)[0]).decode()
                address = NAMES[host]
            else:
                address = host = socket.inet_ntoa(r.recv(4))
            port = int.from_bytes(r.recv(2), "big")
            LOG.write(f"socks {host}:{port}\\n")
            upstream = socket.create_connection((address, port), 5)
            r.sendall(bytes([5, 0, 0, 1, 0, 0, 0, 0, 0, 0]))
            pipe(r, upstream)

    ThreadingHTTPServer.allow_reuse_address = True
    http = ThreadingHTTPServer(("0.0.0.0", 80), Who)
    https = ThreadingHTTPServer(("0.0.0.0", 443), Who)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    https.socket = context.wrap_socket(https.socket, server_side=True)
    echo = Threaded(("0.0.0.0", 7000), Echo)
    connect = Threaded(("0.0.0.0", 3128), Connect)
    socks = Threaded(("0.0.0.0", 1080), Socks)
    # The same SOCKS5 proxy over TLS (the internet's certificate).
    socks_tls = Threaded(("0.0.0.0", 1443), Socks)
    socks_tls.socket = context.wrap_socket(socks_tls.socket, server_side=True)
    for serve in (echo.serve_forever, https.serve_forever, dns, connect.serve_forever,
                  socks.serve_forever, socks_tls.serve_forever):
        threading.Thread(target=serve, daemon=True).start()
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
        # The internet's own authority (the agent is told to trust it: --egress-ca-file) and
        # one certificate it signed for every name (guests do not check it, -k, unless a
        # transform's interception puts the sandbox's own authority in front).
        self.tls = tempfile.mkdtemp(prefix="wrenn-inet-")
        at = lambda name: os.path.join(self.tls, name)
        self.ca_cert, cert, key = at("ca.pem"), at("cert.pem"), at("key.pem")
        with open(at("leaf.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                    "subjectAltName=" + ",".join(f"DNS:{n}" for n in NAMES) + "\n")
        for command in [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
             at("ca-key.pem"), "-out", self.ca_cert, "-subj", "/CN=the internet's authority"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", at("leaf.csr"),
             "-subj", "/CN=internet.test"],
            ["x509", "-req", "-in", at("leaf.csr"), "-CA", self.ca_cert, "-CAkey",
             at("ca-key.pem"), "-CAcreateserial", "-days", "2", "-out", cert, "-extfile",
             at("leaf.ext")],
        ]:
            subprocess.run(["openssl", *command], check=True, capture_output=True)
        self.proxy_log = at("proxies.log")
        self.seen_log = at("seen.log")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", NETNS, "python3", "-c", SERVER, json.dumps(NAMES), cert, key,
             self.proxy_log, self.seen_log],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert self.server.stdout.readline().strip() == b"serving"

    @staticmethod
    def remove():
        subprocess.run(["pkill", "-f", f"ip netns exec {NETNS} "], capture_output=True)
        ip("link", "del", HOST_SIDE, check=False)
        ip("netns", "del", NETNS, check=False)

    def seen(self) -> list:
        """Every request the targets' HTTP servers got: {"path", "headers"} (names lower-cased),
        in order."""
        with open(self.seen_log) as f:
            requests = [json.loads(line) for line in f]
        for request in requests:
            request["headers"] = {k.lower(): v for k, v in request["headers"].items()}
        return requests

    def proxied(self) -> list:
        """What the test proxies were asked to reach, in order."""
        with open(self.proxy_log) as f:
            return f.read().splitlines()

    def stop(self):
        self.server.kill()
        self.server.wait()
        shutil.rmtree(self.tls, ignore_errors=True)
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
            own_store=True,
            extra_args=["--guest-open-range", f"{NET}.0/24", "--egress-dns", f"{TARGETS['a']}:53",
                        "--egress-ca-file", internet.ca_cert],
        )
        instance.internet = internet
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


ECHO = textwrap.dedent(
    """
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], 7000), 3)
        s.sendall(b"hello")
        print("open" if s.recv(5) == b"hello" else "garbled")
    except socket.timeout:
        print("timeout")
    except OSError as error:
        print(type(error).__name__)
    """
)


def echo(sandbox: Sandbox, names) -> dict:
    """The TCP echo of each target from the guest: name -> "open", "timeout" or the error."""
    sandbox.files.write("/tmp/echo-probe.py", ECHO)
    script = "\n".join(
        f"(echo \"{name} $(python3 /tmp/echo-probe.py {TARGETS[name]})\") &" for name in names
    ) + "\nwait\n"
    lines = sandbox.commands.run(script, timeout=30).stdout.split("\n")
    return dict(line.split(" ", 1) for line in lines if line)


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


def fetch(sandbox: Sandbox, checks: dict) -> dict:
    """Runs curl checks in the guest at once: name -> (curl's exit code, the answer's address
    and Host when it answered)."""
    script = "\n".join(
        f"(out=$(curl -sk -m 5 {args}); echo \"{name} $? $out\") &" for name, args in checks.items()
    ) + "\nwait\n"
    ran = sandbox.commands.run(script, timeout=60)
    results = {}
    for line in ran.stdout.splitlines():
        name, code, *rest = line.split(" ", 2)
        if int(code) == 0:
            answer = json.loads(rest[0])
            results[name] = (0, answer["address"], answer["headers"].get("Host"))
        else:
            results[name] = (int(code), None, None)
    assert set(results) == set(checks), ran.stdout
    return results


def answered(result) -> bool:
    return result[0] == 0


DNS_QUERY = textwrap.dedent(
    """
    import socket, sys
    name = sys.argv[2]
    query = b"\\x12\\x34\\x01\\x00\\x00\\x01" + bytes(6)
    query += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\\x00\\x00\\x01\\x00\\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(query, (sys.argv[1], 53))
    answer = s.recv(512)
    print("rcode", answer[3] & 15, "answers", int.from_bytes(answer[6:8], "big"))
    """
)


def test_domains_admit_their_names_at_the_addresses_they_resolve_to_and_nothing_else(net):
    sandbox = create(net, network={
        "allow_out": ["allowed.test", "*.wild.test"],
        "deny_out": lambda ctx: [ctx.all_traffic],
    })
    try:
        c, b = TARGETS["c"], TARGETS["b"]
        results = fetch(sandbox, {
            "http": "http://allowed.test/",
            "https": "https://allowed.test/",
            "wild": "http://api.wild.test/",
            "wild_tls": "https://api.wild.test/",
            # Another name on the allowed name's address.
            "other": f"--resolve other.test:80:{c} http://other.test/",
            "other_tls": f"--resolve other.test:443:{c} https://other.test/",
            # The address literal.
            "literal": f"http://{c}/",
            "literal_tls": f"https://{c}/",
            # The allowed name sent to an address it does not resolve to.
            "elsewhere": f"--resolve allowed.test:80:{b} http://allowed.test/",
            "elsewhere_tls": f"--resolve allowed.test:443:{b} https://allowed.test/",
            # A name the resolver does not give.
            "unresolved": "http://other.test/",
        })
        assert results["http"] == (0, c, "allowed.test"), results
        assert results["https"][:2] == (0, c), results
        assert results["wild"] == (0, TARGETS["d"], "api.wild.test"), results
        assert answered(results["wild_tls"]), results
        for refused in ["other", "other_tls", "literal", "literal_tls", "elsewhere",
                        "elsewhere_tls", "unresolved"]:
            assert not answered(results[refused]), (refused, results)
        # The guest's resolver (or any other it asks) is the agent's: other names are refused.
        sandbox.files.write("/tmp/dns.py", DNS_QUERY)
        assert sandbox.commands.run("python3 /tmp/dns.py 8.8.8.8 allowed.test").stdout.split() == [
            "rcode", "0", "answers", "1"]
        assert sandbox.commands.run(f"python3 /tmp/dns.py {TARGETS['a']} other.test").stdout.split() == [
            "rcode", "5", "answers", "0"]
        # Domain rules are for ports 80 and 443: the echo port of the same address is closed.
        assert echo(sandbox, ["c"]) == {"c": "timeout"}

        # A live update moves the allowance to the other name, and cuts a kept-alive connection
        # the new rules forbid.
        sandbox.files.write("/tmp/keep.py", KEEP_ALIVE)
        sandbox.commands.run("python3 /tmp/keep.py", background=True)
        wait_for_file(sandbox, "/tmp/keep-ok", 15)
        sandbox.update_network({"allow_out": ["other.test"], "deny_out": ["0.0.0.0/0"]})
        wait_for_file(sandbox, "/tmp/keep-cut", 10)
        assert sandbox.files.read("/tmp/keep-cut") in ("ConnectionResetError", "EOFError")
        results = fetch(sandbox, {"allowed": "http://allowed.test/", "other": "http://other.test/"})
        assert not answered(results["allowed"]), results
        assert results["other"] == (0, c, "other.test"), results
    finally:
        sandbox.kill()


KEEP_ALIVE = textwrap.dedent(
    """
    import http.client, os, time
    connection = http.client.HTTPConnection("allowed.test", 80, timeout=5)
    try:
        while True:
            connection.request("GET", "/")
            connection.getresponse().read()
            if not os.path.exists("/tmp/keep-ok"):
                open("/tmp/keep-ok", "w").close()
            time.sleep(0.1)
    except Exception as error:
        kind = type(error).__name__
        if kind in ("RemoteDisconnected", "BadStatusLine"):
            kind = "EOFError"
        with open("/tmp/keep-cut.part", "w") as f:
            f.write(kind)
        os.rename("/tmp/keep-cut.part", "/tmp/keep-cut")
    """
)


def test_an_http_connect_egress_proxy_carries_all_the_egress_the_lists_allow(net):
    a, b, c, d = (TARGETS[n] for n in "abcd")
    before = len(net.internet.proxied())
    sandbox = create(net, network={
        "egress_proxy": {"address": f"http://{a}:3128"},
        "deny_out": [b],
    })
    try:
        results = fetch(sandbox, {"c": f"http://{c}/", "d_tls": f"https://{d}/", "b": f"http://{b}/"})
        assert results["c"] == (0, c, c), results
        assert answered(results["d_tls"]), results
        assert not answered(results["b"]), "the lists apply before the proxy"
        assert "hello" in sandbox.commands.run(
            f"python3 -c \"import socket; s=socket.create_connection(('{c}', 7000), 3);"
            f" s.sendall(b'hello'); print(s.recv(5).decode())\""
        ).stdout
        seen = net.internet.proxied()[before:]
        assert f"connect {c}:80" in seen and f"connect {d}:443" in seen and f"connect {c}:7000" in seen, seen
        assert not any(b in line for line in seen), seen
        # The guest cannot see the proxy: nothing in its environment names it.
        assert a not in sandbox.commands.run("env; cat /etc/resolv.conf").stdout
    finally:
        sandbox.kill()


def test_a_socks5_egress_proxy_with_a_login_gets_names_for_domain_rules(net):
    before = len(net.internet.proxied())
    proxy = {"address": f"{TARGETS['a']}:1080", "username": "user", "password": "secret"}
    sandbox = create(net, network={
        "egress_proxy": proxy,
        "allow_out": ["allowed.test"],
        "deny_out": lambda ctx: [ctx.all_traffic],
    })
    try:
        results = fetch(sandbox, {"named": "http://allowed.test/", "other": "http://far.test/"})
        assert results["named"] == (0, TARGETS["c"], "allowed.test"), results
        assert not answered(results["other"]), results
        seen = net.internet.proxied()[before:]
        assert seen == ["socks allowed.test:80"], seen
        info = Sandbox.get_info(sandbox.sandbox_id, **net.sdk)
        assert info.network["egress_proxy"]["address"] == proxy["address"]
        assert info.network["egress_proxy"].get("username") == "user"
        assert "password" not in info.network["egress_proxy"]
        # A wrong login: egress fails closed, never around the proxy.
        sandbox.update_network({
            "egress_proxy": dict(proxy, password="wrong"),
            "allow_out": ["allowed.test"],
            "deny_out": ["0.0.0.0/0"],
        })
        assert not answered(fetch(sandbox, {"named": "http://allowed.test/"})["named"])
        # An update that leaves the proxy out sends egress out directly.
        sandbox.update_network({"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
        count = len(net.internet.proxied())
        assert fetch(sandbox, {"named": "http://allowed.test/"})["named"][0] == 0
        assert len(net.internet.proxied()) == count
    finally:
        sandbox.kill()


def test_domain_rules_hold_after_the_agent_restarts(net):
    sandbox = create(net, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    try:
        assert fetch(sandbox, {"named": "http://allowed.test/"})["named"][0] == 0
        # A crash: nothing cleaned up; the new agent adopts the sandbox and serves its rules.
        net.crash_and_restart()
        results = fetch(sandbox, {"named": "http://allowed.test/", "other": "http://far.test/",
                                  "literal": f"http://{TARGETS['c']}/"})
        assert results["named"] == (0, TARGETS["c"], "allowed.test"), results
        assert not answered(results["other"]) and not answered(results["literal"]), results
    finally:
        sandbox.kill()


def test_dns_servers_are_open_addresses_with_domain_rules_and_their_dns_is_still_the_agents(net):
    a, b = TARGETS["a"], TARGETS["b"]
    sandbox = create(net, network={
        "allow_out": ["allowed.test"],
        "deny_out": lambda ctx: [ctx.all_traffic],
        "dns_servers": [b],
    })
    try:
        # E2B: all traffic to a DNS server is allowed with domain rules...
        assert echo(sandbox, ["a", "b"]) == {"a": "timeout", "b": "open"}
        # ...but DNS asked of it is the agent's: names outside the rules are refused.
        sandbox.files.write("/tmp/dns.py", DNS_QUERY)
        assert sandbox.commands.run(f"python3 /tmp/dns.py {b} other.test").stdout.split() == [
            "rcode", "5", "answers", "0"]
        assert Sandbox.get_info(sandbox.sandbox_id, **net.sdk).network["dns_servers"] == [b]
    finally:
        sandbox.kill()


def test_the_agents_proxy_reaches_no_host_address_the_guest_could_not(net):
    """The agent's proxy dials from the slot's namespace, so its connections are the guest's to
    the host's chains: a host address (here the host's side of the internet namespace, in the
    range the operator opened) stays closed with domain rules and through an egress proxy."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    host = f"{NET}.1"
    seen = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = json.dumps({"address": host, "headers": dict(self.headers.items())}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_CONNECT(self):
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    servers = [ThreadingHTTPServer((host, port), Record) for port in (80, 3128)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    sandbox = create(net, network={"allow_out": ["allowed.test"]})
    try:
        # The host answers its own requests (the servers work)...
        import urllib.request
        with urllib.request.urlopen(f"http://{host}/from-the-host", timeout=5) as answer:
            assert answer.status == 200
        seen.clear()
        # ...but not the guest's, named or not, through the agent's proxy.
        results = fetch(sandbox, {
            "named": f"-H 'Host: allowed.test' http://{host}/named",
            "bare": f"http://{host}/bare",
            "allowed": "http://allowed.test/",
        })
        assert not answered(results["named"]) and not answered(results["bare"]), results
        assert results["allowed"] == (0, TARGETS["c"], "allowed.test"), results
        # An egress proxy at a host address fails closed: nothing leaves, nothing reaches it.
        sandbox.update_network({"egress_proxy": {"address": f"http://{host}:3128"}})
        results = fetch(sandbox, {"through": f"http://{TARGETS['b']}/through"})
        assert not answered(results["through"]), results
        assert seen == [], seen
    finally:
        sandbox.kill()
        for server in servers:
            server.shutdown()
            server.server_close()


def verified(sandbox: Sandbox, checks: dict) -> dict:
    """Like `fetch`, but curl verifies certificates (the guest's trust store, no -k): name ->
    (curl's exit code, the HTTP status)."""
    script = "\n".join(
        f"(code=$(curl -s -o /dev/null -w '%{{http_code}}' -m 10 {args}); echo \"{name} $? $code\") &"
        for name, args in checks.items()
    ) + "\nwait\n"
    ran = sandbox.commands.run(script, timeout=60)
    results = {}
    for line in ran.stdout.splitlines():
        name, code, status = line.split(" ")
        results[name] = (int(code), int(status))
    assert set(results) == set(checks), ran.stdout
    return results


FIND_REVERSED = textwrap.dedent(
    """
    import os, sys
    # The needle comes reversed: the secret itself is never on a command line in the guest.
    needle = sys.argv[1][::-1].encode()
    for top in ("/etc", "/root", "/home", "/tmp", "/var", "/run", "/usr/local", "/opt"):
        for root, dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    if os.path.getsize(path) < 4 << 20 and needle in open(path, "rb").read():
                        print("found in", path)
                except OSError:
                    pass
    """
)


def secret_anywhere(sandbox: Sandbox, secret: str) -> str:
    """Everything in the guest a secret could be read from, brought to the host to be searched
    there: its processes' environments and command lines, what curl itself sent and got
    (verbose) on a transformed request, and which of its files hold the secret."""
    sandbox.files.write("/tmp/find-reversed.py", FIND_REVERSED)
    # The search finds what is there (a canary, not the secret).
    sandbox.files.write("/tmp/canary.txt", "a canary-1234 here")
    assert "found in /tmp/canary.txt" in sandbox.commands.run(
        "python3 /tmp/find-reversed.py 4321-yranac", timeout=180).stdout
    ran = sandbox.commands.run(
        "env; ps auxeww; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n';"
        " curl -sv https://allowed.test/quiet/verbose 2>&1;"
        f" python3 /tmp/find-reversed.py '{secret[::-1]}'",
        timeout=180,
    )
    return ran.stdout + ran.stderr


def test_a_transform_sets_headers_the_target_sees_and_the_guest_never_does(net):
    import uuid
    secret = f"wrenn-{uuid.uuid4().hex}"
    rules = {"allowed.test": [{"transform": {"headers": {"X-Api-Key": secret}}}]}
    sandbox = create(net, network={
        "allow_out": ["allowed.test"],
        "deny_out": lambda ctx: [ctx.all_traffic],
        "rules": rules,
    })
    try:
        before = len(net.internet.seen())
        # HTTPS verified against the guest's trust store (the sandbox's authority, from
        # /init), and plain HTTP: both reach the target with the header.
        results = verified(sandbox, {
            "tls": "https://allowed.test/quiet/tls",
            "plain": "http://allowed.test/quiet/plain",
            # Another host on a connection opened for the transformed name: 421, not sent.
            "misdirected": "-H 'Host: other.test' https://allowed.test/quiet/misdirected",
            # A name the rules do not allow gets nothing.
            "other": "https://far.test/quiet/other",
        })
        assert results["tls"] == (0, 200) and results["plain"] == (0, 200), results
        assert results["misdirected"] == (0, 421), results
        assert results["other"][0] != 0, results
        seen = {r["path"]: r["headers"] for r in net.internet.seen()[before:]}
        assert seen["/quiet/tls"].get("x-api-key") == secret, seen
        assert seen["/quiet/plain"].get("x-api-key") == secret, seen
        assert "/quiet/misdirected" not in seen and "/quiet/other" not in seen, seen
        # The guest cannot read it from anywhere.
        found = secret_anywhere(sandbox, secret)
        assert "HTTP/1.1 200" in found or "< HTTP" in found, found[-2000:]
        assert secret not in found and "found in" not in found, found[-2000:]
        # The value is never shown back either.
        info = Sandbox.get_info(sandbox.sandbox_id, **net.sdk)
        assert secret not in json.dumps(info.network, default=str)
        # Kept across a pause and a resume (the authority and the interception with it).
        sandbox.pause()
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=180, **net.sdk)
        before = len(net.internet.seen())
        assert verified(resumed, {"tls": "https://allowed.test/quiet/resumed"})["tls"] == (0, 200)
        assert net.internet.seen()[before:][0]["headers"].get("x-api-key") == secret
    finally:
        sandbox.kill()


def test_transforms_added_live_install_the_authority_and_change_with_the_rules(net):
    sandbox = create(net, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    try:
        # No transform: the target's own certificate, which the guest does not trust.
        assert verified(sandbox, {"tls": "https://allowed.test/quiet/a"})["tls"][0] == 60
        sandbox.update_network({
            "allow_out": ["allowed.test"],
            "deny_out": ["0.0.0.0/0"],
            "rules": {"allowed.test": [{"transform": {"headers": {"Authorization": "Bearer one"}}}]},
        })
        before = len(net.internet.seen())
        assert verified(sandbox, {"tls": "https://allowed.test/quiet/b"})["tls"] == (0, 200)
        assert net.internet.seen()[before:][0]["headers"].get("authorization") == "Bearer one"
        # Runtimes with trust stores of their own are pointed at the system's.
        env = sandbox.commands.run("env").stdout
        assert "NODE_EXTRA_CA_CERTS=" in env and "REQUESTS_CA_BUNDLE=" in env, env
        # New values apply to the next connection.
        sandbox.update_network({
            "allow_out": ["*.wild.test", "allowed.test"],
            "deny_out": ["0.0.0.0/0"],
            "rules": {"*.wild.test": [{"transform": {"headers": {"Authorization": "Bearer two"}}}]},
        })
        before = len(net.internet.seen())
        results = verified(sandbox, {
            "wild": "https://api.wild.test/quiet/c",
            # No longer transformed: the target's own certificate again.
            "untransformed": "-k https://allowed.test/quiet/d",
        })
        assert results == {"wild": (0, 200), "untransformed": (0, 200)}, results
        seen = {r["path"]: r["headers"] for r in net.internet.seen()[before:]}
        assert seen["/quiet/c"].get("authorization") == "Bearer two", seen
        assert "authorization" not in seen["/quiet/d"], seen
    finally:
        sandbox.kill()


def test_an_egress_proxy_over_tls_is_verified_and_fails_closed(net):
    c = TARGETS["c"]
    with open(net.internet.ca_cert) as f:
        authority = f.read()
    proxy = {"address": f"{TARGETS['a']}:1443", "username": "user", "password": "secret",
             "tls": {"server_name": "far.test", "ca_cert": authority}}
    before = len(net.internet.proxied())
    sandbox = create(net, network={"egress_proxy": proxy})
    try:
        results = fetch(sandbox, {"c": f"http://{c}/"})
        assert results["c"] == (0, c, c), results
        assert net.internet.proxied()[before:] == [f"socks {c}:80"]
        shown = Sandbox.get_info(sandbox.sandbox_id, **net.sdk).network["egress_proxy"]
        assert shown.get("tls") == {"server_name": "far.test"}, shown
        assert "BEGIN CERTIFICATE" not in json.dumps(shown)
        # A name the certificate does not hold, or the system's trust store (which does not
        # know the internet's authority): refused, never sent in the clear.
        for tls in [{"server_name": "nope.test", "ca_cert": authority}, True]:
            sandbox.update_network({"egress_proxy": dict(proxy, tls=tls)})
            count = len(net.internet.proxied())
            assert not answered(fetch(sandbox, {"c": f"http://{c}/"})["c"]), tls
            assert len(net.internet.proxied()) == count, tls
    finally:
        sandbox.kill()
