"""Control plane replicas (#23) with real host agents and QEMU guests, driven by the e2b SDK:
three `wrenn server --replica` processes on the PostgreSQL of DATABASE_URL (a schema of their
own), two `wrenn agent serve --join` hosts joined at two different replicas. Calls are spread
over the replicas (each one's API and proxy reach every sandbox); a create retried with its
Idempotency-Key at another replica gets the same sandbox; a pause and a kill sent at once to two
replicas end consistently; the replicas holding the lifecycle and the fleet watch are SIGKILLed
while a sandbox times out and a host dies, and the survivors act once; nothing is left on the
hosts. Runs in the suite's PostgreSQL run (replicas refuse SQLite)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from e2b import Sandbox

from prerequisites import free_port

DATABASE_URL = os.environ.get("DATABASE_URL", "")
# A duty's lease: a dead replica's duties are taken over within this and a renewal round.
LEASE_MS = 2000
# The hosts' network slots, apart from the suite's two `wrenn up` runs (600.. and 640..).
SLOTS = {"a": ("wra", 700), "b": ("wrb", 712)}

pytestmark = pytest.mark.skipif(
    not DATABASE_URL.startswith("postgres"),
    reason="control plane replicas share a PostgreSQL store: the suite's PostgreSQL run runs them",
)


def psql(sql: str) -> str:
    binary = shutil.which("psql") or sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
    done = subprocess.run([binary, DATABASE_URL, "-qtAc", sql], check=True, capture_output=True,
                          text=True)
    return done.stdout.strip()


def http(method: str, url: str, key: str = None, body=None, headers=None):
    """A call: (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if key:
        request.add_header("x-api-key", key)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw.strip() else None)
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")


def wait_until(what: str, within: float, check):
    deadline = time.time() + within
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"{what} did not happen within {within} s")
        time.sleep(0.2)


