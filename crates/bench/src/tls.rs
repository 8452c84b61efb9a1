//! `wrenn-bench tls`: what TLS costs, measured in one run of a real two-process fleet: a `wrenn
//! server` serving its API and edge proxy both over plain HTTP and, under a domain, over HTTPS
//! (a certificate of its local authority), and a `wrenn agent serve` joined to it over the
//! fleet's mutual TLS, on which every sandbox runs. Each figure compares the two fronts in the
//! same run, alternating, on a new connection each time (the handshake counted), so both
//! carry the same fleet hop:
//! - create through the REST API, request to 201;
//! - a small request through the edge proxy (envd's `/health`);
//! - a download of a file from envd's `/files` through the edge proxy;
//! - and the fleet hop's own handshake: the control plane's mutual TLS handshake with the agent,
//!   a full one against a resumed one (the control plane keeps one TLS client per host, so a
//!   proxied request to an agent mostly resumes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use wrenn_agent_api::fleet_tls;
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_http::client::{ClientOptions, reqwest};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;

use crate::report::{median, ms, quantile, table};
use crate::sandbox::GuestArgs;

#[derive(Debug, Args)]
pub struct TlsBenchArgs {
    /// Creates measured on each front.
    #[arg(long, default_value_t = 10)]
    creates: usize,
    /// Small requests through the edge proxy measured on each front.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Downloads measured on each front.
    #[arg(long, default_value_t = 3)]
    downloads: usize,
    /// The downloaded file's size, MiB.
    #[arg(long, default_value_t = 256)]
    download_mib: usize,
    /// Fleet handshakes measured each way (full, resumed).
    #[arg(long, default_value_t = 50)]
    handshakes: usize,
    /// The agent's network slots: its prefix (interfaces are named after it) and first slot.
    #[arg(long, default_value = "wbtls")]
    slot_prefix: String,
    #[arg(long, default_value_t = 1700)]
    first_slot: u32,
    #[command(flatten)]
    guest: GuestArgs,
}

/// The domain the HTTPS front serves under (resolved by no one: the benchmark dials the
/// listener's address, names the host in `Host` and checks the certificate against that name;
/// dialling an address, it sends no SNI, which the front does not need).
const DOMAIN: &str = "bench.wrenn.test";

/// A free port on the loopback.
fn free_address() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], super::free_port()?)))
}

/// A `wrenn server` and a `wrenn agent serve` joined to it, stopped (SIGTERM) when dropped.
struct Fleet {
    server: Child,
    agent: Child,
    server_data: tempfile::TempDir,
    agent_data: tempfile::TempDir,
    api: SocketAddr,
    proxy: SocketAddr,
    https: SocketAddr,
    key: String,
    /// The agent's API, and its host id.
    agent_api: SocketAddr,
    host_id: String,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The agent first: with --cleanup-on-exit its slots go with it (its VMMs below).
        for child in [&mut self.agent, &mut self.server] {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // An agent keeps its VMs running across its stop (only its slots go with
        // --cleanup-on-exit): the sandboxes a failed run left are its VMMs under its directory.
        kill_vmms_under(self.agent_data.path());
    }
}

