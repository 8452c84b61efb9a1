#!/usr/bin/env python3
"""Fails when a crate of the workspace depends (outside its tests) on a crate its layer may
not see. The layers (docs/architecture.md), from the core out:

  proto, http  <-  connect  <-  envd (the guest)
  proto, connect, http, api  <-  agent-api (the HostAgent trait, join messages, remote client;
                                  api for the egress settings the agent enforces)
  proto, connect, http, vmm, image, agent-api  <-  agent (the host)
  proto, connect, http, api, agent-api  <-  cp (the control plane)
  everything  <-  wrenn (the binary)

api (the REST bodies) is used by cp; core (ids, tokens, the clock) by every crate.

Run by scripts/test.sh; reads `cargo metadata`."""

import json
import subprocess
import sys

# crate -> the workspace crates it may depend on (normal and build dependencies).
ALLOWED = {
    "wrenn-core": set(),
    "wrenn-proto": {"wrenn-core"},
    "wrenn-http": {"wrenn-core"},
    "wrenn-api": {"wrenn-core", "wrenn-http"},
    "wrenn-connect": {"wrenn-core", "wrenn-proto", "wrenn-http"},
    "wrenn-envd": {"wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http"},
    "wrenn-vmm": {"wrenn-core"},
    "wrenn-image": {"wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http"},
    # api: `wrenn_api::network`, the egress settings the REST API takes and the agent enforces.
    "wrenn-agent-api": {"wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http", "wrenn-api"},
    "wrenn-agent": {
        "wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http", "wrenn-vmm", "wrenn-image",
        "wrenn-agent-api",
    },
    "wrenn-cp": {"wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http", "wrenn-agent-api", "wrenn-api"},
    # What the tests share; a dev-dependency only (below: no crate may link it otherwise).
    "wrenn-testkit": {"wrenn-core", "wrenn-proto", "wrenn-connect", "wrenn-http"},
}
# Edges still to remove, each with the issue that removes it: reported, not failed.
PENDING: dict = {}

metadata = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"],
        check=True, capture_output=True,
    ).stdout
)
members = {package["name"] for package in metadata["packages"]}
problems, pending = [], []
for package in metadata["packages"]:
    name = package["name"]
    for dependency in package["dependencies"]:
        if dependency["name"] == "wrenn-testkit" and dependency.get("kind") != "dev":
            problems.append(f"{name} -> wrenn-testkit: the test kit is a dev-dependency only")
    # The binaries, and the example built on the wrenn command (examples/).
    if name in ("wrenn", "wrenn-bench", "wrenn-template-allowlist"):
        continue
    if name not in ALLOWED:
        problems.append(f"{name}: not in scripts/check-layers.py: say which layer it is")
        continue
    for dependency in package["dependencies"]:
        target = dependency["name"]
        if target not in members or dependency.get("kind") == "dev":
            continue
        if target in ALLOWED[name]:
            continue
        if (name, target) in PENDING:
            pending.append(f"{name} -> {target} ({PENDING[(name, target)]})")
            continue
        problems.append(f"{name} -> {target}: forbidden by the layers")
# The control plane's core knows no HTTP: only its edge (http/: the REST API and its OpenAPI
# document; the edge proxy; the HTTPS front) names axum or status codes.
CP_EDGE = {"proxy.rs", "tls.rs", "server.rs"}
import pathlib, re
cp_src = pathlib.Path(__file__).resolve().parent.parent / "crates" / "cp" / "src"
for path in sorted(cp_src.rglob("*.rs")):
    relative = path.relative_to(cp_src).as_posix()
    if relative in CP_EDGE or relative.startswith("http/"):
        continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.search(r"\baxum\b|\bStatusCode\b", line):
            problems.append(
                f"crates/cp/src/{path.relative_to(cp_src).as_posix()}:{number}: the control plane's core names HTTP (only http/, proxy.rs and tls.rs may)"
            )
for edge in pending:
    print(f"check-layers: still to remove: {edge}")
if problems:
    for problem in problems:
        print(f"check-layers: {problem}", file=sys.stderr)
    sys.exit(1)
print(f"check-layers: {len(members)} crates, no forbidden dependency")