class Replica:
    def __init__(self, binary, database_url, shared, join_token, log_dir, index):
        self.binary = binary
        self.database_url = database_url
        self.shared = shared
        self.join_token = join_token
        self.data = tempfile.mkdtemp(prefix=f"wrenn-replica-{index}-")
        self.api_port, self.proxy_port, self.fleet_port = free_port(), free_port(), free_port()
        self.log = open(os.path.join(log_dir, f"replica-{index}.log"), "wb")
        self.process = subprocess.Popen(
            [
                binary, "server", "--replica", "--no-internet",
                "--data-dir", self.data,
                "--api-listen", f"127.0.0.1:{self.api_port}",
                "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
                "--fleet-listen", f"127.0.0.1:{self.fleet_port}",
                "--shared-dir", os.path.join(shared, "cp"),
                "--lease-life-ms", str(LEASE_MS),
                "--heartbeat-interval-ms", "500", "--down-after-ms", "4000",
                "--reconcile-interval-secs", "3", "--orphan-grace-secs", "30",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, DATABASE_URL=database_url, WRENN_JOIN_TOKEN=join_token),
        )
        wait_until(f"replica {index} to serve", 60, self.healthy)

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.api_port}"

    def sdk(self, key):
        return {"api_url": self.api_url, "sandbox_url": f"http://127.0.0.1:{self.proxy_port}",
                "api_key": key}

    def alive(self):
        return self.process.poll() is None

    def healthy(self):
        if not self.alive():
            raise RuntimeError(f"a replica exited: {self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 204
        except OSError:
            return False

    def holds(self, duty: str) -> bool:
        """Whether this replica runs `duty` now (its /metrics say so)."""
        if not self.alive():
            return False
        with urllib.request.urlopen(f"{self.api_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return f'wrenn_duties_held{{duty="{duty}"}} 1' in text

    def tail(self):
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def kill(self):
        self.process.kill()
        self.process.wait()

    def stop(self):
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data, ignore_errors=True)


class Host:
    """A host agent with the template `base` built (before it joins: a joined agent serves its
    control plane alone), then joined to a replica."""

    def __init__(self, binary, name, log_dir):
        self.binary = binary
        self.name = name
        self.prefix, self.first_slot = SLOTS[name[-1]]
        self.data = tempfile.mkdtemp(prefix=f"wrenn-replica-host-{name}-")
        self.log = open(os.path.join(log_dir, f"host-{name}.log"), "wb")
        self.process = None
        self.joined_at = None

    def serve(self, *extra):
        self.api_port, self.proxy_port, self.mmds_port = free_port(), free_port(), free_port()
        self.process = subprocess.Popen(
            [
                self.binary, "agent", "serve", "--no-internet", "--cleanup-on-exit",
                "--data-dir", self.data,
                "--listen", f"127.0.0.1:{self.api_port}",
                "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
                "--mmds-port", str(self.mmds_port),
                "--accel", "tcg", "--slot-prefix", self.prefix,
                "--first-slot", str(self.first_slot), "--slots", "8", "--warm-pool", "0",
                *extra,
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, WRENN_AGENT_TOKEN="replica-host-token"),
        )

    def build_base(self):
        self.serve()
        wait_until(f"host {self.name}'s agent to listen", 60, self.listening)
        subprocess.run(
            [self.binary, "agent", "template", "build", "base",
             "--agent", f"http://127.0.0.1:{self.api_port}", "--token", "replica-host-token"],
            check=True, capture_output=True, timeout=600,
        )
        self.stop()

    def listening(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"host {self.name}'s agent exited: {self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/health", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def join(self, replica: Replica):
        self.joined_at = replica
        self.serve(
            "--join", f"https://127.0.0.1:{replica.fleet_port}",
            "--control-plane-ca", os.path.join(replica.shared, "cp", "fleet-tls", "plane-ca.pem"),
            "--join-token", replica.join_token, "--host-name", f"replica-host-{self.name}",
        )

    def tail(self):
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def kill(self):
        self.process.kill()
        self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def leftovers(self):
        """This host's QEMU processes, network namespaces, host interfaces and sandbox files."""
        found = subprocess.run(["pgrep", "-f", f"qemu-system.*{self.data}"],
                               capture_output=True, text=True).stdout.split()
        if os.path.isdir("/run/netns"):
            found += [f"netns {name}" for name in os.listdir("/run/netns")
                      if name.startswith(f"{self.prefix}-")]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"{self.prefix}h"):
                found.append(f"interface {name}")
        sandboxes = os.path.join(self.data, "sandboxes")
        if os.path.isdir(sandboxes):
            found += [f"file {name}" for name in os.listdir(sandboxes)]
        return found


@pytest.fixture(scope="module")
def fleet():
    binary = os.environ["WRENN_BIN"]
    schema = f"replicas_{uuid.uuid4().hex[:10]}"
    psql(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in DATABASE_URL else "?"
    database_url = f"{DATABASE_URL}{separator}options=-csearch_path%3D{schema}"
    log_dir = tempfile.mkdtemp(prefix="wrenn-replicas-logs-")
    shared = tempfile.mkdtemp(prefix="wrenn-replicas-shared-")
    join_token = f"join-{uuid.uuid4().hex}"
    replicas, hosts = [], []
    try:
        # Both hosts' templates at once (one cold boot each), while the first replica starts.
        hosts = [Host(binary, name, log_dir) for name in ("a", "b")]
        builds = [threading.Thread(target=host.build_base) for host in hosts]
        for build in builds:
            build.start()
        # The first replica makes the team, its key and the shared secrets; then the others.
        replicas.append(Replica(binary, database_url, shared, join_token, log_dir, 0))
        with open(os.path.join(replicas[0].data, "cp", "initial-api-key")) as f:
            key = f.read().strip()
        for index in (1, 2):
            replicas.append(Replica(binary, database_url, shared, join_token, log_dir, index))
        for build in builds:
            build.join()
        # Each host joins (and heartbeats to) a replica of its own, not the lifecycle's (which
        # the test kills first).
        wait_until("a replica to hold the lifecycle", 30,
                   lambda: any(replica.holds("lifecycle") for replica in replicas))
        others = [replica for replica in replicas if not replica.holds("lifecycle")]
        for host, replica in zip(hosts, others):
            host.join(replica)
        for replica in replicas:
            for host in hosts:
                wait_until(f"replica {replica.api_port} to see host {host.name} up", 60,
                           lambda: host_state(replica, key, f"replica-host-{host.name}") == "up")
        yield replicas, hosts, key, schema
    except BaseException:
        for process in replicas + hosts:
            print(f"--- {process.log.name}\n{process.tail()}")
        raise
    finally:
        for host in hosts:
            host.stop()
        for replica in replicas:
            replica.stop()
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)
        for host in hosts:
            shutil.rmtree(host.data, ignore_errors=True)
        psql(f"DROP SCHEMA {schema} CASCADE")


def host_state(replica, key, name):
    status, body = http("GET", f"{replica.api_url}/hosts", key)
    assert status == 200, body
    return next((host["state"] for host in body["hosts"] if host["name"] == name), None)


def events(replica, key, kind, subject):
    status, body = http("GET", f"{replica.api_url}/v1/events?limit=1000", key)
    assert status == 200, body
    return [e for e in body["events"] if e["type"] == kind and e["subject"] == subject]


def live(replicas):
    return [replica for replica in replicas if replica.alive()]


def test_replicas_share_every_sandbox_and_hand_their_duties_over(fleet):
    replicas, hosts, key, schema = fleet
    sdk = [replica.sdk(key) for replica in replicas]

    # Creates at each replica; each sandbox runs a command through every replica's proxy.
    sandboxes = [Sandbox.create("base", timeout=300, **sdk[i]) for i in range(3)]
    for sandbox in sandboxes:
        for i in range(3):
            reached = Sandbox.connect(sandbox.sandbox_id, timeout=300, **sdk[i])
            assert reached.commands.run(f"echo replica-{i}").stdout.strip() == f"replica-{i}"

    # Paused at one replica, resumed by a connect at another (files and processes kept),
    # killed at the third.
    paused = sandboxes[0]
    paused.files.write("/home/user/kept.txt", "before the pause")
    paused.commands.run("sleep 3600", background=True)
    assert paused.pause() is True
    assert Sandbox.get_info(paused.sandbox_id, **sdk[1]).state.value == "paused"
    resumed = Sandbox.connect(paused.sandbox_id, timeout=300, **sdk[2])
    assert resumed.files.read("/home/user/kept.txt") == "before the pause"
    assert resumed.commands.run("pgrep -x sleep").exit_code == 0
    assert Sandbox.kill(paused.sandbox_id, **sdk[1]) is True
    for i in range(3):
        with pytest.raises(Exception):
            Sandbox.get_info(paused.sandbox_id, **sdk[i])

    # A create retried at another replica with its Idempotency-Key gets the first sandbox.
    body = {"templateID": "base", "timeout": 300}
    key_header = {"idempotency-key": f"retried-{uuid.uuid4().hex}"}
    first = http("POST", f"{replicas[0].api_url}/sandboxes", key, body, key_header)
    again = http("POST", f"{replicas[2].api_url}/sandboxes", key, body, key_header)
    assert first[0] == 201 and again[0] == 201, (first, again)
    assert first[1]["sandboxID"] == again[1]["sandboxID"]
    retried = first[1]["sandboxID"]

    # A pause and a kill of one sandbox at once, at two replicas: it ends killed, once.
    raced = sandboxes[1].sandbox_id
    answers = {}

    def call(name, method, url):
        answers[name] = http(method, url, key, {} if method == "POST" else None)

    threads = [
        threading.Thread(target=call, args=("pause", "POST",
                                            f"{replicas[0].api_url}/sandboxes/{raced}/pause")),
        threading.Thread(target=call, args=("kill", "DELETE",
                                            f"{replicas[1].api_url}/sandboxes/{raced}")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers["kill"][0] == 204, answers
    assert answers["pause"][0] in (204, 404), answers
    for replica in replicas:
        assert http("GET", f"{replica.api_url}/sandboxes/{raced}", key)[0] == 404
    assert len(events(replicas[2], key, "sandbox.killed", raced)) == 1

    # The lifecycle's replica dies as a sandbox's timeout passes: a survivor kills it, once.
    wait_until("a replica to hold the lifecycle", 30,
               lambda: any(replica.holds("lifecycle") for replica in replicas))
    lifecycle = next(replica for replica in replicas if replica.holds("lifecycle"))
    others = [replica for replica in replicas if replica is not lifecycle]
    expiring = Sandbox.create("base", timeout=4, **others[0].sdk(key))
    lifecycle.kill()
    wait_until("the sandbox timed out in the handover to be killed", LEASE_MS / 1000 + 30,
               lambda: http("GET", f"{others[0].api_url}/sandboxes/{expiring.sandbox_id}",
                            key)[0] == 404)
    time.sleep(2 * LEASE_MS / 1000)
    assert len(events(others[1], key, "sandbox.timed_out", expiring.sandbox_id)) == 1
    assert len(events(others[1], key, "sandbox.killed", expiring.sandbox_id)) == 1

    # The sandboxes left are killed at a survivor: nothing of them stays on the hosts.
    for sandbox_id in (sandboxes[2].sandbox_id, retried):
        assert http("DELETE", f"{others[0].api_url}/sandboxes/{sandbox_id}", key)[0] == 204

    # The fleet watch's replica dies as the host joined there stops answering (frozen): the
    # survivor marks that host down, once, and the other stays up. Thawed and joined at the
    # survivor (as a load balancer would send it there), it is up again.
    wait_until("a replica to hold the fleet watch", 30,
               lambda: any(replica.holds("fleet-watch") for replica in live(replicas)))
    watch = next(replica for replica in live(replicas) if replica.holds("fleet-watch"))
    survivor = next(replica for replica in live(replicas) if replica is not watch)
    silent = next(host for host in hosts if host.joined_at is watch)
    staying = next(host for host in hosts if host is not silent)
    silent.process.send_signal(signal.SIGSTOP)
    try:
        watch.kill()
        wait_until("the silent host to be marked down", LEASE_MS / 1000 + 30,
                   lambda: host_state(survivor, key, f"replica-host-{silent.name}") == "down")
        time.sleep(2 * LEASE_MS / 1000)
        status, body = http("GET", f"{survivor.api_url}/hosts", key)
        down = next(host for host in body["hosts"]
                    if host["name"] == f"replica-host-{silent.name}")
        # The fleet's own events are the operators' (no team's key lists them): read the store.
        recorded = psql(f"SELECT COUNT(*) FROM {schema}.events "
                        f"WHERE kind = 'host.down' AND subject = '{down['hostID']}'")
        assert recorded == "1"
        assert host_state(survivor, key, f"replica-host-{staying.name}") == "up"
    finally:
        silent.process.send_signal(signal.SIGCONT)
    silent.stop()
    silent.join(survivor)
    wait_until("the silent host up again", 60,
               lambda: host_state(survivor, key, f"replica-host-{silent.name}") == "up")
    fresh = Sandbox.create("base", timeout=300, **survivor.sdk(key))
    assert fresh.commands.run("echo served").stdout.strip() == "served"
    fresh.kill()

    # Nothing is left on the hosts.
    for host in hosts:
        host.stop()
        assert host.leftovers() == [], host.name