/// SIGKILLs the processes whose command line names `dir` (the VMMs of an agent's sandboxes).
fn kill_vmms_under(dir: &Path) {
    let marker = format!("{}/", dir.display());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(command_line) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&command_line).contains(&marker) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Fleet {
    async fn start(args: &TlsBenchArgs) -> anyhow::Result<Fleet> {
        let wrenn = super::wrenn_binary()?;
        let server_data = tempfile::tempdir()?;
        let (api, proxy, https, fleet) = (
            free_address()?,
            free_address()?,
            free_address()?,
            free_address()?,
        );
        let join_token = "bench-join-token";
        let server = Command::new(&wrenn)
            .args(["server", "--no-internet", "--domain", DOMAIN])
            .arg("--data-dir")
            .arg(server_data.path())
            .args(["--api-listen", &api.to_string()])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--https-listen", &https.to_string()])
            .args(["--fleet-listen", &fleet.to_string()])
            .args(["--heartbeat-interval-ms", "500"])
            .env("WRENN_JOIN_TOKEN", join_token)
            .env("WRENN_LOG", "warn")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting wrenn server")?;
        // Dropped (and stopped) on any error below.
        let mut half = HalfStarted {
            server: Some(server),
            agent: None,
        };
        wait_for("the control plane's API", Duration::from_secs(60), || {
            std::net::TcpStream::connect(api).is_ok()
                && server_data.path().join("cp/initial-api-key").exists()
        })?;
        let key = std::fs::read_to_string(server_data.path().join("cp/initial-api-key"))?
            .trim()
            .to_string();

        let agent_data = tempfile::tempdir()?;
        let (agent_api, agent_proxy) = (free_address()?, free_address()?);
        let mmds_port = super::free_port()?;
        let token = "bench-agent-token";
        let mut command = Command::new(&wrenn);
        command
            .args(["agent", "serve", "--no-internet", "--cleanup-on-exit"])
            .args(["--slot-prefix", &args.slot_prefix])
            .args(["--first-slot", &args.first_slot.to_string()])
            .args(["--slots", "16", "--slots-ahead", "2", "--warm-pool", "0"])
            .args(["--accel", args.guest.accel_name()])
            .arg("--data-dir")
            .arg(agent_data.path())
            .args(["--listen", &agent_api.to_string()])
            .args(["--proxy-listen", &agent_proxy.to_string()])
            .args(["--mmds-port", &mmds_port.to_string()])
            .args(["--join", &format!("https://{fleet}")])
            .arg("--control-plane-ca")
            .arg(plane_file(server_data.path(), "plane-ca.pem"))
            .args(["--join-token", join_token, "--host-name", "bench"])
            .env("WRENN_AGENT_TOKEN", token)
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(image) = &args.guest.image_dir {
            command.arg("--image-dir").arg(image);
        }
        let agent = command.spawn().context("starting wrenn agent serve")?;
        half.agent = Some((agent, agent_data.path().to_path_buf()));
        let identity_file = agent_data.path().join(wrenn_agent::join::IDENTITY_FILE);
        wait_for("the agent to join", Duration::from_secs(60), || {
            agent_data
                .path()
                .join(wrenn_agent::join::CERTIFICATE_FILE)
                .exists()
                && identity_file.exists()
        })?;
        let host_id = wrenn_agent::join::read_identity(&identity_file)
            .map_err(|error| anyhow::anyhow!("{error}"))?
            .context("the agent kept no identity")?
            .host_id;
        let fleet = Fleet {
            server: half.server.take().context("the server")?,
            agent: half.agent.take().context("the agent")?.0,
            server_data,
            agent_data,
            api,
            proxy,
            https,
            key,
            agent_api,
            host_id,
        };

        // The template, built on the agent as its control plane asks for builds.
        eprintln!("building the template (one cold boot) ...");
        let client = ConnectClient::new(
            format!("https://{agent_api}"),
            HttpVersion::Http1,
            Codec::Proto,
        )
        .with_tls(fleet.as_control_plane()?)?
        .with_header("authorization", &format!("Bearer {token}"));
        client
            .call::<host_agent::BuildTemplate>(
                &pb::BuildTemplateRequest {
                    template_id: "base".into(),
                    memory_mib: args.guest.memory_mib,
                    vcpus: 1,
                    ..Default::default()
                },
                &http::HeaderMap::new(),
            )
            .await
            .map_err(|error| anyhow::anyhow!("building the template: {error}"))?;
        Ok(fleet)
    }

    /// New TLS settings to reach the agent as the control plane does (presenting its
    /// certificate, checking the agent's against the hosts authority).
    fn as_control_plane(&self) -> anyhow::Result<rustls::ClientConfig> {
        let read = |name: &str| std::fs::read_to_string(plane_file(self.server_data.path(), name));
        let presented = fleet_tls::Identity::new(&read("plane.pem")?, &read("plane-key.pem")?)?;
        Ok(fleet_tls::client_config(
            fleet_tls::roots(&read("hosts-ca.pem")?)?,
            &fleet_tls::host_name(&self.host_id),
            presented,
            fleet_tls::Alpn::Http1,
        )?)
    }

    /// A client of the plain fronts, a new connection for each request.
    fn plain_client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(wrenn_http::client::client(ClientOptions {
            keep_idle: false,
            ..Default::default()
        }))
    }

    /// A client of the HTTPS front for requests naming `host` (checked against the control
    /// plane's local authority as a client trusting it does), a new connection for each request.
    fn https_client(&self, host: &str) -> anyhow::Result<reqwest::Client> {
        let authority = std::fs::read_to_string(self.server_data.path().join("tls/ca.pem"))
            .context("the control plane's local authority")?;
        let settings = fleet_tls::client_config(
            fleet_tls::roots(&authority)?,
            host,
            fleet_tls::Identity::none(),
            fleet_tls::Alpn::Http1,
        )?;
        Ok(wrenn_http::client::tls_client(
            ClientOptions {
                keep_idle: false,
                ..Default::default()
            },
            settings,
        )?)
    }

    /// `POST /v2/sandboxes` on one front: the sandbox's id and the time to the 201.
    async fn create(&self, front: Front) -> anyhow::Result<(String, Duration)> {
        let api_host = format!("api.{DOMAIN}");
        let (client, url, host) = match front {
            Front::Plain => (
                self.plain_client()?,
                format!("http://{}/v2/sandboxes", self.api),
                None,
            ),
            Front::Https => (
                self.https_client(&api_host)?,
                format!("https://{}/v2/sandboxes", self.https),
                Some(api_host.as_str()),
            ),
        };
        let mut request = client
            .post(url)
            .header("x-api-key", &self.key)
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(300))
            // Unsecured: the proxied calls below go to envd without its access token.
            .body(json!({"templateID": "base", "timeout": 900, "secure": false}).to_string());
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let started = Instant::now();
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        let took = started.elapsed();
        let id = super::api::created_sandbox_id(status.as_u16(), &body)
            .with_context(|| format!("over {front:?}"))?;
        Ok((id, took))
    }

    async fn kill(&self, id: &str) -> anyhow::Result<()> {
        let response = self
            .plain_client()?
            .delete(format!("http://{}/sandboxes/{id}", self.api))
            .header("x-api-key", &self.key)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 204,
            "kill {id}: HTTP {}",
            response.status()
        );
        Ok(())
    }

    /// A request to envd's `path` in sandbox `id` through one front of the edge proxy: its
    /// status, bytes and time to the last byte.
    async fn through_proxy(
        &self,
        front: Front,
        id: &str,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, u64, Duration)> {
        let envd_port = wrenn_proto::ENVD_PORT.to_string();
        let sandbox_host = format!("{envd_port}-{id}.{DOMAIN}");
        let mut request = match front {
            Front::Plain => self
                .plain_client()?
                .request(method, format!("http://{}{path}", self.proxy))
                .header("e2b-sandbox-id", id)
                .header("e2b-sandbox-port", &envd_port),
            Front::Https => self
                .https_client(&sandbox_host)?
                .request(method, format!("https://{}{path}", self.https))
                .header("host", &sandbox_host),
        };
        request = request.timeout(Duration::from_secs(600));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/octet-stream")
                .body(body);
        }
        let started = Instant::now();
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        let mut bytes = 0u64;
        while let Some(data) = response.chunk().await? {
            bytes += data.len() as u64;
        }
        Ok((status, bytes, started.elapsed()))
    }
}

