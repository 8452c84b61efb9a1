"""What operators see, against `wrenn up` with real QEMU guests: a sandbox's metrics history
(sampled by the agent, collected by the control plane), its log (the guest's console and envd's
own lines, kept after the kill), and the Prometheus metrics, parsed by the official client's
OpenMetrics parser. The session's `wrenn up` samples every second (conftest.py)."""

import json
import time
import urllib.error
import urllib.request
import uuid

from e2b import Sandbox
from prometheus_client.openmetrics.parser import text_string_to_metric_families


def api(wrenn, path):
    request = urllib.request.Request(f"{wrenn.api_url}{path}", headers={"X-API-Key": wrenn.key})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def wait_for(what, check, timeout=60):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)


def test_a_cpu_burn_then_idle_shows_in_the_metrics_history_at_its_times(wrenn):
    sandbox = Sandbox.create(timeout=180)
    try:
        busy_from = time.time()
        # Every CPU busy for 12 s, then nothing.
        sandbox.commands.run(
            "for i in $(seq $(nproc)); do timeout 12 sh -c 'while :; do :; done' & done; wait",
            timeout=60,
        )
        busy_until = time.time()
        time.sleep(12)
        idle_until = time.time()
        # Collected every second: wait for the idle part to be stored.
        def idle_samples():
            samples = sandbox.get_metrics(start=None, end=None)
            late = [s for s in samples if s.timestamp.timestamp() > busy_until + 3]
            return samples if len(late) >= 3 else None

        samples = wait_for("samples after the burn", idle_samples)
        busy = [
            s.cpu_used_pct for s in samples
            if busy_from + 3 <= s.timestamp.timestamp() <= busy_until - 1
        ]
        idle = [
            s.cpu_used_pct for s in samples
            if busy_until + 3 <= s.timestamp.timestamp() <= idle_until
        ]
        assert len(busy) >= 3, [(s.timestamp, s.cpu_used_pct) for s in samples]
        assert len(idle) >= 3, [(s.timestamp, s.cpu_used_pct) for s in samples]
        assert sum(busy) / len(busy) > 70, busy
        assert sum(idle) / len(idle) < 30, idle
        assert all(s.mem_total > 0 and s.disk_total > 0 for s in samples)
        # A range gives its part: the burn alone.
        ranged = sandbox.get_metrics(
            start=__import__("datetime").datetime.fromtimestamp(busy_from + 3),
            end=__import__("datetime").datetime.fromtimestamp(busy_until - 1),
        )
        assert ranged and all(
            busy_from + 2 <= s.timestamp.timestamp() <= busy_until for s in ranged
        ), ranged
        # The host counts the guest's traffic.
        status, raw = api(wrenn, f"/sandboxes/{sandbox.sandbox_id}/metrics")
        assert status == 200 and raw[-1]["netRxBytes"] > 0, raw[-1]
    finally:
        sandbox.kill()
    # Killed, its history is still its team's.
    status, kept = api(wrenn, f"/sandboxes/{sandbox.sandbox_id}/metrics")
    assert status == 200 and len(kept) >= len(samples)


def test_the_console_and_envds_lines_are_the_sandboxs_log_also_after_the_kill(wrenn):
    marker = f"console-marker-{uuid.uuid4().hex[:12]}"
    sandbox = Sandbox.create(timeout=120)
    sandbox_id = sandbox.sandbox_id
    try:
        sandbox.commands.run(f"echo {marker} > /dev/console", user="root")
        sandbox.commands.run("true")
    finally:
        sandbox.kill()

    status, body = api(wrenn, f"/v2/sandboxes/{sandbox_id}/logs")
    assert status == 200
    lines = body["logs"]
    console = [l for l in lines if marker in l["message"]]
    assert console and console[0]["fields"]["source"] == "console", lines[-20:]
    started = [l for l in lines if l["message"] == "process started"]
    assert started, lines[-20:]
    assert started[0]["fields"]["source"] == "envd"
    assert started[0]["fields"]["cmd"] == "/bin/bash"
    assert started[0]["level"] == "info"
    # v1, and the filters.
    status, v1 = api(wrenn, f"/sandboxes/{sandbox_id}/logs")
    assert status == 200 and any(marker in l["line"] for l in v1["logs"])
    status, found = api(wrenn, f"/v2/sandboxes/{sandbox_id}/logs?search={marker.upper()}")
    assert [l["message"] for l in found["logs"]] == [console[0]["message"]]
    # The CLI reads the same log.
    listed = wrenn.api_cli("sandbox", "logs", sandbox_id, "--search", marker, key=wrenn.key)
    assert marker in listed.stdout, listed.stderr
    # Another team sees nothing of it.
    other = wrenn.new_team_key("logs-other")
    request = urllib.request.Request(
        f"{wrenn.api_url}/v2/sandboxes/{sandbox_id}/logs", headers={"X-API-Key": other}
    )
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("another team read the log")
    except urllib.error.HTTPError as error:
        assert error.code == 404


def scrape(wrenn):
    with urllib.request.urlopen(f"{wrenn.api_url}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    return families


def value(families, name, sample_name, **labels):
    for sample in families[name].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def test_the_prometheus_metrics_parse_and_move_with_creates(wrenn):
    before = scrape(wrenn)
    created = value(before, "wrenn_sandbox_creates", "wrenn_sandbox_creates_total", outcome="created")
    assert created is not None
    sandbox = Sandbox.create(timeout=60)
    try:
        assert sandbox.get_info().sandbox_id == sandbox.sandbox_id
        after = scrape(wrenn)
        assert value(after, "wrenn_sandbox_creates", "wrenn_sandbox_creates_total",
                     outcome="created") >= created + 1
        assert value(after, "wrenn_sandboxes", "wrenn_sandboxes", state="running") >= 1
        assert value(after, "wrenn_sandbox_create_duration_seconds",
                     "wrenn_sandbox_create_duration_seconds_count") >= 1
        # The agent's, in the same process: its create phases and slots.
        assert value(after, "wrenn_agent_create_phase_duration_seconds",
                     "wrenn_agent_create_phase_duration_seconds_count", phase="restore") >= 1
        assert value(after, "wrenn_agent_slots", "wrenn_agent_slots", state="total") > 0
        # Requests by route (templates, never ids).
        routes = {s.labels.get("route") for s in after["wrenn_http_requests"].samples}
        # The SDK creates through /v2/sandboxes, and its calls name sandboxes in their paths.
        assert {"/v2/sandboxes", "/sandboxes/{id}"} <= routes, routes
        assert not any(sandbox.sandbox_id in (route or "") for route in routes)
    finally:
        sandbox.kill()


def test_the_grafana_dashboard_charts_only_metrics_wrenn_serves(wrenn):
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "grafana-dashboard.json")
    with open(path) as f:
        dashboard = json.load(f)
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert expressions
    served = set(scrape(wrenn))
    for expression in expressions:
        for name in re.findall(r"\bwrenn_[a-z_]+", expression):
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert family in served, f"{name} in {expression!r} is not served"
