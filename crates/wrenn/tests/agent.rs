//! The host agent end to end, with real QEMU VMs (software emulation here): `wrenn agent serve`
//! runs as a process of its own; these tests drive its Connect API and the envd inside each
//! sandbox, kill and restart it, kill a VM, and check that nothing is left afterwards.
//!
//! Needs root, QEMU and the built image (`wrenn image build`); without them the tests say so and
//! pass, unless `WRENN_REQUIRE_VM_TESTS=1` (scripts/test.sh sets it), where they fail.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::HeaderMap;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_connect::{Code, Codec, ConnectError};
use wrenn_proto::agent as pb;
use wrenn_proto::process as proc_pb;
use wrenn_proto::process::process_event::{Event, data_event::Output};

fn prerequisites() -> Option<PathBuf> {
    let image = std::env::var_os("WRENN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(wrenn_image::default_image_dir);
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("not root".to_string())
    } else if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        Some("qemu-system-x86_64 is not installed".to_string())
    } else if !image.join("manifest.json").is_file() {
        Some(format!(
            "no image in {} (run `wrenn image build`)",
            image.display()
        ))
    } else {
        None
    };
    match missing {
        None => Some(image),
        Some(reason) if std::env::var("WRENN_REQUIRE_VM_TESTS").is_ok_and(|v| v == "1") => {
            panic!("VM test prerequisite missing: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIPPED: the agent tests need root, QEMU and a built image: {reason}");
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `wrenn agent serve` process with its own data directory and slot range.
struct Agent {
    child: Option<Child>,
    data: tempfile::TempDir,
    prefix: String,
    first_slot: u32,
    api_port: u16,
    mmds_port: u16,
    token: String,
}

impl Agent {
    fn start(prefix: &str, first_slot: u32) -> Agent {
        let mut agent = Agent {
            child: None,
            data: tempfile::tempdir().unwrap(),
            prefix: prefix.to_string(),
            first_slot,
            api_port: free_port(),
            mmds_port: free_port(),
            token: format!("token-{prefix}"),
        };
        agent.spawn();
        agent
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join("agent")
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_wrenn"))
            .args([
                "agent",
                "serve",
                "--accel",
                "tcg",
                "--no-internet",
                "--cleanup-on-exit",
            ])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--slot-prefix", &self.prefix])
            .args([
                "--first-slot",
                &self.first_slot.to_string(),
                "--slots",
                "8",
                "--slots-ahead",
                "1",
            ])
            .args(["--listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--mmds-port", &self.mmds_port.to_string()])
            .env("WRENN_AGENT_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting wrenn agent");
        self.child = Some(child);
        // Ready means answering an authorised call, not just accepting connections.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.answers() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!("the agent exited while starting: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `HostInfo` gets a 200 (a plain HTTP/1.1 call, blocking).
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.api_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!(
            "POST /wrenn.agent.v1.HostAgent/HostInfo HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            self.token
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200")
    }

    /// SIGKILL: the agent gets no chance to clean up.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    fn client(&self, token: &str) -> ConnectClient {
        ConnectClient::new(
            format!("http://127.0.0.1:{}", self.api_port),
            HttpVersion::Http1,
            Codec::Json,
        )
        .with_header("authorization", &format!("Bearer {token}"))
    }

    async fn call<Req: wrenn_connect::Message, Resp: wrenn_connect::Message>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, ConnectError> {
        self.client(&self.token)
            .unary(
                &format!("/wrenn.agent.v1.HostAgent/{method}"),
                request,
                &HeaderMap::new(),
            )
            .await
    }

    async fn build_template(&self, id: &str) -> pb::Template {
        let request = pb::BuildTemplateRequest {
            template_id: id.into(),
            memory_mib: 512,
            vcpus: 1,
            ..Default::default()
        };
        let response: pb::BuildTemplateResponse = self
            .call("BuildTemplate", &request)
            .await
            .expect("BuildTemplate");
        response.template.unwrap()
    }

    async fn create(&self, template: &str, id: &str, token: Option<&str>) -> pb::Sandbox {
        let request = pb::CreateSandboxRequest {
            template_id: template.into(),
            sandbox_id: id.into(),
            env_vars: HashMap::from([("SANDBOX_NAME".to_string(), id.to_string())]),
            envd_access_token: token.unwrap_or_default().into(),
            ..Default::default()
        };
        let response: pb::CreateSandboxResponse = self
            .call("CreateSandbox", &request)
            .await
            .expect("CreateSandbox");
        response.sandbox.unwrap()
    }

    async fn get(&self, id: &str) -> Result<pb::Sandbox, ConnectError> {
        let response: pb::GetSandboxResponse = self
            .call(
                "GetSandbox",
                &pb::GetSandboxRequest {
                    sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(response.sandbox.unwrap())
    }

    /// What of this agent is still on the machine: processes, namespaces, interfaces, files.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let marker = self.data_dir().display().to_string();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains("qemu-system") && text.contains(&marker) {
                found.push(format!(
                    "process {}: {}",
                    entry.file_name().to_string_lossy(),
                    &text[..80.min(text.len())]
                ));
            }
        }
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", self.prefix)) {
                found.push(format!("netns {name}"));
            }
        }
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            let name = line
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .split('@')
                .next()
                .unwrap_or("");
            if name.starts_with(&format!("{}h", self.prefix)) {
                found.push(format!("interface {name}"));
            }
        }
        for dir in ["sandboxes"] {
            for entry in std::fs::read_dir(self.data_dir().join(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                found.push(format!("file {}", entry.path().display()));
            }
        }
        found
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Whatever a failed test left: its VMs and slots go with it.
        let marker = self.data_dir().display().to_string();
        let _ = Command::new("pkill")
            .args(["-9", "-f", &format!("qemu-system.*{marker}")])
            .status();
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// The output of a command run through a sandbox's envd.
#[derive(Debug, Default)]
struct Ran {
    stdout: String,
    stderr: String,
    exit_code: Option<i32>,
}

fn envd_headers(token: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    // "user:" in base64.
    headers.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
    if let Some(token) = token {
        headers.insert("x-access-token", token.parse().unwrap());
    }
    headers
}

async fn run(sandbox: &pb::Sandbox, token: Option<&str>, script: &str) -> Ran {
    let client = ConnectClient::new(
        format!("http://{}", sandbox.envd_address),
        HttpVersion::Http1,
        Codec::Json,
    );
    let request = proc_pb::StartRequest {
        process: Some(proc_pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), script.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client
        .server_stream::<_, proc_pb::StartResponse>(
            "/process.Process/Start",
            &request,
            &envd_headers(token),
        )
        .await
        .expect("Start failed");
    let mut ran = Ran::default();
    while let Some(message) = stream.message().await {
        let Ok(message) = message else { break };
        match message.event.and_then(|event| event.event) {
            Some(Event::Data(data)) => match data.output {
                Some(Output::Stdout(bytes)) => {
                    ran.stdout.push_str(&String::from_utf8_lossy(&bytes))
                }
                Some(Output::Stderr(bytes)) => {
                    ran.stderr.push_str(&String::from_utf8_lossy(&bytes))
                }
                _ => {}
            },
            Some(Event::End(end)) => ran.exit_code = Some(end.exit_code),
            _ => {}
        }
    }
    ran
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, ConnectError>, code: Code, words: &str) {
    let error = result.expect_err("the call should have failed");
    assert_eq!(error.code, code, "{error:?}");
    assert!(
        error.message.contains(words),
        "{:?} lacks {words:?}",
        error.message
    );
}

async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    .server_stream::<_, proc_pb::StartResponse>(
        "/process.Process/Start",
        &proc_pb::StartRequest::default(),
        &envd_headers(Some("wrong")),
    )
    .await;
    assert!(refused.is_err(), "a wrong access token must be refused");

    // A background process started before the pause lives on after the resume.
    let started = run(
        &a,
        None,
        "nohup sh -c 'while true; do date +%s%N >> /home/user/ticks; sleep 0.2; done' >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid: u32 = started.stdout.trim().parse().expect("a pid");
    let paused: pb::PauseSandboxResponse = agent
        .call(
            "PauseSandbox",
            &pb::PauseSandboxRequest {
                sandbox_id: "sbx-a".into(),
            },
        )
        .await
        .expect("PauseSandbox");
    assert_eq!(paused.sandbox.as_ref().unwrap().state, "paused");
    assert!(paused.snapshot_bytes > 0);
    assert_eq!(agent.get("sbx-a").await.unwrap().state, "paused");
    assert_code(
        agent
            .call::<_, pb::PauseSandboxResponse>(
                "PauseSandbox",
                &pb::PauseSandboxRequest {
                    sandbox_id: "sbx-a".into(),
                },
            )
            .await,
        Code::FailedPrecondition,
        "only a running sandbox can be paused",
    );
    let resumed: pb::ResumeSandboxResponse = agent
        .call(
            "ResumeSandbox",
            &pb::ResumeSandboxRequest {
                sandbox_id: "sbx-a".into(),
                ..Default::default()
            },
        )
        .await
        .expect("ResumeSandbox");
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
    let mut lines = before.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("sbx-a"),
        "the file written before the pause: {before:?}"
    );
    let ticks_before: u64 = lines.next().unwrap().trim().parse().unwrap();
    let mut lines = after.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("alive"),
        "the background process: {after:?}"
    );
    let ticks_after: u64 = lines.next().unwrap().trim().parse().unwrap();
    assert!(
        ticks_after > ticks_before,
        "the background process still writes: {ticks_before} → {ticks_after}"
    );
    // A second resume of a running sandbox is refused.
    assert_code(
        agent
            .call::<_, pb::ResumeSandboxResponse>(
                "ResumeSandbox",
                &pb::ResumeSandboxRequest {
                    sandbox_id: "sbx-a".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::FailedPrecondition,
        "only a paused sandbox can be resumed",
    );
    // The template is in use: it cannot be deleted yet.
    assert_code(
        agent
            .call::<_, pb::DeleteTemplateResponse>(
                "DeleteTemplate",
                &pb::DeleteTemplateRequest {
                    template_id: "base".into(),
                },
            )
            .await,
        Code::FailedPrecondition,
        "in use",
    );

    for id in ["sbx-a", "sbx-b", "sbx-c"] {
        let _: pb::DestroySandboxResponse = agent
            .call(
                "DestroySandbox",
                &pb::DestroySandboxRequest {
                    sandbox_id: id.into(),
                },
            )
            .await
            .expect("DestroySandbox");
    }
    let listed: pb::ListSandboxesResponse = agent
        .call("ListSandboxes", &pb::ListSandboxesRequest {})
        .await
        .unwrap();
    assert!(listed.sandboxes.is_empty());
    let _: pb::DeleteTemplateResponse = agent
        .call(
            "DeleteTemplate",
            &pb::DeleteTemplateRequest {
                template_id: "base".into(),
            },
        )
        .await
        .expect("DeleteTemplate");
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
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
        agent
            .call::<_, pb::CreateSandboxResponse>(
                "CreateSandbox",
                &pb::CreateSandboxRequest {
                    template_id: "nope".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::NotFound,
        "template nope not found",
    );
    assert_code(
        agent
            .call::<_, pb::BuildTemplateResponse>(
                "BuildTemplate",
                &pb::BuildTemplateRequest {
                    template_id: "zero".into(),
                    memory_mib: 0,
                    ..Default::default()
                },
            )
            .await,
        Code::InvalidArgument,
        "memory_mib must be at least",
    );
    assert_code(
        agent.get("ghost").await,
        Code::NotFound,
        "sandbox ghost not found",
    );
    assert_code(
        agent
            .call::<_, pb::ResumeSandboxResponse>(
                "ResumeSandbox",
                &pb::ResumeSandboxRequest {
                    sandbox_id: "ghost".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::NotFound,
        "not found",
    );
    assert_code(
        agent
            .call::<_, pb::DestroySandboxResponse>(
                "DestroySandbox",
                &pb::DestroySandboxRequest {
                    sandbox_id: "../etc".into(),
                },
            )
            .await,
        Code::NotFound,
        "not found",
    );

    agent.build_template("base").await;
    assert_code(
        agent
            .call::<_, pb::CreateSandboxResponse>(
                "CreateSandbox",
                &pb::CreateSandboxRequest {
                    template_id: "base".into(),
                    sandbox_id: "Bad Id".into(),
                    ..Default::default()
                },
            )
            .await,
        Code::InvalidArgument,
        "must be 1 to 64",
    );
    let (one, two) = tokio::join!(
        agent.create("base", "keep", None),
        agent.create("base", "doomed", None)
    );
    assert_code(
        agent
            .call::<_, pb::CreateSandboxResponse>(
                "CreateSandbox",
                &pb::CreateSandboxRequest {
                    template_id: "base".into(),
                    sandbox_id: "keep".into(),
                    ..Default::default()
                },
            )
            .await,
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
    let info: pb::HostInfoResponse = agent
        .call("HostInfo", &pb::HostInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.sandboxes_running, 2);
    let in_use_before = info.slots_in_use;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(two.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until(
        "the agent noticing the dead VM",
        Duration::from_secs(3),
        async || agent.get("doomed").await.is_ok_and(|s| s.state == "failed"),
    )
    .await;
    let failed = agent.get("doomed").await.unwrap();
    assert!(failed.error.contains("exited unexpectedly"), "{failed:?}");
    assert_eq!(failed.envd_address, "");
    let info: pb::HostInfoResponse = agent
        .call("HostInfo", &pb::HostInfoRequest {})
        .await
        .unwrap();
    assert_eq!(
        info.slots_in_use,
        in_use_before - 1,
        "the dead VM's slot is free"
    );
    assert_eq!(info.sandboxes_running, 1);
    assert_code(
        agent
            .call::<_, pb::PauseSandboxResponse>(
                "PauseSandbox",
                &pb::PauseSandboxRequest {
                    sandbox_id: "doomed".into(),
                },
            )
            .await,
        Code::FailedPrecondition,
        "is failed",
    );

    for id in ["keep", "doomed"] {
        let _: pb::DestroySandboxResponse = agent
            .call(
                "DestroySandbox",
                &pb::DestroySandboxRequest {
                    sandbox_id: id.into(),
                },
            )
            .await
            .expect("DestroySandbox");
    }
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}
