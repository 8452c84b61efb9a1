"""What the SDK user of `wrenn up` feels on the paths of issue #12, measured with the real
`e2b` SDK against a running `wrenn up` (medians go to docs/benchmarks.md):

- a command's round trip (`commands.run("true")`) over plain HTTP (E2B_API_URL and
  E2B_SANDBOX_URL) against HTTPS under the domain (E2B_DOMAIN, the local authority's
  certificates), interleaved on one sandbox each;
- how long a command streaming from a sandbox takes to fail after another client kills the
  sandbox (before #12 it waited for its own timeout).

Run (as root, with `wrenn up` running with its defaults):
  WRENN_DATA_DIR=/var/lib/wrenn ~/.cache/wrenn/sdk-venv/bin/python benches/sdk_paths.py
"""

import json
import os
import statistics
import threading
import time

DATA = os.environ.get("WRENN_DATA_DIR", "/var/lib/wrenn")
ROUNDS = int(os.environ.get("ROUNDS", "30"))
KILLS = int(os.environ.get("KILLS", "8"))
API = os.environ.get("WRENN_API_URL", "http://127.0.0.1:3000")
PROXY = os.environ.get("WRENN_SANDBOX_URL", "http://127.0.0.1:3001")
DOMAIN = os.environ.get("WRENN_DOMAIN", "wrenn.localhost")

os.environ["E2B_API_KEY"] = open(os.path.join(DATA, "cp", "initial-api-key")).read().strip()
os.environ["SSL_CERT_FILE"] = os.path.join(DATA, "tls", "ca-bundle.pem")
for name in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN", "E2B_DEBUG"):
    os.environ.pop(name, None)

from e2b import Sandbox  # noqa: E402  (after the environment is set)
from e2b.exceptions import SandboxNotRunningException  # noqa: E402

plain = {"api_url": API, "sandbox_url": PROXY}
https = {"domain": DOMAIN}


def ms(seconds):
    return round(seconds * 1000, 1)


def round_trips():
    over_http = Sandbox.create(timeout=600, **plain)
    over_https = Sandbox.connect(over_http.sandbox_id, **https)
    timings = {"http": [], "https": []}
    try:
        for sandbox in (over_http, over_https):
            sandbox.commands.run("true")  # connections open
        for _ in range(ROUNDS):
            for name, sandbox in (("http", over_http), ("https", over_https)):
                started = time.perf_counter()
                sandbox.commands.run("true")
                timings[name].append(time.perf_counter() - started)
    finally:
        over_http.kill()
    return {name: ms(statistics.median(values)) for name, values in timings.items()}


def kill_to_error():
    waits = []
    for _ in range(KILLS):
        sandbox = Sandbox.create(timeout=600, **plain)
        handle = sandbox.commands.run("sleep 600", background=True, timeout=0)
        ended = {}

        def wait():
            try:
                handle.wait()
            except SandboxNotRunningException:
                ended["at"] = time.perf_counter()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        killed = time.perf_counter()
        Sandbox.kill(sandbox.sandbox_id, **plain)
        returned = time.perf_counter()
        waiter.join(timeout=120)
        if "at" not in ended:
            raise SystemExit("the stream did not end with SandboxNotRunningException")
        waits.append((ended["at"] - killed, returned - killed))
    return {
        "stream_error_after_kill_call_ms": ms(statistics.median(w[0] for w in waits)),
        "kill_call_ms": ms(statistics.median(w[1] for w in waits)),
    }


print(json.dumps({"rounds": ROUNDS, "command_round_trip_p50_ms": round_trips(), **kill_to_error()}, indent=2))
