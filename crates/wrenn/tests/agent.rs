//! The host agent end to end, with real QEMU VMs (software emulation here): `wrenn agent serve`
//! runs as a process of its own; these tests drive its Connect API and the envd inside each
//! sandbox, kill and restart it, kill a VM, and check that nothing is left afterwards.
//!
//! Needs root, QEMU and the built image (`wrenn image build`); without them the tests say so and
//! pass, unless `WRENN_REQUIRE_PREREQUISITES=1` (scripts/test.sh sets it), where they fail.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderMap;
use support::*;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_connect::{Code, Codec};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;
use wrenn_proto::process as proc_pb;

/// Asserts that the first line of `ran`'s output is `first` (`what` names it in a failure), and
/// returns the number on its second line.
fn line_then_number(ran: &Ran, first: &str, what: &str) -> u64 {
    let mut lines = ran.stdout.lines();
    assert_eq!(lines.next(), Some(first), "{what}: {ran:?}");
    lines.next().unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_run_pause_resume_and_leave_nothing_behind() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wta", 200);
    let template = agent.build_template("base").await;
    assert_eq!((template.memory_mib, template.accel.as_str()), (512, "tcg"));
    assert!(template.snapshot_bytes > 0);

    // Three at once; the second is secured with an envd access token.
    let (a, b, c) = tokio::join!(
        agent.create("base", "sbx-a", None),
        agent.create("base", "sbx-b", Some("secret-b")),
        agent.create("base", "sbx-c", None),
    );
    let sandboxes = [(&a, None), (&b, Some("secret-b")), (&c, None)];
    let mut addresses = std::collections::HashSet::new();
    for (sandbox, token) in sandboxes {
        assert_eq!(sandbox.state, "running");
        assert!(
            addresses.insert(sandbox.envd_address.clone()),
            "addresses are unique"
        );
        let ran = run(
            sandbox,
            token,
            "echo $SANDBOX_NAME > ~/name && cat ~/name && echo $E2B_SANDBOX_ID && whoami && pwd",
        )
        .await;
        assert_eq!(
            ran.stdout,
            format!("{0}\n{0}\nuser\n/home/user\n", sandbox.sandbox_id),
            "{ran:?}"
        );
    }
    // A wrong token is refused by the secured sandbox's envd.
    let refused = ConnectClient::new(
        format!("http://{}", b.envd_address),
        HttpVersion::Http1,
        Codec::Json,
    )
    .call_streaming::<wrenn_proto::process::process::Start>(
        &proc_pb::StartRequest::default(),
        &envd_headers(Some("wrong")),
    )
    .await
    .map(drop);
    // envd's 401 (E2B's body, not a Connect error) reads as Unauthenticated.
    assert_code(refused, Code::Unauthenticated, "401");

    // The metadata service gives each guest the hash of its own envd token, as envd checks it.
    let mmds_hash = "t=$(curl -s -m 5 -X PUT -H 'X-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token); curl -s -m 5 -H \"X-metadata-token: $t\" http://169.254.169.254/accessTokenHash";
    for (sandbox, token) in [(&a, ""), (&b, "secret-b")] {
        let ran = run(sandbox, Some(token).filter(|t| !t.is_empty()), mmds_hash).await;
        assert_eq!(
            ran.stdout.trim(),
            format!("\"{}\"", wrenn_core::access_token_hash(token)),
            "{}: {ran:?}",
            sandbox.sandbox_id
        );
    }

    // A background process started before the pause lives on after the resume.
    let started = run(
        &a,
        None,
        "nohup sh -c 'while true; do date +%s%N >> /home/user/ticks; sleep 0.2; done' >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid: u32 = started.stdout.trim().parse().expect("a pid");
    let paused: pb::PauseSandboxResponse = agent.pause("sbx-a").await.expect("PauseSandbox");
    assert_eq!(paused.sandbox.as_ref().unwrap().state, "paused");
    assert!(paused.snapshot_bytes > 0);
    assert_eq!(agent.get("sbx-a").await.unwrap().state, "paused");
    assert_code(
        agent.pause("sbx-a").await,
        Code::FailedPrecondition,
        "only a running sandbox can be paused",
    );
    let resumed: pb::ResumeSandboxResponse = agent.resume("sbx-a").await.expect("ResumeSandbox");
    let a = resumed.sandbox.unwrap();
    assert_eq!(a.state, "running");
    let before = run(&a, None, "cat ~/name; wc -l < ~/ticks").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = run(
        &a,
        None,
        &format!("kill -0 {pid} && echo alive; wc -l < ~/ticks"),
    )
    .await;
    let ticks_before = line_then_number(&before, "sbx-a", "the file written before the pause");
    let ticks_after = line_then_number(&after, "alive", "the background process");
    assert!(
        ticks_after > ticks_before,
        "the background process still writes: {ticks_before} → {ticks_after}"
    );
    // A second resume of a running sandbox is refused.
    assert_code(
        agent.resume("sbx-a").await,
        Code::FailedPrecondition,
        "only a paused sandbox can be resumed",
    );
    // The template is in use: it cannot be deleted yet.
    assert_code(
        agent.delete_template("base").await,
        Code::FailedPrecondition,
        "in use",
    );

    // A caller that hangs up mid-create does not cut the create off halfway: it finishes, and
    // the sandbox runs (its owner can destroy it; nothing is half made).
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", agent.api_port))
            .await
            .unwrap();
        let body = r#"{"templateId":"base","sandboxId":"sbx-d"}"#;
        let request = format!(
            "POST /wrenn.agent.v1.HostAgent/CreateSandbox HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            agent.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // Hang up once the create has begun.
        wait_until("the create to begin", Duration::from_secs(30), async || {
            agent.get("sbx-d").await.is_ok()
        })
        .await;
        drop(stream);
    }
    let abandoned = agent
        .wait_state(
            "the abandoned create to finish",
            Duration::from_secs(60),
            "sbx-d",
            "running",
        )
        .await;
    let ran = run(&abandoned, None, "echo finished").await;
    assert_eq!(ran.stdout.trim(), "finished", "{ran:?}");

    for id in ["sbx-a", "sbx-b", "sbx-c", "sbx-d"] {
        let _: pb::DestroySandboxResponse = agent.destroy(id).await.expect("DestroySandbox");
    }
    let listed: pb::ListSandboxesResponse = agent
        .call::<host_agent::ListSandboxes>(&pb::ListSandboxesRequest {})
        .await
        .unwrap();
    assert!(listed.sandboxes.is_empty());
    let _: pb::DeleteTemplateResponse =
        agent.delete_template("base").await.expect("DeleteTemplate");
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// The number a background ticker (started by [`start_ticker`]) has written so far, and
/// whether its process `pid` lives: the process of that pid is the ticker (after a boot the
/// pid may be another's; the pattern is written so that it does not match this command's own).
async fn ticks(sandbox: &pb::Sandbox, token: Option<&str>, pid: u32) -> (bool, u64) {
    let ran = run(
        sandbox,
        token,
        &format!(
            "if tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -q '[w]hile true'; \
             then echo alive; else echo gone; fi; wc -l < ~/ticks"
        ),
    )
    .await;
    let mut lines = ran.stdout.lines();
    let alive = lines.next() == Some("alive");
    let count = lines.next().unwrap_or("").trim().parse().unwrap_or(0);
    (alive, count)
}

/// Starts a process in the background that appends a line to `~/ticks` every 0.2 s: its pid.
async fn start_ticker(sandbox: &pb::Sandbox, token: Option<&str>) -> u32 {
    let started = run(
        sandbox,
        token,
        "nohup sh -c 'while true; do date +%s%N >> /home/user/ticks; sleep 0.2; done' >/dev/null 2>&1 & echo $!",
    )
    .await;
    started.stdout.trim().parse().expect("a pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_make_snapshots_and_forks_of_running_sandboxes_and_pauses_may_keep_the_disk_alone()
 {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wtk", 520);
    agent.build_template("base").await;
    let source = agent.create("base", "sbx-src", Some("secret-src")).await;
    let src_token = Some("secret-src");
    run(&source, src_token, "echo before > ~/before").await;
    let pid = start_ticker(&source, src_token).await;

    // A snapshot: the source is stopped only while its memory is written, and goes on.
    let made = agent
        .checkpoint("sbx-src", "snap-1", false)
        .await
        .expect("CheckpointSandbox");
    let template = made.template.clone().unwrap();
    assert_eq!(template.template_id, "snap-1");
    assert!(made.snapshot_bytes > 0 && made.paused_ms > 0, "{made:?}");
    assert!(made.paused_ms <= made.total_ms, "{made:?}");
    let (alive, at_snapshot) = ticks(&source, src_token, pid).await;
    assert!(alive, "the source's process goes on");
    run(&source, src_token, "echo after > ~/after").await;
    // Another checkpoint of the same name is refused, and one of a sandbox that is not running.
    assert_code(
        agent.checkpoint("sbx-src", "snap-1", false).await,
        Code::AlreadyExists,
        "already exists",
    );

    // Sandboxes from it: the file and the process from before it, not what came after; each
    // with its own token and variables, diverging from the others.
    let (f1, f2) = tokio::join!(
        agent.create("snap-1", "sbx-f1", Some("secret-f1")),
        agent.create("snap-1", "sbx-f2", Some("secret-f2")),
    );
    for (fork, token) in [(&f1, "secret-f1"), (&f2, "secret-f2")] {
        assert_eq!(fork.state, "running");
        let ran = run(
            fork,
            Some(token),
            "cat ~/before; test -e ~/after && echo leaked || echo clean; echo $SANDBOX_NAME",
        )
        .await;
        assert_eq!(
            ran.stdout,
            format!("before\nclean\n{}\n", fork.sandbox_id),
            "{ran:?}"
        );
        let (alive, first) = ticks(fork, Some(token), pid).await;
        assert!(
            alive,
            "{}: the process from before the snapshot runs",
            fork.sandbox_id
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (_, later) = ticks(fork, Some(token), pid).await;
        assert!(
            later > first,
            "{}: it still writes ({first} → {later})",
            fork.sandbox_id
        );
        // Its ticks start from the snapshot's, not from what the source wrote after it.
        assert!(
            first >= at_snapshot.saturating_sub(2),
            "{first} vs {at_snapshot}"
        );
        // The source's token is not this sandbox's.
        let refused = ConnectClient::new(
            format!("http://{}", fork.envd_address),
            HttpVersion::Http1,
            Codec::Json,
        )
        .call_streaming::<wrenn_proto::process::process::Start>(
            &proc_pb::StartRequest::default(),
            &envd_headers(Some("secret-src")),
        )
        .await
        .map(drop);
        assert_code(refused, Code::Unauthenticated, "401");
    }
    run(&f1, Some("secret-f1"), "echo f1 > ~/mine").await;
    let ran = run(
        &f2,
        Some("secret-f2"),
        "cat ~/mine 2>/dev/null || echo none",
    )
    .await;
    assert_eq!(ran.stdout.trim(), "none", "{ran:?}");
    let ran = run(
        &source,
        src_token,
        "cat ~/after; test -e ~/mine && echo leaked || echo clean",
    )
    .await;
    assert_eq!(ran.stdout, "after\nclean\n", "{ran:?}");
    // A snapshot a sandbox stands on is not deleted.
    assert_code(
        agent.delete_template("snap-1").await,
        Code::FailedPrecondition,
        "in use",
    );

    // A fork's checkpoint: ephemeral, gone once neither the source nor its forks stand on it.
    agent
        .checkpoint("sbx-src", "fork-1", true)
        .await
        .expect("an ephemeral checkpoint");
    let k = agent.create("fork-1", "sbx-k", Some("secret-k")).await;
    let ran = run(&k, Some("secret-k"), "cat ~/after").await;
    assert_eq!(ran.stdout.trim(), "after", "{ran:?}");
    let _: pb::DestroySandboxResponse = agent.destroy("sbx-k").await.unwrap();
    assert!(template_names(&agent).await.contains(&"fork-1".to_string()));
    // A snapshot no sandbox was made from is deleted while its source runs on its layer: the
    // host keeps the layer until the source goes.
    agent
        .checkpoint("sbx-src", "snap-2", false)
        .await
        .expect("a second snapshot");
    let _: pb::DeleteTemplateResponse = agent.delete_template("snap-2").await.unwrap();
    let ran = run(&source, src_token, "cat ~/after").await;
    assert_eq!(ran.stdout.trim(), "after", "{ran:?}");
    let _: pb::DestroySandboxResponse = agent.destroy("sbx-src").await.unwrap();
    let names = template_names(&agent).await;
    assert!(!names.contains(&"fork-1".to_string()), "{names:?}");
    assert!(!names.contains(&"snap-2".to_string()), "{names:?}");
    assert!(names.contains(&"snap-1".to_string()), "{names:?}");

    // A pause that keeps the disk alone: files stay, processes go, the token and variables
    // stay.
    run(&f1, Some("secret-f1"), "echo kept > ~/kept").await;
    let paused = agent
        .pause_disk_only("sbx-f1")
        .await
        .expect("a disk-only pause");
    assert_eq!(paused.sandbox.as_ref().unwrap().state, "paused");
    assert_eq!(paused.snapshot_bytes, 0);
    let resumed = agent
        .resume("sbx-f1")
        .await
        .expect("a resume from the disk");
    let f1 = resumed.sandbox.unwrap();
    let ran = run(
        &f1,
        Some("secret-f1"),
        "cat ~/kept ~/mine; echo $SANDBOX_NAME",
    )
    .await;
    assert_eq!(ran.stdout, "kept\nf1\nsbx-f1\n", "{ran:?}");
    let (alive, _) = ticks(&f1, Some("secret-f1"), pid).await;
    assert!(!alive, "a boot leaves no process of before");

    for id in ["sbx-f1", "sbx-f2"] {
        let _: pb::DestroySandboxResponse = agent.destroy(id).await.unwrap();
    }
    let _: pb::DeleteTemplateResponse = agent.delete_template("snap-1").await.unwrap();
    let _: pb::DeleteTemplateResponse = agent.delete_template("base").await.unwrap();
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(agent.data_dir().join("templates"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_running_sandboxes_and_reports_a_dead_vm() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wtb", 300);

    // Bad input gets clear errors.
    assert_code(
        agent
            .client("wrong-token")
            .unary::<_, pb::ListSandboxesResponse>(
                "/wrenn.agent.v1.HostAgent/ListSandboxes",
                &pb::ListSandboxesRequest {},
                &HeaderMap::new(),
            )
            .await,
        Code::Unauthenticated,
        "bearer token",
    );
    assert_code(
        agent.try_create("nope", "").await,
        Code::NotFound,
        "template nope not found",
    );
    assert_code(
        agent
            .call::<host_agent::BuildTemplate>(&pb::BuildTemplateRequest {
                template_id: "zero".into(),
                memory_mib: 0,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "memory_mib must be at least",
    );
    assert_code(
        agent.get("ghost").await,
        Code::NotFound,
        "sandbox ghost not found",
    );
    assert_code(agent.resume("ghost").await, Code::NotFound, "not found");
    assert_code(agent.destroy("../etc").await, Code::NotFound, "not found");

    agent.build_template("base").await;
    assert_code(
        agent.try_create("base", "Bad Id").await,
        Code::InvalidArgument,
        "must be 1 to 64",
    );
    let (one, two) = tokio::join!(
        agent.create("base", "keep", None),
        agent.create("base", "doomed", None)
    );
    assert_code(
        agent.try_create("base", "keep").await,
        Code::AlreadyExists,
        "already exists",
    );

    // Killed mid-way and restarted: both sandboxes are adopted and still answer.
    agent.kill();
    agent.spawn();
    for sandbox in [&one, &two] {
        let seen = agent.get(&sandbox.sandbox_id).await.unwrap();
        assert_eq!(seen.state, "running", "{seen:?}");
        assert_eq!(seen.pid, sandbox.pid, "the same VM");
        let ran = run(&seen, None, "echo $SANDBOX_NAME").await;
        assert_eq!(ran.stdout.trim(), sandbox.sandbox_id);
    }

    // A VM killed behind the agent's back is reported failed and its slot freed.
    let info = agent.host_info().await;
    assert_eq!(info.sandboxes_running, 2);
    let in_use_before = info.slots_in_use;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(two.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let failed = agent
        .wait_state(
            "the agent noticing the dead VM",
            Duration::from_secs(30),
            "doomed",
            "failed",
        )
        .await;
    assert!(failed.error.contains("exited unexpectedly"), "{failed:?}");
    assert_eq!(failed.envd_address, "");
    let info = agent.host_info().await;
    assert_eq!(
        info.slots_in_use,
        in_use_before - 1,
        "the dead VM's slot is free"
    );
    assert_eq!(info.sandboxes_running, 1);
    assert_code(
        agent.pause("doomed").await,
        Code::FailedPrecondition,
        "is failed",
    );

    for id in ["keep", "doomed"] {
        let _: pb::DestroySandboxResponse = agent.destroy(id).await.expect("DestroySandbox");
    }
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// Memory of `pid` shared with other processes (`Shared_Clean` + `Shared_Dirty`), in MiB.
fn shared_mib(pid: i32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    rollup
        .lines()
        .filter(|line| line.starts_with("Shared_"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        >> 10
}

/// A sandbox maps its template's memory instead of reading a copy: a process the build left
/// running runs in every sandbox, a file kept only in guest memory (tmpfs) reads back the same in
/// five of them, whose VMMs share its pages, and a sandbox's writes stay its own (the template
/// and the other sandboxes never see them). A restarted agent loads the memory from the
/// template's file; a sandbox paused and resumed keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_map_their_templates_memory_and_keep_their_writes_their_own() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wtm", 620);
    agent.build_template("base").await;
    let (log, built) = agent
        .run_build(&pb::RunTemplateBuildRequest {
            template_id: "inmem".into(),
            from_template: "base".into(),
            steps: vec![step(
                "RUN",
                &["head -c 48M /dev/urandom > /dev/shm/big && sha256sum < /dev/shm/big > /dev/shm/big.sum"],
            )],
            start_cmd: "sh -c 'echo $$ > /dev/shm/probe.pid; exec sleep 100000'".into(),
            ..Default::default()
        })
        .await;
    let built = built.unwrap_or_else(|error| panic!("{error}: {log:?}"));
    // The snapshot holds the devices' state; the memory is a file of its own.
    let dir = agent.data_dir().join("templates/inmem");
    let ram = std::fs::metadata(dir.join("memory.ram")).expect("the template's memory file");
    assert_eq!(ram.len(), 512 << 20);
    let stream = std::fs::metadata(dir.join("memory.snap")).unwrap().len();
    assert!(stream < 8 << 20, "the stream holds memory: {stream} bytes");
    assert_eq!(built.template_id, "inmem");

    let check = "kill -0 $(cat /dev/shm/probe.pid) && echo alive; sha256sum < /dev/shm/big; cat /dev/shm/big.sum";
    let expect_template = |ran: &Ran, who: &str| {
        let lines: Vec<&str> = ran.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{who}: {ran:?}");
        assert_eq!(
            lines[0], "alive",
            "{who}: the build's process runs: {ran:?}"
        );
        assert_eq!(
            lines[1], lines[2],
            "{who}: the file in memory is the template's: {ran:?}"
        );
        lines[2].to_string()
    };
    let mut sandboxes = Vec::new();
    let mut sum = None;
    for n in 0..5 {
        let id = format!("mem-{n}");
        let sandbox = agent.create("inmem", &id, None).await;
        let seen = expect_template(&run(&sandbox, None, check).await, &id);
        assert_eq!(sum.get_or_insert(seen.clone()), &seen);
        sandboxes.push(sandbox);
    }
    // The file's pages are the template's, mapped by every VMM, not copies.
    for sandbox in &sandboxes {
        let pids = agent.vmm_pids(&sandbox.sandbox_id);
        assert_eq!(pids.len(), 1, "{pids:?}");
        let shared = shared_mib(pids[0]);
        assert!(
            shared >= 48,
            "{}'s VMM shares {shared} MiB: the template's memory was copied",
            sandbox.sandbox_id
        );
    }
    // Each writes over the file: its own sees its write, the others and new sandboxes do not.
    for sandbox in &sandboxes {
        let wrote = run(
            sandbox,
            None,
            "printf %s $SANDBOX_NAME | dd of=/dev/shm/big conv=notrunc status=none && head -c 5 /dev/shm/big",
        )
        .await;
        assert_eq!(wrote.stdout, sandbox.sandbox_id, "{wrote:?}");
    }
    for sandbox in &sandboxes {
        let read = run(sandbox, None, "head -c 5 /dev/shm/big").await;
        assert_eq!(read.stdout, sandbox.sandbox_id, "{read:?}");
    }

    // Restarted, the agent loads the memory again from the template's file.
    agent.kill();
    agent.spawn();
    let late = agent.create("inmem", "mem-late", None).await;
    let seen = expect_template(&run(&late, None, check).await, "mem-late");
    assert_eq!(Some(&seen), sum.as_ref());
    // A pause writes the sandbox's memory whole; its resume reads it back, its write kept.
    let first = &sandboxes[0];
    agent.pause(&first.sandbox_id).await.expect("PauseSandbox");
    // Its stream names the memory by its object (what an agent restarted during a pause reads
    // to restore it the same way).
    let stream = std::fs::read(
        agent
            .data_dir()
            .join(format!("sandboxes/{}/memory.snap", first.sandbox_id)),
    )
    .unwrap();
    let head = &stream[..stream.len().min(1 << 20)];
    assert!(head.windows(5).any(|w| w == b"\x04ram0"));
    assert!(!head.windows(7).any(|w| w == b"\x06pc.ram"));
    assert!(stream.len() > 48 << 20, "the pause holds the whole memory");
    let resumed = agent
        .resume(&first.sandbox_id)
        .await
        .expect("ResumeSandbox")
        .sandbox
        .unwrap();
    let read = run(
        &resumed,
        None,
        "head -c 5 /dev/shm/big; echo; kill -0 $(cat /dev/shm/probe.pid) && echo alive",
    )
    .await;
    assert_eq!(
        read.stdout,
        format!("{}\nalive\n", first.sandbox_id),
        "{read:?}"
    );

    for sandbox in sandboxes.iter().chain([&late]) {
        agent
            .destroy(&sandbox.sandbox_id)
            .await
            .expect("DestroySandbox");
    }
    agent
        .delete_template("inmem")
        .await
        .expect("DeleteTemplate");
    assert!(!dir.exists());
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// Starts `PauseSandbox` or `ResumeSandbox` for `id` on a client of its own and leaves it in
/// flight (the agent is killed under it, so it ends in an error nobody reads).
fn start_in_background<M>(agent: &Agent, request: M::Request) -> tokio::task::JoinHandle<()>
where
    M: wrenn_proto::Rpc + 'static,
    M::Request: wrenn_connect::Message + Send + 'static,
    M::Response: wrenn_connect::Message + Send,
{
    let client = agent.client(&agent.token);
    tokio::spawn(async move {
        let _ = client.call::<M>(&request, &HeaderMap::new()).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_with_operations_in_flight_leaves_every_sandbox_whole_or_failed() {
    use nix::sys::signal::Signal;
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wtc", 400);
    agent.build_template("base").await;
    let (paused, waking, pausing, gone) = tokio::join!(
        agent.create("base", "paused", None),
        agent.create("base", "waking", None),
        agent.create("base", "pausing", None),
        agent.create("base", "gone", None),
    );
    for sandbox in [&paused, &waking, &pausing] {
        run_expecting(sandbox, "echo kept > ~/kept && cat ~/kept", "kept").await;
    }
    for id in ["paused", "waking"] {
        let _: pb::PauseSandboxResponse = agent.pause(id).await.expect("PauseSandbox");
    }

    // In flight when the agent dies, each held where it is by a stopped VMM:
    // a pause (its VM stopped, so envd's /snapshot/prepare cannot answer),
    let pausing_vmm = pausing.pid as i32;
    signal(pausing_vmm, Signal::SIGSTOP);
    let _pause = start_in_background::<host_agent::PauseSandbox>(
        &agent,
        pb::PauseSandboxRequest {
            sandbox_id: "pausing".into(),
            disk_only: false,
        },
    );
    agent
        .wait_state(
            "the pause to begin",
            Duration::from_secs(30),
            "pausing",
            "pausing",
        )
        .await;
    // a resume (its new VMM stopped while it loads the snapshot),
    let _resume = start_in_background::<host_agent::ResumeSandbox>(
        &agent,
        pb::ResumeSandboxRequest {
            sandbox_id: "waking".into(),
            ..Default::default()
        },
    );
    let waking_vmm = agent.freeze_new_vmm("waking").await;
    // and a create (the same).
    let create = pb::CreateSandboxRequest {
        template_id: "base".into(),
        sandbox_id: "half".into(),
        ..Default::default()
    };
    let _create = start_in_background::<host_agent::CreateSandbox>(&agent, create);
    let half_vmm = agent.freeze_new_vmm("half").await;
    for (id, state) in [("waking", "resuming"), ("half", "starting")] {
        let seen = agent.get(id).await.unwrap();
        assert_eq!(seen.state, state, "{id} is held mid-way: {seen:?}");
    }

    agent.kill();
    // While no agent runs: a VMM dies, the stopped ones run on, and a VMM no record accounts
    // for appears.
    signal(gone.pid as i32, Signal::SIGKILL);
    for pid in [pausing_vmm, waking_vmm, half_vmm] {
        signal(pid, Signal::SIGCONT);
    }
    let orphan_marker = format!("{}/sandboxes/orphan", agent.data_dir().display());
    let mut orphan = std::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-display", "none", "-nodefaults", "-S"])
        .args(["-name", &orphan_marker])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("starting a stray QEMU");
    wait_until(
        "the stray QEMU to start",
        Duration::from_secs(30),
        async || !vmm_pids_matching(&orphan_marker).is_empty(),
    )
    .await;
    agent.spawn();

    // The stray VMM is killed.
    let mut orphan_status = None;
    wait_until(
        "the stray QEMU to be killed",
        Duration::from_secs(30),
        async || {
            orphan_status = orphan.try_wait().unwrap();
            orphan_status.is_some()
        },
    )
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        orphan_status.unwrap().signal(),
        Some(Signal::SIGKILL as i32),
        "the stray QEMU is killed"
    );
    // The pause in flight is given up: the VM runs on, its processes thawed, nothing lost.
    let resumed = agent.get("pausing").await.unwrap();
    assert_eq!(
        (resumed.state.as_str(), resumed.pid),
        ("running", pausing.pid),
        "{resumed:?}"
    );
    run_expecting(&resumed, "cat ~/kept", "kept").await;
    // The VMM that died while no agent ran is reported, its slot given back.
    let dead = agent.get("gone").await.unwrap();
    assert_eq!(dead.state, "failed", "{dead:?}");
    assert!(dead.error.contains("VMM was gone"), "{dead:?}");
    // The create in flight failed and holds nothing. Whether the killed agent had recorded
    // its VM yet depends on where the kill found the create: both are the restart's failure.
    let half = agent.get("half").await.unwrap();
    assert_eq!(half.state, "failed", "{half:?}");
    assert!(
        half.error
            .contains("agent stopped before the sandbox's VM was recorded")
            || half
                .error
                .contains("agent restarted while the sandbox was starting"),
        "{half:?}"
    );
    assert_eq!(agent.vmm_pids("half"), Vec::<i32>::new());
    // The resume in flight leaves the sandbox paused, its snapshot kept: it resumes again,
    // as does the one paused before the crash.
    for id in ["waking", "paused"] {
        let seen = agent.get(id).await.unwrap();
        assert_eq!(seen.state, "paused", "{id}: {seen:?}");
        assert_eq!(agent.vmm_pids(id), Vec::<i32>::new(), "{id}");
        let resumed = agent
            .resume(id)
            .await
            .unwrap_or_else(|error| panic!("resuming {id}: {error:?}"));
        run_expecting(&resumed.sandbox.unwrap(), "cat ~/kept", "kept").await;
    }
    let info = agent.host_info().await;
    assert_eq!(info.sandboxes_running, 3, "{info:?}");

    for id in ["paused", "waking", "pausing", "gone", "half"] {
        let _: pb::DestroySandboxResponse = agent
            .destroy(id)
            .await
            .unwrap_or_else(|error| panic!("destroying {id}: {error:?}"));
    }
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// A build step as E2B's SDK sends it.
fn step(kind: &str, args: &[&str]) -> pb::BuildStep {
    pb::BuildStep {
        r#type: kind.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

/// Whether `log` has a line `message` under `step`.
fn logged(log: &[pb::BuildLogEntry], step: &str, message: &str) -> bool {
    log.iter().any(|l| l.step == step && l.message == message)
}

/// A template built from `base` runs every step in its VM (RUN as the current user in the
/// current directory with the build's ENV, WORKDIR, USER), starts its start command and waits
/// for its ready command; a sandbox of it finds the files, starts as its last USER in its last
/// WORKDIR, and has the started server running. A failing step, a cancelled build and bad
/// requests leave nothing behind, and a template with children cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_built_from_templates_run_their_steps_and_leave_nothing_when_they_fail() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start("wtd", 460);
    agent.build_template("base").await;
    let build = |id: &str, steps: Vec<pb::BuildStep>| pb::RunTemplateBuildRequest {
        template_id: id.into(),
        from_template: "base".into(),
        steps,
        ..Default::default()
    };

    // Refused before any VM starts.
    let (_, unknown_parent) = agent
        .run_build(&pb::RunTemplateBuildRequest {
            from_template: "nope".into(),
            ..build("orphan", vec![])
        })
        .await;
    assert_code(unknown_parent, Code::NotFound, "template nope not found");
    let (_, unknown_step) = agent
        .run_build(&build("odd", vec![step("ADD", &["x", "/y"])]))
        .await;
    assert_code(
        unknown_step,
        Code::InvalidArgument,
        "step 1: unknown type \"ADD\"",
    );
    // COPY files that are not a tar, or lack the step's source, fail before any VM.
    for (files, said) in [
        (
            b"not a tar at all, whatever its hash says".to_vec(),
            "step 1 (COPY): its uploaded files are not a tar archive",
        ),
        (
            {
                let mut empty_folder = tar::Builder::new(Vec::new());
                empty_folder
                    .append_dir("other", std::env::temp_dir())
                    .unwrap();
                empty_folder.into_inner().unwrap()
            },
            "step 1 (COPY): app is not in its uploaded files",
        ),
    ] {
        let mut request = build(
            "odd",
            vec![pb::BuildStep {
                files_hash: "h".into(),
                ..step("COPY", &["app", "/srv/app"])
            }],
        );
        request.files = HashMap::from([("h".to_string(), files)]);
        let (log, refused) = agent.run_build(&request).await;
        assert_code(refused, Code::InvalidArgument, said);
        assert!(
            !log.iter().any(|l| l.message.contains("the VM is up")),
            "{log:?}"
        );
    }
    let (_, odd_env) = agent
        .run_build(&build("odd", vec![step("ENV", &["A"])]))
        .await;
    assert_code(
        odd_env,
        Code::InvalidArgument,
        "step 1 (ENV): takes name and value pairs",
    );

    // COPY's files, as the SDK packs them: paths relative to the context, links kept.
    let context = tempfile::tempdir().unwrap();
    let root = context.path();
    std::fs::create_dir_all(root.join("folder/deeper")).unwrap();
    std::fs::write(root.join("folder/a.txt"), "copied\n").unwrap();
    std::fs::write(root.join("folder/deeper/b.txt"), "deeper\n").unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("folder/relative")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("folder/absolute")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("folder/dangling")).unwrap();
    std::fs::write(root.join("file.sh"), "#!/bin/sh\necho run\n").unwrap();
    let pack = |members: &[&str], gzip: bool| {
        let archive = root.join("files.tar");
        let status = std::process::Command::new("tar")
            .arg(if gzip { "-czf" } else { "-cf" })
            .arg(&archive)
            .arg("-C")
            .arg(root)
            .args(members)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read(&archive).unwrap()
    };
    let copy = |args: &[&str], hash: &str| pb::BuildStep {
        files_hash: hash.into(),
        ..step("COPY", args)
    };
    let mut request = build(
        "built",
        vec![
            step(
                "RUN",
                &["echo from-run > /home/user/run.txt && echo to-stderr >&2"],
            ),
            step("ENV", &["GREETING", "hello world"]),
            step("WORKDIR", &["app"]),
            copy(&["folder", "/home/user/folder", "", ""], "folder-files"),
            copy(&["folder", "/opt", "", ""], "folder-files"),
            copy(&["file.sh", "bin/", "root", "0750"], "script-files"),
            step(
                "RUN",
                &["echo \"$GREETING\" > greeting.txt; pwd > where.txt; id -un > who.txt"],
            ),
            step("USER", &["root"]),
            step("RUN", &["id -un > /who-root.txt"]),
            step("RUN", &["chown user /who-root.txt", "root"]),
            step("USER", &["user"]),
        ],
    );
    request.files = HashMap::from([
        ("folder-files".to_string(), pack(&["folder"], true)),
        ("script-files".to_string(), pack(&["file.sh"], false)),
    ]);
    request.start_cmd = "python3 -m http.server 8000 > /tmp/server.log 2>&1".into();
    request.ready_cmd =
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))'".into();
    let (log, built) = agent.run_build(&request).await;
    let built = built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert_eq!(
        (built.template_id.as_str(), built.memory_mib),
        ("built", 512)
    );
    assert!(
        logged(
            &log,
            "1",
            "[1/11] RUN echo from-run > /home/user/run.txt && echo to-stderr >&2"
        ),
        "{log:?}"
    );
    assert!(
        logged(&log, "1", "to-stderr"),
        "a step's output is in the log: {log:?}"
    );
    assert!(
        logged(&log, "2", "[2/11] ENV GREETING=hello world"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.step == "finalize" && l.message.starts_with("ready after")),
        "{log:?}"
    );
    let listed = agent.host_info().await.templates;
    assert!(
        listed.iter().any(|t| t.template_id == "built"),
        "{listed:?}"
    );

    let sandbox = agent.create("built", "frombuilt", None).await;
    run_expecting(&sandbox, "cat /home/user/run.txt", "from-run").await;
    run_expecting(
        &sandbox,
        "cat /home/user/app/greeting.txt /home/user/app/where.txt /home/user/app/who.txt",
        "hello world\n/home/user/app\nuser",
    )
    .await;
    run_expecting(&sandbox, "cat /who-root.txt", "root").await;
    // COPY: contents merged (an existing destination keeps its own owner and mode), links
    // kept as links (dangling too), owners and modes as asked.
    run_expecting(
        &sandbox,
        "cd /home/user/folder && cat a.txt deeper/b.txt relative && readlink relative absolute dangling",
        "copied\ndeeper\ncopied\na.txt\n/etc/hostname\nnowhere",
    )
    .await;
    run_expecting(
        &sandbox,
        "stat -c '%U %a' /home/user/folder/a.txt /home/user/app/bin/file.sh /opt /opt/a.txt",
        "user 644\nroot 750\nroot 755\nuser 644",
    )
    .await;
    run_expecting(
        &sandbox,
        "echo ${GREETING:-build-time only}",
        "build-time only",
    )
    .await;
    // Without a user named, a command runs as the template's last USER in its last WORKDIR.
    assert_eq!(user_and_directory(&sandbox).await, "user\n/home/user/app\n");
    // The start command runs in the sandbox, restored from the snapshot.
    run_expecting(
        &sandbox,
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:8000/\").status)'",
        "200",
    )
    .await;
    assert_code(
        agent.delete_template("base").await,
        Code::FailedPrecondition,
        "is the parent of templates built",
    );
    agent.destroy("frombuilt").await.unwrap();

    // A build that shares its first seven steps with "built" starts from the disk and state
    // step 7 left (ENV and WORKDIR's too): those steps do not run again; its own step does.
    let mut resumed = request.clone();
    resumed.template_id = "resumed".into();
    resumed.start_cmd = String::new();
    resumed.ready_cmd = String::new();
    resumed.steps.truncate(7);
    resumed.steps.push(step(
        "RUN",
        &["echo \"$GREETING from $(pwd)\" > resumed.txt"],
    ));
    let (log, built) = agent.run_build(&resumed).await;
    built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    for number in 1..=7 {
        assert!(
            log.iter()
                .any(|l| l.step == number.to_string() && l.message.ends_with("(cached)")),
            "step {number} is cached: {log:?}"
        );
    }
    assert!(
        log.iter()
            .any(|l| l.message == "cached: steps 1 to 7 as template built's build left them"),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.message == "to-stderr"),
        "step 1 did not run again: {log:?}"
    );
    assert!(logged(
        &log,
        "8",
        "[8/8] RUN echo \"$GREETING from $(pwd)\" > resumed.txt"
    ));
    // A forced step runs again, and every one after it: here step 7 on step 6's disk.
    let mut forced = resumed.clone();
    forced.template_id = "reforced".into();
    forced.steps[6].force = true;
    let (log, built) = agent.run_build(&forced).await;
    built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert!(
        log.iter()
            .any(|l| l.message.starts_with("cached: steps 1 to 6 as template ")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.step == "7"
            && l.message.starts_with("[7/8] RUN ")
            && !l.message.ends_with("(cached)")),
        "{log:?}"
    );
    agent.delete_template("reforced").await.unwrap();

    // A failing step: its number, exit code and output in the error; nothing left.
    let (log, failed) = agent
        .run_build(&build(
            "broken",
            vec![
                step("RUN", &["true"]),
                step("RUN", &["echo about to fail; exit 3"]),
                step("RUN", &["echo never"]),
            ],
        ))
        .await;
    let error = failed.expect_err("the build fails");
    assert_eq!(error.code, Code::FailedPrecondition, "{error:?}");
    for words in [
        "step 2 (RUN echo about to fail; exit 3): exited with code 3",
        "about to fail",
    ] {
        assert!(
            error.message.contains(words),
            "{words:?} not in {:?}",
            error.message
        );
    }
    assert!(!log.iter().any(|l| l.message == "never"), "{log:?}");
    assert!(!agent.data_dir().join("templates/broken").exists());

    // A build whose caller hangs up stops, and leaves nothing.
    let mut stream = agent
        .start_build(&build(
            "cut",
            vec![step("RUN", &["echo sleeping; sleep 600"])],
        ))
        .await
        .unwrap();
    while let Some(event) = stream.message().await {
        if let Ok(Some(pb::run_template_build_event::Event::Log(line))) = event.map(|e| e.event)
            && line.message == "sleeping"
        {
            break;
        }
    }
    drop(stream);
    let cut_dir = agent.data_dir().join("templates/cut");
    wait_until(
        "the cancelled build to clean up",
        Duration::from_secs(60),
        async || !cut_dir.exists() && vmm_pids_matching(&cut_dir.display().to_string()).is_empty(),
    )
    .await;
    let report = agent.host_info().await;
    assert_eq!(report.slots_in_use, 0, "{report:?}");
    let names: Vec<_> = report
        .templates
        .iter()
        .map(|t| t.template_id.as_str())
        .collect();
    assert_eq!(names, ["base", "built", "resumed"]);

    // The resumed template has its own copy of the layers it took: "built" gone, its sandbox
    // finds every step's files, and starts as step 7 left the user and directory.
    agent.delete_template("built").await.unwrap();
    let sandbox = agent.create("resumed", "fromresumed", None).await;
    run_expecting(
        &sandbox,
        "cat resumed.txt /home/user/run.txt where.txt /home/user/folder/a.txt",
        "hello world from /home/user/app\nfrom-run\n/home/user/app\ncopied",
    )
    .await;
    assert_eq!(user_and_directory(&sandbox).await, "user\n/home/user/app\n");
    agent.destroy("fromresumed").await.unwrap();
    agent.delete_template("resumed").await.unwrap();
    agent.delete_template("base").await.unwrap();
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// Who a command runs as, and where, when it names neither (`id -un; pwd`'s output).
async fn user_and_directory(sandbox: &pb::Sandbox) -> String {
    let envd = ConnectClient::new(
        format!("http://{}", sandbox.envd_address),
        HttpVersion::Http1,
        Codec::Json,
    );
    wrenn_testkit::run_script(&envd, &HeaderMap::new(), "id -un; pwd")
        .await
        .stdout
}

/// The test registries `scripts/registry.sh` started: the open one, the private one, and the
/// private one's login (`user:password`); `None` (skipped, or failed under
/// `WRENN_REQUIRE_PREREQUISITES=1`) when they are not there.
fn test_registries() -> Option<(String, String, (String, String))> {
    let open = std::env::var("WRENN_TEST_REGISTRY").ok();
    let private = std::env::var("WRENN_TEST_PRIVATE_REGISTRY").ok();
    let login = std::env::var("WRENN_TEST_REGISTRY_LOGIN").ok();
    match (open, private, login) {
        (Some(open), Some(private), Some(login)) => {
            let (user, password) = login
                .split_once(':')
                .expect("WRENN_TEST_REGISTRY_LOGIN is user:password");
            Some((open, private, (user.to_string(), password.to_string())))
        }
        _ => {
            wrenn_testkit::missing_prerequisite(
                "templates from registries' images",
                "no test registry (WRENN_TEST_REGISTRY, WRENN_TEST_PRIVATE_REGISTRY, \
                 WRENN_TEST_REGISTRY_LOGIN): run scripts/registry.sh",
            );
            None
        }
    }
}

/// A template built from an image in a registry: pulled (its layers kept for the next build),
/// unpacked with its whiteouts, given envd, the init and a `user`, booted, its steps run as the
/// image's USER in its WORKDIR with its ENV; a sandbox of it sees the image's files as the
/// layers left them. The same build again is the first one's files (unless forced). A private image needs its login; an unknown image, a refused login and a
/// registry the agent may not reach are clear errors; nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_built_from_registry_images_run_with_the_images_files_and_settings() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let Some((open, private, (user, password))) = test_registries() else {
        return;
    };
    let mut agent = Agent::start_with(
        "wti",
        500,
        vec!["--insecure-registry".into(), format!("{open},{private}")],
    );
    agent.build_template("base").await;
    let build = |id: &str, image: String| pb::RunTemplateBuildRequest {
        template_id: id.into(),
        from_template: "base".into(),
        from_image: image,
        ..Default::default()
    };

    let mut request = build("fromimage", format!("{open}/wrenn-test/busybox:v1"));
    request.steps = vec![step(
        "RUN",
        &["echo $WRENN_IMAGE_ENV > made.txt; id -un >> made.txt; pwd >> made.txt"],
    )];
    let (log, built) = agent.run_build(&request).await;
    let built = built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert_eq!(built.template_id, "fromimage");
    for words in [
        "pulling 127.0.0.1",
        "layer 1/2 ",
        "unpacked 2 layers",
        "added the user user",
        "root filesystem ready",
    ] {
        assert!(
            log.iter()
                .any(|l| l.step == "base" && l.message.contains(words)),
            "{words:?} not in {log:?}"
        );
    }
    let sandbox = agent.create("fromimage", "fromimage-1", None).await;
    // The step ran as the image's USER in its WORKDIR, with its ENV.
    run_expecting(&sandbox, "cat /app/made.txt", "from-image\napp\n/app").await;
    // The layers as stacked: layer one's file kept, the whited-out ones gone, layer two's
    // files there with their owner.
    run_expecting(
        &sandbox,
        "cat /usr/share/wrenn-test/hello /opt/lower/new; ls -a /opt/lower | tr '\\n' ' '; \
         test -e /etc/layer-one-gone && echo still-there; stat -c '%U %a' /app/marker",
        "kept from layer one\nfrom layer two\n. .. new app 644",
    )
    .await;
    // wrenn's user was added beside the image's own accounts; the image's busybox and bash run.
    run_expecting(
        &sandbox,
        "id -u user; id -u app; bash -c 'echo $BASH_VERSION' | cut -c1",
        "1000\n2000\n5",
    )
    .await;
    assert_eq!(
        user_and_directory(&sandbox).await,
        "app\n/app\n",
        "the image's USER and WORKDIR"
    );
    agent.destroy("fromimage-1").await.unwrap();

    // The same build again takes the first one's files: no step runs, no VM boots; and its
    // template stands alone (the first one deleted, a sandbox of it runs). Forced, it runs.
    let again = pb::RunTemplateBuildRequest {
        template_id: "fromimage-again".into(),
        ..request.clone()
    };
    let (log, cached) = agent.run_build(&again).await;
    cached.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert!(
        log.iter().any(|l| l
            .message
            .starts_with("cached: the same build as template fromimage")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.step == "1" && l.message.ends_with("(cached)")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.message.contains("the VM is up")),
        "{log:?}"
    );
    // Another build from the same image takes the root filesystem the first one made: the
    // image is not unpacked again.
    let mut other_steps = request.clone();
    other_steps.template_id = "fromimage-other".into();
    other_steps.steps = vec![step("RUN", &["cat made.txt 2>/dev/null || echo fresh"])];
    let (log, built) = agent.run_build(&other_steps).await;
    built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert!(
        log.iter().any(|l| l
            .message
            .starts_with("taking the root filesystem made from this image for template fromimage")),
        "{log:?}"
    );
    assert!(logged(&log, "1", "fresh"), "{log:?}");
    assert!(
        !log.iter().any(|l| l.message.contains("unpacked")),
        "{log:?}"
    );
    agent.delete_template("fromimage").await.unwrap();
    let sandbox = agent.create("fromimage-other", "fromimage-3", None).await;
    run_expecting(
        &sandbox,
        "cat /usr/share/wrenn-test/hello",
        "kept from layer one",
    )
    .await;
    assert_eq!(
        user_and_directory(&sandbox).await,
        "app\n/app\n",
        "the image's USER and WORKDIR, kept with its root filesystem"
    );
    agent.destroy("fromimage-3").await.unwrap();
    agent.delete_template("fromimage-other").await.unwrap();
    let sandbox = agent.create("fromimage-again", "fromimage-2", None).await;
    run_expecting(&sandbox, "cat /app/made.txt", "from-image\napp\n/app").await;
    agent.destroy("fromimage-2").await.unwrap();
    let forced = pb::RunTemplateBuildRequest {
        template_id: "fromimage-forced".into(),
        force: true,
        ..request.clone()
    };
    let (log, built) = agent.run_build(&forced).await;
    built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert!(
        !log.iter()
            .any(|l| l.message.starts_with("cached:") || l.message.ends_with("(cached)")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.message.contains("the VM is up")),
        "{log:?}"
    );
    // Past its deadline (here before its VM is up), a build stops and leaves nothing.
    let late = pb::RunTemplateBuildRequest {
        template_id: "late".into(),
        force: true,
        deadline_ms: 4000,
        ..request.clone()
    };
    let (_, result) = agent.run_build(&late).await;
    assert_code(
        result,
        Code::DeadlineExceeded,
        "ran past its deadline of 4 s",
    );
    assert!(!agent.data_dir().join("templates/late").exists());

    // Bad images fail before any VM starts, each with its cause.
    for (image, code, words) in [
        (
            format!("{open}/wrenn-test/nope:v1"),
            Code::NotFound,
            "has no image",
        ),
        (
            format!("{open}/wrenn-test/busybox:v9"),
            Code::NotFound,
            "has no image",
        ),
        (
            "Not An Image".to_string(),
            Code::InvalidArgument,
            "fromImage",
        ),
        (
            format!("{private}/wrenn-test/private:v1"),
            Code::FailedPrecondition,
            "needs credentials",
        ),
        (
            "10.255.255.1:5000/any/image:v1".to_string(),
            Code::FailedPrecondition,
            "not a public address",
        ),
    ] {
        let (_, result) = agent.run_build(&build("refused", image.clone())).await;
        assert_code(result, code, words);
    }
    let mut refused_login = build("refused", format!("{private}/wrenn-test/private:v1"));
    refused_login.registry_username = user.clone();
    refused_login.registry_password = "not-the-password".into();
    let (_, result) = agent.run_build(&refused_login).await;
    assert_code(result, Code::FailedPrecondition, "refused the credentials");

    // The private image with its login; the layers come from the cache this time.
    let mut private_build = build("private", format!("{private}/wrenn-test/private:v1"));
    private_build.registry_username = user;
    private_build.registry_password = password;
    let (log, built) = agent.run_build(&private_build).await;
    built.unwrap_or_else(|error| panic!("{error:?}; log: {log:?}"));
    assert!(
        log.iter()
            .filter(|l| l.message.contains(": cached ("))
            .count()
            == 2,
        "both layers from the blob cache: {log:?}"
    );

    assert!(!agent.data_dir().join("templates/refused").exists());
    let staging = agent.data_dir().join("oci/staging");
    assert_eq!(
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0),
        0,
        "no staging directory left in {}",
        staging.display()
    );
    for template in ["private", "fromimage-again", "fromimage-forced", "base"] {
        agent.delete_template(template).await.unwrap();
    }
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// The template store the store test uses: the S3 server `scripts/s3.sh` started (a prefix of
/// the test's own), or `None` (skipped, or failed under `WRENN_REQUIRE_PREREQUISITES=1`).
fn test_s3_store(prefix: &str) -> Option<String> {
    match (
        std::env::var("WRENN_TEST_S3_ENDPOINT"),
        std::env::var("WRENN_TEST_S3_BUCKET"),
    ) {
        (Ok(_), Ok(bucket)) => Some(format!(
            "s3://{bucket}/{prefix}-{}-{}",
            std::process::id(),
            wrenn_core::now_ms()
        )),
        _ => {
            let why = "WRENN_TEST_S3_ENDPOINT and WRENN_TEST_S3_BUCKET are not set \
                       (scripts/s3.sh starts the server, scripts/test.sh sets them)";
            if std::env::var("WRENN_REQUIRE_PREREQUISITES").as_deref() == Ok("1") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Builds `id` from base on `agent` with one RUN step writing `text` to `~/stored.txt`; the
/// build's log must say it was put in the store.
async fn build_stored(agent: &Agent, id: &str, text: &str) {
    let (log, built) = agent
        .run_build(&pb::RunTemplateBuildRequest {
            template_id: id.into(),
            from_template: "base".into(),
            steps: vec![step("RUN", &[&format!("echo {text} > ~/stored.txt")])],
            ..Default::default()
        })
        .await;
    built.unwrap_or_else(|error| panic!("{error}; log: {log:?}"));
    assert!(
        log.iter()
            .any(|l| l.step == "finalize" && l.message.starts_with("stored: ")),
        "{log:?}"
    );
}

/// Creates sandbox `id` of `template` on `agent`: the sandbox, and how long the template's
/// pull took (0: the host had it).
async fn create_timed(agent: &Agent, template: &str, id: &str) -> (pb::Sandbox, u64) {
    let created = agent
        .call_ok::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
            template_id: template.into(),
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await;
    (created.sandbox.unwrap(), created.pull_ms)
}

async fn template_names(agent: &Agent) -> Vec<String> {
    let report = agent.host_info().await;
    report
        .templates
        .into_iter()
        .map(|t| t.template_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_built_on_one_host_runs_on_another_through_the_s3_store() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let Some(location) = test_s3_store("agents") else {
        return;
    };
    let store_args = vec!["--template-store".to_string(), location.clone()];
    let mut builder = Agent::start_with("wts", 560, store_args.clone());
    // The second host has no template at all, not even base: everything comes from the store.
    // Its cache holds 1 MiB: a pulled template goes as soon as nothing stands on it and
    // another is pulled.
    let cache_args = ["--template-cache-mib", "1"].map(str::to_string);
    let mut puller = Agent::start_with("wtu", 580, [store_args, cache_args.to_vec()].concat());
    assert_eq!(puller.host_info().await.template_store, location);
    builder.build_template("base").await;
    build_stored(&builder, "shared", "from-the-store").await;

    // The puller lacks it: the create pulls it (and says how long that took), then runs it.
    // A second create at the same time waits for that pull, and runs it too.
    let ((first, pulled_in), (together, _)) = tokio::join!(
        create_timed(&puller, "shared", "pulled-1"),
        create_timed(&puller, "shared", "pulled-1b")
    );
    assert!(pulled_in > 0);
    run_expecting(&first, "cat ~/stored.txt", "from-the-store").await;
    run_expecting(&together, "cat ~/stored.txt", "from-the-store").await;
    puller.destroy("pulled-1b").await.unwrap();
    let (_, pulled_in) = create_timed(&puller, "shared", "pulled-2").await;
    assert_eq!(pulled_in, 0, "the host has it now");
    assert_eq!(
        template_names(&puller).await,
        ["shared"],
        "only what it pulled"
    );
    assert_code(
        puller.delete_template("shared").await,
        Code::FailedPrecondition,
        "in use by sandboxes",
    );
    for id in ["pulled-1", "pulled-2"] {
        puller.destroy(id).await.unwrap();
    }

    // A second template pulled: the first, which nothing stands on now, leaves the cache.
    build_stored(&builder, "shared-two", "the-second").await;
    let (second, pulled_in) = create_timed(&puller, "shared-two", "pulled-3").await;
    assert!(pulled_in > 0);
    run_expecting(&second, "cat ~/stored.txt", "the-second").await;
    assert_eq!(template_names(&puller).await, ["shared-two"]);
    // Wanted again, it is pulled again; the second stays, a sandbox stands on it.
    let (again, pulled_in) = create_timed(&puller, "shared", "pulled-4").await;
    assert!(pulled_in > 0);
    run_expecting(&again, "cat ~/stored.txt", "from-the-store").await;
    assert_eq!(template_names(&puller).await, ["shared", "shared-two"]);
    for id in ["pulled-3", "pulled-4"] {
        puller.destroy(id).await.unwrap();
    }

    // Builds on a pulled template find the cache in templates pulled with it. "layered", built
    // on "shared" by the builder, is pulled with its steps' layers: the same build on the
    // puller is a copy of it (its whole pulled chain, pointed at the copy's files), and one
    // that shares its first step starts from that step's layer.
    let layered = |id: &str, last: &str| pb::RunTemplateBuildRequest {
        template_id: id.into(),
        from_template: "shared".into(),
        steps: vec![
            step("RUN", &["echo first > ~/first.txt"]),
            step("RUN", &[&format!("echo {last} > ~/last.txt")]),
        ],
        ..Default::default()
    };
    // The second template stays meanwhile: a sandbox stands on it.
    let (_, pulled_in) = create_timed(&puller, "shared-two", "pin").await;
    assert_eq!(pulled_in, 0);
    let (log, built) = builder.run_build(&layered("layered", "builder")).await;
    built.unwrap_or_else(|error| panic!("{error}; log: {log:?}"));
    let (_, pulled_in) = create_timed(&puller, "layered", "pulled-5").await;
    assert!(pulled_in > 0);
    let (log, built) = puller.run_build(&layered("layered-copy", "builder")).await;
    built.unwrap_or_else(|error| panic!("{error}; log: {log:?}"));
    assert!(
        log.iter().any(|l| l
            .message
            .starts_with("cached: the same build as template layered")),
        "{log:?}"
    );
    let (log, built) = puller.run_build(&layered("layered-other", "puller")).await;
    built.unwrap_or_else(|error| panic!("{error}; log: {log:?}"));
    assert!(
        log.iter().any(|l| l
            .message
            .starts_with("cached: steps 1 to 1 as template layered")),
        "{log:?}"
    );
    puller.destroy("pulled-5").await.unwrap();
    for (template, last) in [("layered-copy", "builder"), ("layered-other", "puller")] {
        let (sandbox, _) = create_timed(&puller, template, "pulled-6").await;
        run_expecting(
            &sandbox,
            "cat ~/first.txt ~/last.txt",
            &format!("first\n{last}"),
        )
        .await;
        puller.destroy("pulled-6").await.unwrap();
    }
    for template in ["layered-other", "layered-copy", "layered"] {
        if template_names(&puller)
            .await
            .iter()
            .any(|name| name == template)
        {
            puller.delete_template(template).await.unwrap();
        }
    }
    builder.delete_template("layered").await.unwrap();

    // A delete takes it from the host and the store.
    if !template_names(&puller)
        .await
        .iter()
        .any(|name| name == "shared")
    {
        let (_, pulled_in) = create_timed(&puller, "shared", "pulled-7").await;
        assert!(pulled_in > 0);
        puller.destroy("pulled-7").await.unwrap();
    }
    puller.destroy("pin").await.unwrap();
    puller.delete_template("shared").await.unwrap();
    let store = wrenn_agent::template_store::TemplateStore::open(&location).unwrap();
    assert!(store.artifact("shared").await.unwrap().is_none());
    assert!(store.artifact("shared-two").await.unwrap().is_some());
    assert_code(
        puller.try_create("shared", "pulled-5").await,
        Code::NotFound,
        "not found (on this host or in its template store)",
    );
    // The builder's own copy stays until it is deleted there (the store has it no more).
    assert_code(
        builder.delete_template("base").await,
        Code::FailedPrecondition,
        "parent of templates",
    );
    for id in ["shared", "shared-two", "base"] {
        builder.delete_template(id).await.unwrap();
    }
    assert!(store.artifact("shared-two").await.unwrap().is_none());
    assert_code(
        builder.delete_template("shared").await,
        Code::NotFound,
        "template shared not found",
    );
    // The puller keeps its copy of the second (now in no store) until it is deleted there.
    puller.delete_template("shared-two").await.unwrap();
    assert!(template_names(&puller).await.is_empty());
    builder.stop();
    puller.stop();
    assert_eq!(builder.leftovers(), Vec::<String>::new());
    assert_eq!(puller.leftovers(), Vec::<String>::new());
}

/// The pids of the VMMs of `agent` started warm (their command lines name the directories they
/// started in, `sandboxes/warm-…`): those waiting, and those sandboxes took.
fn warm_pids(agent: &Agent) -> Vec<i32> {
    vmm_pids_matching(&format!("{}/sandboxes/warm-", agent.data_dir().display()))
}

/// The directories of `agent`'s warm VMMs waiting now (a create renames the one it takes).
fn warm_dirs(agent: &Agent) -> Vec<String> {
    std::fs::read_dir(agent.data_dir().join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("warm-"))
        .collect()
}

/// CreateSandbox of `template` as `id` (its `SANDBOX_NAME`), as it answers.
async fn create_answer(agent: &Agent, template: &str, id: &str) -> pb::CreateSandboxResponse {
    agent
        .call_ok::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
            template_id: template.into(),
            sandbox_id: id.into(),
            env_vars: HashMap::from([("SANDBOX_NAME".to_string(), id.to_string())]),
            ..Default::default()
        })
        .await
}

async fn wait_for_warm(agent: &Agent, count: usize) {
    wait_until(
        &format!("{count} warm VMMs"),
        Duration::from_secs(60),
        async || {
            // A directory is made before its VMM starts.
            let dirs = warm_dirs(agent);
            dirs.len() == count
                && dirs.iter().all(|dir| {
                    let marker = format!("{}/sandboxes/{dir}/", agent.data_dir().display());
                    !vmm_pids_matching(&marker).is_empty()
                })
        },
    )
    .await;
}

/// The warm pool: after a template's first create the agent starts VMMs waiting for its
/// snapshot; the next creates take them (the answer says so, the sandbox's VMM is one of them,
/// its directory the sandbox's, its guest the sandbox's own), and the pool fills again. Warm
/// VMMs never take the last slot, and give theirs to a create that finds none free. A deleted
/// template's warm VMMs go with it; an agent killed leaves warm VMMs that its next start removes;
/// an agent stopped stops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_vmms_wait_for_creates_give_way_and_leave_nothing() {
    let Some(_image) = prerequisites() else {
        return;
    };
    let mut agent = Agent::start_with(
        "wtw",
        1800,
        ["--warm-pool", "2", "--slots", "4", "--slots-ahead", "1"]
            .map(String::from)
            .to_vec(),
    );
    agent.build_template("base").await;
    assert!(warm_pids(&agent).is_empty(), "no create yet, no warm VMM");
    let first = create_answer(&agent, "base", "w-0").await;
    assert!(!first.warm, "the pool was empty: {first:?}");
    // Two wait (1 sandbox + 2 of 4 slots: the last stays free).
    wait_for_warm(&agent, 2).await;
    let waiting = warm_pids(&agent);
    let second = create_answer(&agent, "base", "w-1").await;
    assert!(second.warm, "{second:?}");
    let sandbox = second.sandbox.unwrap();
    assert!(
        waiting.contains(&(sandbox.pid as i32)),
        "its VMM ({}) is one of the warm ones ({waiting:?})",
        sandbox.pid
    );
    run_expecting(&sandbox, "echo $SANDBOX_NAME", "w-1").await;
    assert!(
        agent.data_dir().join("sandboxes/w-1/disk.qcow2").is_file(),
        "its directory is the sandbox's"
    );
    // Its writes are its own: the first sandbox's disk does not see them.
    run_expecting(
        &sandbox,
        "echo mine > /home/user/f && sync && cat /home/user/f",
        "mine",
    )
    .await;
    let first_sandbox = first.sandbox.unwrap();
    run_expecting(
        &first_sandbox,
        "cat /home/user/f 2>/dev/null || echo none",
        "none",
    )
    .await;
    // 2 sandboxes and 1 warm VMM hold 3 of 4 slots: no second warm one now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(warm_dirs(&agent).len(), 1);
    assert_eq!(warm_pids(&agent).len(), 2, "the one waiting and w-1's");
    // The host reports the warm VMM's slot as free.
    assert_eq!(agent.host_info().await.slots_in_use, 2);

    // Another template, whose creates find no warm VMM: the second finds no free slot either,
    // and the warm VMM gives its own.
    agent
        .checkpoint("w-1", "other", false)
        .await
        .expect("CheckpointSandbox");
    let third = create_answer(&agent, "other", "o-0").await;
    assert!(!third.warm, "{third:?}");
    let fourth = create_answer(&agent, "other", "o-1").await;
    assert!(!fourth.warm, "{fourth:?}");
    assert!(warm_dirs(&agent).is_empty(), "the warm VMM gave its slot");
    assert_eq!(warm_pids(&agent).len(), 1, "w-1's alone");
    assert_eq!(agent.host_info().await.slots_in_use, 4);
    run_expecting(&fourth.sandbox.unwrap(), "echo $SANDBOX_NAME", "o-1").await;

    // The template deleted, its warm VMMs go.
    for id in ["o-0", "o-1", "w-1"] {
        agent.destroy(id).await.expect("DestroySandbox");
    }
    let fifth = create_answer(&agent, "other", "o-2").await;
    assert!(!fifth.warm);
    // 2 sandboxes: one warm VMM (3 of 4 slots).
    wait_for_warm(&agent, 1).await;
    agent.destroy("o-2").await.expect("DestroySandbox");
    agent
        .delete_template("other")
        .await
        .expect("DeleteTemplate");
    wait_for_warm(&agent, 0).await;
    wait_until(
        "the warm VMMs stopped",
        Duration::from_secs(30),
        async || warm_pids(&agent).is_empty(),
    )
    .await;

    // Killed with warm VMMs, the agent's next start removes them; stopped, it stops them.
    create_answer(&agent, "base", "w-2").await;
    wait_for_warm(&agent, 1).await;
    agent.kill();
    assert_eq!(
        warm_pids(&agent).len(),
        1,
        "warm VMMs outlive a killed agent"
    );
    agent.spawn();
    agent.host_info().await;
    wait_until(
        "the restarted agent to stop the warm VMM",
        Duration::from_secs(10),
        async || warm_pids(&agent).is_empty(),
    )
    .await;
    assert!(warm_dirs(&agent).is_empty(), "{:?}", warm_dirs(&agent));
    agent.destroy("w-2").await.expect("DestroySandbox");
    let again = create_answer(&agent, "base", "w-3").await;
    assert!(!again.warm, "the restarted agent's pool starts empty");
    wait_for_warm(&agent, 1).await;
    for id in ["w-0", "w-3"] {
        agent.destroy(id).await.expect("DestroySandbox");
    }
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}