/// Which of the control plane's fronts a request goes to.
#[derive(Debug, Clone, Copy)]
enum Front {
    Plain,
    Https,
}

/// The processes until the fleet owns them: stopped (the agent's VMMs too) if the start fails
/// half-way.
struct HalfStarted {
    server: Option<Child>,
    agent: Option<(Child, PathBuf)>,
}

impl Drop for HalfStarted {
    fn drop(&mut self) {
        if let Some((mut agent, data)) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
            kill_vmms_under(&data);
        }
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

fn plane_file(server_data: &Path, name: &str) -> PathBuf {
    server_data.join("cp/fleet-tls").join(name)
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "waited {within:?} for {what} in vain"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Sorted milliseconds of `samples`.
fn sorted_ms(samples: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// One mutual TLS handshake with the agent at `address` under `settings` (a shared one
/// resumes the last session): its time.
async fn handshake(
    settings: Arc<rustls::ClientConfig>,
    address: SocketAddr,
    host_id: &str,
) -> anyhow::Result<(Duration, bool)> {
    let name = rustls::pki_types::ServerName::try_from(fleet_tls::host_name(host_id))?;
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut connection = tokio_rustls::TlsConnector::from(settings)
        .connect(name, stream)
        .await?;
    let took = started.elapsed();
    let resumed = matches!(
        connection.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    // One request and its answer, as a proxied request makes: the server's session tickets
    // come after the handshake and are taken in as the answer is read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    connection
        .write_all(b"GET /health HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    connection.read_to_end(&mut answer).await?;
    Ok((took, resumed))
}

pub async fn run(args: TlsBenchArgs) -> anyhow::Result<()> {
    let fleet = Fleet::start(&args).await?;
    // The template reaches the control plane with the agent's next heartbeat: the first
    // create (not timed) waits for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let warm = loop {
        match fleet.create(Front::Plain).await {
            Ok((id, _)) => break id,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "the template is not known yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    };
    fleet.kill(&warm).await?;

    eprintln!("creates over HTTP and HTTPS, alternating ...");
    let (mut plain_creates, mut https_creates) = (Vec::new(), Vec::new());
    for run in 0..args.creates {
        // The order swaps every round: neither front always goes first.
        let order = if run % 2 == 0 {
            [Front::Plain, Front::Https]
        } else {
            [Front::Https, Front::Plain]
        };
        for front in order {
            let (id, took) = fleet.create(front).await?;
            match front {
                Front::Plain => plain_creates.push(took),
                Front::Https => https_creates.push(took),
            }
            fleet.kill(&id).await?;
        }
    }

    let (id, _) = fleet.create(Front::Plain).await?;
    eprintln!("small requests through the edge proxy ...");
    let (mut plain_small, mut https_small) = (Vec::new(), Vec::new());
    for _ in 0..args.requests {
        for front in [Front::Plain, Front::Https] {
            let (status, _, took) = fleet
                .through_proxy(front, &id, http::Method::GET, "/health", None)
                .await?;
            anyhow::ensure!(status == 204, "/health over {front:?}: HTTP {status}");
            match front {
                Front::Plain => plain_small.push(took),
                Front::Https => https_small.push(took),
            }
        }
    }

    eprintln!(
        "{} MiB downloads through the edge proxy ...",
        args.download_mib
    );
    let file = "/files?path=/tmp/big&username=root";
    let (status, _, _) = fleet
        .through_proxy(
            Front::Plain,
            &id,
            http::Method::POST,
            file,
            Some(vec![b'x'; args.download_mib << 20]),
        )
        .await?;
    anyhow::ensure!(status == 200, "upload: HTTP {status}");
    let (mut plain_rates, mut https_rates) = (Vec::new(), Vec::new());
    for _ in 0..args.downloads {
        for front in [Front::Plain, Front::Https] {
            let (status, bytes, took) = fleet
                .through_proxy(front, &id, http::Method::GET, file, None)
                .await?;
            anyhow::ensure!(
                status == 200 && bytes == (args.download_mib << 20) as u64,
                "download over {front:?}: HTTP {status}, {bytes} bytes"
            );
            let rate = bytes as f64 / (1 << 20) as f64 / took.as_secs_f64();
            match front {
                Front::Plain => plain_rates.push(rate),
                Front::Https => https_rates.push(rate),
            }
        }
    }
    fleet.kill(&id).await?;

    eprintln!("the fleet hop's handshakes ...");
    let (mut full, mut resumed) = (Vec::new(), Vec::new());
    let shared = Arc::new(fleet.as_control_plane()?);
    for _ in 0..args.handshakes {
        let fresh = Arc::new(fleet.as_control_plane()?);
        let (took, was_resumed) = handshake(fresh, fleet.agent_api, &fleet.host_id).await?;
        anyhow::ensure!(!was_resumed, "a new client resumed a session");
        full.push(took);
        let (took, was_resumed) =
            handshake(shared.clone(), fleet.agent_api, &fleet.host_id).await?;
        // The shared client's first handshake is a full one: only resumptions count.
        if was_resumed {
            resumed.push(took);
        }
    }
    anyhow::ensure!(!resumed.is_empty(), "no handshake resumed a session");

    let p50 = |samples: &[Duration]| quantile(&sorted_ms(samples), 0.5);
    let figures = [
        ("create_http_p50_ms", p50(&plain_creates)),
        ("create_https_p50_ms", p50(&https_creates)),
        ("proxied_small_request_http_p50_ms", p50(&plain_small)),
        ("proxied_small_request_https_p50_ms", p50(&https_small)),
        ("download_http_mib_s", median(&plain_rates)),
        ("download_https_mib_s", median(&https_rates)),
        ("fleet_handshake_full_p50_ms", p50(&full)),
        ("fleet_handshake_resumed_p50_ms", p50(&resumed)),
    ];
    if args.guest.json {
        let mut out = serde_json::Map::new();
        for (name, value) in figures {
            out.insert(name.into(), json!(value));
        }
        out.insert("accel".into(), json!(args.guest.accel_name()));
        println!("{}", serde_json::Value::Object(out));
        return Ok(());
    }
    let [
        create_http,
        create_https,
        small_http,
        small_https,
        download_http,
        download_https,
        full_p50,
        resumed_p50,
    ] = figures.map(|(_, value)| value);
    let mut fronts = table(["measure", "plain HTTP", "HTTPS", "HTTPS adds"]);
    fronts.add_row([
        format!("create through the REST API, p50 of {}", args.creates),
        ms(create_http, 0),
        ms(create_https, 0),
        format!("{:+.1} ms", create_https - create_http),
    ]);
    fronts.add_row([
        format!(
            "GET envd /health through the edge proxy, p50 of {}",
            args.requests
        ),
        ms(small_http, 2),
        ms(small_https, 2),
        format!("{:+.2} ms", small_https - small_http),
    ]);
    fronts.add_row([
        format!(
            "{} MiB download through the edge proxy, median of {}",
            args.download_mib, args.downloads
        ),
        format!("{download_http:.0} MiB/s"),
        format!("{download_https:.0} MiB/s"),
        format!("{:+.0}%", (download_https / download_http - 1.0) * 100.0),
    ]);
    println!("{fronts}");
    let mut hop = table(["the fleet hop (control plane to agent, mutual TLS)", "p50"]);
    hop.add_row([
        format!("full handshake, of {}", full.len()),
        ms(full_p50, 2),
    ]);
    hop.add_row([
        format!("resumed handshake, of {}", resumed.len()),
        ms(resumed_p50, 2),
    ]);
    println!("{hop}");
    Ok(())
}
