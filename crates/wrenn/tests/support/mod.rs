//! What the VM tests share: their prerequisites, a `wrenn agent serve` process of a test's own
//! (data directory, slot range, ports), and running commands through a sandbox's envd.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::HeaderMap;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_connect::{Code, Codec, ConnectError};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;
#[allow(unused_imports)]
pub use wrenn_testkit::{Ran, free_port, wait_until};
use wrenn_testkit::{as_user, run_script};

pub fn prerequisites() -> Option<PathBuf> {
    let image = std::env::var_os("WRENN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(wrenn_image::default_image_dir);
    wrenn_testkit::vm_prerequisites(image, "the agent tests")
}

/// A `wrenn agent serve` process with its own data directory and slot range.
pub struct Agent {
    child: Option<Child>,
    data: tempfile::TempDir,
    pub prefix: String,
    first_slot: u32,
    pub api_port: u16,
    pub proxy_port: u16,
    pub mmds_port: u16,
    pub token: String,
    /// More arguments of `wrenn agent serve` (joining a control plane).
    extra_args: Vec<String>,
    /// The address the API and the sandbox proxy listen on.
    listen_host: String,
    /// The control plane it joined (its API then speaks the fleet's mutual TLS alone).
    fleet: Option<FleetAccess>,
    /// Whether its start waits for its registration (not for an agent the control plane
    /// refuses: it is ready once its API's port takes connections).
    awaits_registration: bool,
}

/// A control plane's fleet as its agents (and a test calling them as the control plane) reach
/// it: the registry's URL, the control plane's data directory (its authorities and its own
/// certificate) and the join token.
#[derive(Debug, Clone)]
pub struct FleetAccess {
    pub url: String,
    pub cp_data: PathBuf,
    pub join_token: String,
}

impl FleetAccess {
    fn file(&self, name: &str) -> PathBuf {
        self.cp_data.join("cp/fleet-tls").join(name)
    }

    /// The plane authority's certificate (what `--control-plane-ca` may name).
    pub fn plane_ca(&self) -> PathBuf {
        self.file("plane-ca.pem")
    }

    /// TLS settings to call host `host_id`'s agent as its control plane does.
    pub fn as_control_plane(&self, host_id: &str) -> rustls::ClientConfig {
        use wrenn_agent_api::fleet_tls;
        let read = |name: &str| std::fs::read_to_string(self.file(name)).unwrap();
        let identity =
            fleet_tls::Identity::new(&read("plane.pem"), &read("plane-key.pem")).unwrap();
        fleet_tls::client_config(
            fleet_tls::roots(&read("hosts-ca.pem")).unwrap(),
            &fleet_tls::host_name(host_id),
            identity,
            fleet_tls::Alpn::Http1,
        )
        .unwrap()
    }
}

impl Agent {
    pub fn start(prefix: &str, first_slot: u32) -> Agent {
        Self::start_with(prefix, first_slot, Vec::new())
    }

    /// An agent that joins the control plane of `fleet` as host `name`.
    pub fn start_joined(prefix: &str, first_slot: u32, fleet: &FleetAccess, name: &str) -> Agent {
        Self::start_joined_with(prefix, first_slot, fleet, name, Vec::new())
    }

    /// An agent that tries to join as `name` and is refused: started once its API's port
    /// takes connections (it has no certificate to serve with).
    pub fn start_refused(prefix: &str, first_slot: u32, fleet: &FleetAccess, name: &str) -> Agent {
        let ca = fleet.plane_ca().display().to_string();
        let args = [
            "--join",
            &fleet.url,
            "--control-plane-ca",
            &ca,
            "--join-token",
            &fleet.join_token,
            "--host-name",
            name,
        ];
        let args = args.map(str::to_string).to_vec();
        let mut agent = Self::unstarted("127.0.0.1", prefix, first_slot, args, Some(fleet.clone()));
        agent.awaits_registration = false;
        agent.spawn();
        agent
    }

    /// [`Agent::start_joined`] with more arguments for `wrenn agent serve`.
    pub fn start_joined_with(
        prefix: &str,
        first_slot: u32,
        fleet: &FleetAccess,
        name: &str,
        extra_args: Vec<String>,
    ) -> Agent {
        let ca = fleet.plane_ca().display().to_string();
        let args = [
            "--join",
            &fleet.url,
            "--control-plane-ca",
            &ca,
            "--join-token",
            &fleet.join_token,
            "--host-name",
            name,
        ];
        let args = args.map(str::to_string).into_iter().chain(extra_args);
        Self::start_joining(
            "127.0.0.1",
            prefix,
            first_slot,
            args.collect(),
            Some(fleet.clone()),
        )
    }

    pub fn start_with(prefix: &str, first_slot: u32, extra_args: Vec<String>) -> Agent {
        Self::start_on("127.0.0.1", prefix, first_slot, extra_args)
    }

    /// An agent whose API and proxy listen on `listen_host` (`0.0.0.0`: every host address).
    pub fn start_on(
        listen_host: &str,
        prefix: &str,
        first_slot: u32,
        extra_args: Vec<String>,
    ) -> Agent {
        Self::start_joining(listen_host, prefix, first_slot, extra_args, None)
    }

    fn start_joining(
        listen_host: &str,
        prefix: &str,
        first_slot: u32,
        extra_args: Vec<String>,
        fleet: Option<FleetAccess>,
    ) -> Agent {
        let mut agent = Self::unstarted(listen_host, prefix, first_slot, extra_args, fleet);
        agent.spawn();
        agent
    }

    /// The agent, not started yet.
    fn unstarted(
        listen_host: &str,
        prefix: &str,
        first_slot: u32,
        extra_args: Vec<String>,
        fleet: Option<FleetAccess>,
    ) -> Agent {
        Agent {
            awaits_registration: fleet.is_some(),
            fleet,
            listen_host: listen_host.to_string(),
            child: None,
            data: tempfile::tempdir().unwrap(),
            prefix: prefix.to_string(),
            first_slot,
            api_port: free_port(),
            proxy_port: free_port(),
            mmds_port: free_port(),
            token: format!("token-{prefix}"),
            extra_args,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("agent")
    }

    pub fn spawn(&mut self) {
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
            .args(["--first-slot", &self.first_slot.to_string()])
            // Eight slots, one kept ready, unless the test says otherwise.
            .args(if self.extra_args.iter().any(|arg| arg == "--slots") {
                &[][..]
            } else {
                &["--slots", "8", "--slots-ahead", "1"][..]
            })
            // No warm VMMs (whose processes, slots and directories a test would count as its
            // sandboxes' leftovers), unless the test asks for them.
            .args(if self.extra_args.iter().any(|arg| arg == "--warm-pool") {
                &[][..]
            } else {
                &["--warm-pool", "0"][..]
            })
            .args([
                "--listen",
                &format!("{}:{}", self.listen_host, self.api_port),
            ])
            .args(["--mmds-port", &self.mmds_port.to_string()])
            .args([
                "--proxy-listen",
                &format!("{}:{}", self.listen_host, self.proxy_port),
            ])
            .args(&self.extra_args)
            .env("WRENN_AGENT_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting wrenn agent");
        self.child = Some(child);
        // Ready means answering an authorised call, not just accepting connections. The wait
        // blocks this thread: in a test's runtime, its other tasks move to other workers.
        tokio::task::block_in_place(|| self.wait_until_it_answers());
    }

    fn wait_until_it_answers(&mut self) {
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

    /// Whether `HostInfo` gets a 200 (a plain HTTP/1.1 call, blocking; for a joined agent,
    /// once it registered, a call over the fleet's TLS).
    pub fn answers(&self) -> bool {
        use std::io::{Read, Write};
        if self.fleet.is_some() && !self.awaits_registration {
            return std::net::TcpStream::connect(("127.0.0.1", self.api_port)).is_ok();
        }
        if self.fleet.is_some() {
            if self.host_id().is_none()
                || !self
                    .data_dir()
                    .join(wrenn_agent::join::CERTIFICATE_FILE)
                    .exists()
            {
                return false;
            }
            let call = self.call::<wrenn_proto::agent::host_agent::HostInfo>(
                &wrenn_proto::agent::HostInfoRequest {},
            );
            return tokio::runtime::Handle::current().block_on(call).is_ok();
        }
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
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// A client of the agent's API with `token`: plain HTTP, or for a joined agent the
    /// fleet's mutual TLS as its control plane (once it registered).
    pub fn client(&self, token: &str) -> ConnectClient {
        let scheme = if self.fleet.is_some() {
            "https"
        } else {
            "http"
        };
        let client = ConnectClient::new(
            format!("{scheme}://127.0.0.1:{}", self.api_port),
            HttpVersion::Http1,
            Codec::Json,
        )
        .with_header("authorization", &format!("Bearer {token}"));
        match (&self.fleet, self.host_id()) {
            (Some(fleet), Some(host_id)) => client
                .with_tls(fleet.as_control_plane(&host_id))
                .expect("the TLS client builds"),
            _ => client,
        }
    }

    /// The host id its control plane gave it, once it registered.
    pub fn host_id(&self) -> Option<String> {
        let kept = std::fs::read(self.data_dir().join(wrenn_agent::join::IDENTITY_FILE)).ok()?;
        let identity: wrenn_agent::join::HostIdentity = serde_json::from_slice(&kept).ok()?;
        Some(identity.host_id)
    }

    pub async fn call<M>(&self, request: &M::Request) -> Result<M::Response, ConnectError>
    where
        M: wrenn_proto::Rpc,
        M::Request: wrenn_connect::Message,
        M::Response: wrenn_connect::Message,
    {
        self.client(&self.token)
            .call::<M>(request, &HeaderMap::new())
            .await
    }

    /// Calls `M`, which must succeed: a failure panics with the method's path and the error.
    pub async fn call_ok<M>(&self, request: &M::Request) -> M::Response
    where
        M: wrenn_proto::Rpc,
        M::Request: wrenn_connect::Message,
        M::Response: wrenn_connect::Message,
    {
        self.call::<M>(request)
            .await
            .unwrap_or_else(|error| panic!("{}: {error:?}", M::PATH))
    }

    pub async fn build_template(&self, id: &str) -> pb::Template {
        let request = pb::BuildTemplateRequest {
            template_id: id.into(),
            memory_mib: 512,
            vcpus: 1,
            ..Default::default()
        };
        let built = self.call_ok::<host_agent::BuildTemplate>(&request).await;
        built.template.unwrap()
    }

    /// Starts a `RunTemplateBuild`: its stream of events.
    pub async fn start_build(
        &self,
        request: &pb::RunTemplateBuildRequest,
    ) -> Result<wrenn_connect::client::ResponseStream<pb::RunTemplateBuildEvent>, ConnectError>
    {
        self.client(&self.token)
            .call_streaming::<host_agent::RunTemplateBuild>(request, &HeaderMap::new())
            .await
    }

    /// Runs a build to its end: its log, and the template or the build's error.
    pub async fn run_build(
        &self,
        request: &pb::RunTemplateBuildRequest,
    ) -> (
        Vec<pb::BuildLogEntry>,
        Result<pb::TemplateReport, ConnectError>,
    ) {
        let mut stream = match self.start_build(request).await {
            Ok(stream) => stream,
            Err(error) => return (Vec::new(), Err(error)),
        };
        let mut log = Vec::new();
        while let Some(event) = stream.message().await {
            match event.map(|e| e.event) {
                Ok(Some(pb::run_template_build_event::Event::Log(line))) => log.push(line),
                Ok(Some(pb::run_template_build_event::Event::Template(template))) => {
                    assert!(
                        stream.message().await.is_none(),
                        "nothing after the template"
                    );
                    return (log, Ok(template));
                }
                Ok(None) => {}
                Err(error) => return (log, Err(error)),
            }
        }
        panic!("the build's stream ended with neither a template nor an error; log: {log:?}")
    }

    /// A sandbox `id` of `template` whose `SANDBOX_NAME` is its id, secured by `token` if any.
    pub async fn create(&self, template: &str, id: &str, token: Option<&str>) -> pb::Sandbox {
        self.create_from(pb::CreateSandboxRequest {
            template_id: template.into(),
            sandbox_id: id.into(),
            env_vars: HashMap::from([("SANDBOX_NAME".to_string(), id.to_string())]),
            envd_access_token: token.unwrap_or_default().into(),
            ..Default::default()
        })
        .await
    }

    /// The sandbox `request` creates; the create must succeed.
    pub async fn create_from(&self, request: pb::CreateSandboxRequest) -> pb::Sandbox {
        let created = self.call_ok::<host_agent::CreateSandbox>(&request).await;
        created.sandbox.unwrap()
    }

    /// CreateSandbox with only the template and the sandbox id set, as it answers.
    pub async fn try_create(
        &self,
        template: &str,
        id: &str,
    ) -> Result<pb::CreateSandboxResponse, ConnectError> {
        let request = pb::CreateSandboxRequest {
            template_id: template.into(),
            sandbox_id: id.into(),
            ..Default::default()
        };
        self.call::<host_agent::CreateSandbox>(&request).await
    }

    /// Waits up to `within` for sandbox `id` to reach `state` (`what` names the wait in a
    /// timeout), and returns it as it is then.
    pub async fn wait_state(
        &self,
        what: &str,
        within: Duration,
        id: &str,
        state: &str,
    ) -> pb::Sandbox {
        wait_until(what, within, async || {
            self.get(id).await.is_ok_and(|s| s.state == state)
        })
        .await;
        self.get(id).await.unwrap()
    }

    /// The host's report (HostInfo).
    pub async fn host_info(&self) -> pb::HostReport {
        let info = self
            .call_ok::<host_agent::HostInfo>(&pb::HostInfoRequest {})
            .await;
        info.report.unwrap()
    }

    pub async fn get(&self, id: &str) -> Result<pb::Sandbox, ConnectError> {
        let response: pb::GetSandboxResponse = self
            .call::<host_agent::GetSandbox>(&pb::GetSandboxRequest {
                sandbox_id: id.into(),
            })
            .await?;
        Ok(response.sandbox.unwrap())
    }

    pub async fn pause(&self, id: &str) -> Result<pb::PauseSandboxResponse, ConnectError> {
        self.call::<host_agent::PauseSandbox>(&pb::PauseSandboxRequest {
            sandbox_id: id.into(),
            disk_only: false,
        })
        .await
    }

    /// A pause that keeps the disk alone.
    pub async fn pause_disk_only(
        &self,
        id: &str,
    ) -> Result<pb::PauseSandboxResponse, ConnectError> {
        self.call::<host_agent::PauseSandbox>(&pb::PauseSandboxRequest {
            sandbox_id: id.into(),
            disk_only: true,
        })
        .await
    }

    /// A checkpoint of a running sandbox as the template `template_id`.
    pub async fn checkpoint(
        &self,
        id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<pb::CheckpointSandboxResponse, ConnectError> {
        self.call::<host_agent::CheckpointSandbox>(&pb::CheckpointSandboxRequest {
            sandbox_id: id.into(),
            template_id: template_id.into(),
            ephemeral,
        })
        .await
    }

    pub async fn resume(&self, id: &str) -> Result<pb::ResumeSandboxResponse, ConnectError> {
        let request = pb::ResumeSandboxRequest {
            sandbox_id: id.into(),
            ..Default::default()
        };
        self.call::<host_agent::ResumeSandbox>(&request).await
    }

    pub async fn destroy(&self, id: &str) -> Result<pb::DestroySandboxResponse, ConnectError> {
        let request = pb::DestroySandboxRequest {
            sandbox_id: id.into(),
        };
        self.call::<host_agent::DestroySandbox>(&request).await
    }

    pub async fn delete_template(
        &self,
        id: &str,
    ) -> Result<pb::DeleteTemplateResponse, ConnectError> {
        let request = pb::DeleteTemplateRequest {
            template_id: id.into(),
        };
        self.call::<host_agent::DeleteTemplate>(&request).await
    }

    /// The pids of the VMM processes running for sandbox `id` (its directory is on their
    /// command line).
    pub fn vmm_pids(&self, id: &str) -> Vec<i32> {
        let marker = format!("{}/sandboxes/{id}/", self.data_dir().display());
        vmm_pids_matching(&marker)
    }

    /// Waits for the VMM of sandbox `id` to appear (an operation in flight starts it) and stops
    /// it with SIGSTOP, so that the operation hangs where it is; returns the VMM's pid.
    pub async fn freeze_new_vmm(&self, id: &str) -> i32 {
        let mut found = None;
        wait_until(
            &format!("a VMM for {id} to start"),
            Duration::from_secs(60),
            async || {
                found = self.vmm_pids(id).first().copied();
                found.is_some()
            },
        )
        .await;
        let pid = found.unwrap();
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        pid
    }

    /// The network namespaces of this agent's slots that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        let prefix = format!("{}-", self.prefix);
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect()
    }

    /// What of this agent is still on the machine: processes, namespaces, interfaces, files.
    pub fn leftovers(&self) -> Vec<String> {
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
        for name in self.namespaces() {
            found.push(format!("netns {name}"));
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

/// The pids of QEMU processes whose command line contains `marker`.
pub fn vmm_pids_matching(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let program = text.split(' ').next().unwrap_or("");
        if program.contains("qemu-system") && text.contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Sends `signal` to process `pid`, which must exist.
pub fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|error| panic!("{signal} to {pid}: {error}"));
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Whatever a failed test left: its VMs and slots go with it.
        let marker = self.data_dir().display().to_string();
        let _ = Command::new("pkill")
            .args(["-9", "-f", &format!("qemu-system.*{marker}")])
            .status();
        for name in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// envd's headers for calls as `user`, with the sandbox's access token when it has one.
pub fn envd_headers(token: Option<&str>) -> HeaderMap {
    as_user("user", token)
}

pub async fn run(sandbox: &pb::Sandbox, token: Option<&str>, script: &str) -> Ran {
    let client = ConnectClient::new(
        format!("http://{}", sandbox.envd_address),
        HttpVersion::Http1,
        Codec::Json,
    );
    run_with(&client, token, script).await
}

/// Runs `script` in `sandbox` (which has no access token) and asserts that its output, trimmed,
/// is `expected`.
pub async fn run_expecting(sandbox: &pb::Sandbox, script: &str, expected: &str) {
    let ran = run(sandbox, None, script).await;
    assert_eq!(ran.stdout.trim(), expected, "{ran:?}");
}

/// Runs `script` in a sandbox through an edge proxy at `proxy` (routing by headers).
pub async fn run_via_proxy(
    proxy: std::net::SocketAddr,
    sandbox_id: &str,
    token: Option<&str>,
    script: &str,
) -> Ran {
    let client = ConnectClient::new(format!("http://{proxy}"), HttpVersion::Http1, Codec::Json)
        .with_header("e2b-sandbox-id", sandbox_id)
        .with_header("e2b-sandbox-port", "49983");
    run_with(&client, token, script).await
}

/// Runs `script` in sandbox `sandbox_id` through the edge proxy at `proxy` and asserts that its
/// output, trimmed, is `expected`.
pub async fn run_via_proxy_expecting(
    proxy: std::net::SocketAddr,
    sandbox_id: &str,
    token: Option<&str>,
    script: &str,
    expected: &str,
) {
    let ran = run_via_proxy(proxy, sandbox_id, token, script).await;
    assert_eq!(ran.stdout.trim(), expected, "{ran:?}");
}

/// Runs `script` with bash through envd's process service at `client`.
pub async fn run_with(client: &ConnectClient, token: Option<&str>, script: &str) -> Ran {
    run_script(client, &envd_headers(token), script).await
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, ConnectError>, code: Code, words: &str) {
    let error = result.expect_err("the call should have failed");
    assert_eq!(error.code, code, "{error:?}");
    assert!(
        error.message.contains(words),
        "{:?} lacks {words:?}",
        error.message
    );
}

/// One HTTP call through wrenn's HTTP client, answered whole (any status).
#[allow(dead_code)]
pub async fn http_call(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
    timeout: Duration,
) -> Result<wrenn_api::client::Answer, String> {
    use wrenn_http::client::{ClientOptions, client, describe, read_bounded};
    let mut request = client(ClientOptions::default())
        .request(method, url)
        .timeout(timeout)
        .body(body.into());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.map_err(|e| describe(&e))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = read_bounded(response, 16 << 20)
        .await
        .map_err(|e| e.to_string())?;
    Ok(wrenn_api::client::Answer {
        status,
        headers,
        body,
    })
}
