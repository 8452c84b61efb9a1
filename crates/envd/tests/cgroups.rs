//! envd with cgroups v2: processes and terminals land in their groups, `/snapshot/prepare`
//! freezes them and `/init` thaws them, `/metrics` reports them. Needs root and a writable
//! cgroup v2 hierarchy; skipped with a message otherwise.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Envd, request};
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

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn start(client: &wrenn_connect::client::ConnectClient, pty: bool) -> u32 {
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/sleep".into(),
            args: vec!["30".into()],
            ..Default::default()
        }),
        pty: pty.then_some(pb::Pty {
            size: Some(pb::pty::Size { cols: 80, rows: 24 }),
        }),
        ..Default::default()
    };
    let mut stream = client
        .server_stream::<_, pb::StartResponse>(
            "/process.Process/Start",
            &request,
            &http::HeaderMap::new(),
        )
        .await
        .unwrap();
    let pid = wrenn_testkit::started_pid(&mut stream).await;
    // The stream may go; the process stays.
    pid
}

#[tokio::test]
async fn processes_are_grouped_frozen_and_thawed() {
    if !common::is_root() {
        eprintln!("skipped: cgroups need root");
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        eprintln!("skipped: no writable cgroup v2 hierarchy on this machine");
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
    assert_eq!(
        request("POST", &format!("{}/snapshot/prepare", envd.url()), &[], "")
            .await
            .status,
        200
    );
    // It answers only once they are frozen.
    assert!(
        frozen("user") && frozen("ptys"),
        "/snapshot/prepare answered before the freeze"
    );
    let metrics = request("GET", &format!("{}/metrics", envd.url()), &[], "")
        .await
        .json();
    assert_eq!(metrics["cgroups"]["user"]["frozen"], true, "{metrics}");
    assert_eq!(
        request("POST", &format!("{}/init", envd.url()), &[], "{}")
            .await
            .status,
        204
    );
    wait_for("the groups to thaw", || !frozen("user") && !frozen("ptys"));

    for pid in [command, terminal] {
        let kill = pb::SendSignalRequest {
            process: Some(pb::ProcessSelector {
                selector: Some(pb::process_selector::Selector::Pid(pid)),
            }),
            signal: pb::Signal::Sigkill as i32,
        };
        let _: pb::SendSignalResponse = client
            .unary(
                "/process.Process/SendSignal",
                &kill,
                &http::HeaderMap::new(),
            )
            .await
            .unwrap();
    }
    drop(envd);
    wait_for("the groups to empty", || {
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
