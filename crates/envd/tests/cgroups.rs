//! envd with cgroups v2: processes and terminals land in their groups, `/snapshot/prepare`
//! freezes them and `/init` thaws them, `/metrics` reports them. Needs root and a writable
//! cgroup v2 hierarchy: without them skipped with a message, or failed where
//! `WRENN_REQUIRE_PREREQUISITES=1` (see `wrenn_testkit::missing_prerequisite`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Envd, pty, start_request, start_stream};
use wrenn_connect::Codec;
use wrenn_connect::client::HttpVersion;
use wrenn_proto::process as pb;

/// A writable cgroup v2 mount point, if any.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let mount = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
    })?;
    let probe = mount.join(format!("wrenn-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).ok()?;
    std::fs::remove_dir(&probe).ok()?;
    Some(mount)
}

fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

/// Starts `sleep 30` (in a terminal if `terminal`) and returns its pid.
async fn start(client: &wrenn_connect::client::ConnectClient, terminal: bool) -> u32 {
    let mut request = start_request("/bin/sleep", &["30"]);
    if terminal {
        request.pty = pty(80, 24);
    }
    let mut stream = start_stream(client, &request, &http::HeaderMap::new()).await;
    // The stream may go; the process stays.
    wrenn_testkit::started_pid(&mut stream).await
}

#[tokio::test]
async fn processes_are_grouped_frozen_and_thawed() {
    // Making cgroups needs root, and a cgroup v2 hierarchy it may write to.
    let Some(mount) = cgroup2_mount().filter(|_| common::is_root()) else {
        wrenn_testkit::missing_prerequisite(
            "the cgroup test",
            "needs root and a writable cgroup v2 hierarchy",
        );
        return;
    };
    let name = format!("wrenn-test-{}", std::process::id());
    let root = mount.join(&name);
    let envd = Envd::start_with(&["--cgroup-root", root.to_str().unwrap()]);
    let client = envd.client(HttpVersion::Http1, Codec::Json);
    let command = start(&client, false).await;
    let terminal = start(&client, true).await;
    assert!(
        cgroup_of(command).ends_with(&format!("/{name}/user")),
        "{}",
        cgroup_of(command)
    );
    assert!(
        cgroup_of(terminal).ends_with(&format!("/{name}/ptys")),
        "{}",
        cgroup_of(terminal)
    );

    let frozen = |group: &str| {
        std::fs::read_to_string(root.join(group).join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    };
    let prepared = envd.request("POST", "/snapshot/prepare", &[], "").await;
    assert_eq!(prepared.status, 200);
    // It answers only once they are frozen.
    assert!(
        frozen("user") && frozen("ptys"),
        "/snapshot/prepare answered before the freeze"
    );
    let metrics = envd.request("GET", "/metrics", &[], "").await.json();
    assert_eq!(metrics["cgroups"]["user"]["frozen"], true, "{metrics}");
    assert_eq!(envd.request("POST", "/init", &[], "{}").await.status, 204);
    let within = Duration::from_secs(5);
    common::wait_for("the groups thawing", within, || {
        !frozen("user") && !frozen("ptys")
    });

    for pid in [command, terminal] {
        common::send_signal(&client, pid, pb::Signal::Sigkill)
            .await
            .unwrap();
    }
    drop(envd);
    common::wait_for("the groups emptying", within, || {
        ["user", "ptys"].iter().all(|g| {
            std::fs::read_to_string(root.join(g).join("cgroup.procs"))
                .map(|p| p.trim().is_empty())
                .unwrap_or(true)
        })
    });
    for dir in [root.join("user"), root.join("ptys"), root.clone()] {
        let _ = std::fs::remove_dir(dir);
    }
}
