//! `wrenn-bench egress`: what domain rules cost a guest's connections. A namespace of the
//! benchmark's own plays a web server (a 256 MiB body and a small one, by name through a DNS
//! server of its own); one sandbox reaches it directly (no rules), another through the agent's
//! egress proxy (an allowed domain, everything else denied), a third with a header transform
//! on that domain besides (its HTTP relayed by the agent request by request, the header set).
//! Each downloads the big body
//! (throughput, median of the runs) and fetches the small one again and again (connection
//! setup: curl's time to the first byte of the answer, on a new connection each time).

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;
use wrenn_proto::process as process_pb;

use super::report::{median, table};
use super::sandbox::{BenchAgent, GuestArgs};

#[derive(Debug, Args)]
pub struct EgressBenchArgs {
    /// Downloads of the big body measured per sandbox.
    #[arg(long, default_value_t = 3)]
    downloads: usize,
    /// Size of the big body, MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// New connections measured per sandbox.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    #[command(flatten)]
    guest: GuestArgs,
}

const NETNS: &str = "wbe-web";
const HOST_SIDE: &str = "wbeweb0";
const NET: &str = "10.253.77";
const NAME: &str = "bench.test";

/// The web server and DNS server in the namespace (argv: the big body's path).
const SERVER: &str = r#"
import http.server, os, socket, sys, threading
BIG = sys.argv[1]
class Files(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/big":
            size = os.path.getsize(BIG)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(BIG, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
def dns():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 53))
    while True:
        query, peer = udp.recvfrom(512)
        at = 12
        while query[at]:
            at += 1 + query[at]
        end = at + 5
        answer = query[:2] + bytes([0x81, 0x80]) + query[4:6] + bytes([0, 1, 0, 0, 0, 0])
        answer += query[12:end] + bytes([0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4])
        answer += socket.inet_aton(sys.argv[2])
        udp.sendto(answer, peer)
threading.Thread(target=dns, daemon=True).start()
http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("0.0.0.0", 80), Files)
print("serving", flush=True)
server.serve_forever()
"#;

/// The namespace and its servers; removed on drop.
struct Web {
    server: std::process::Child,
    _big: tempfile::NamedTempFile,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("ip").args(args).status()?;
    anyhow::ensure!(status.success(), "ip {}", args.join(" "));
    Ok(())
}

impl Web {
    fn start(mib: u64) -> anyhow::Result<Web> {
        Self::remove();
        ip(&["netns", "add", NETNS])?;
        ip(&[
            "link", "add", HOST_SIDE, "type", "veth", "peer", "name", "web0", "netns", NETNS,
        ])?;
        ip(&["addr", "add", &format!("{NET}.1/24"), "dev", HOST_SIDE])?;
        ip(&["link", "set", HOST_SIDE, "up"])?;
        ip(&[
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{NET}.2/24"),
            "dev",
            "web0",
        ])?;
        ip(&["-n", NETNS, "link", "set", "web0", "up"])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            NETNS,
            "route",
            "add",
            "default",
            "via",
            &format!("{NET}.1"),
        ])?;
        let big = tempfile::NamedTempFile::new()?;
        big.as_file().set_len(mib << 20)?;
        let mut server = std::process::Command::new("ip")
            .args(["netns", "exec", NETNS, "python3", "-c", SERVER])
            .arg(big.path())
            .arg(format!("{NET}.2"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the web server")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().context("its output")?),
            &mut line,
        )?;
        anyhow::ensure!(line.trim() == "serving", "the web server did not start");
        Ok(Web { server, _big: big })
    }

    fn remove() {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", HOST_SIDE])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        Self::remove();
    }
}

/// Runs `script` with bash in the guest behind `envd`: its standard output.
async fn run(envd: &ConnectClient, script: &str) -> anyhow::Result<String> {
    let request = process_pb::StartRequest {
        process: Some(process_pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let mut stream = envd
        .call_streaming::<wrenn_proto::process::process::Start>(&request, &http::HeaderMap::new())
        .await?;
    let mut stdout = Vec::new();
    let mut exit = None;
    while let Some(message) = stream.message().await {
        match message?.event.and_then(|e| e.event) {
            Some(process_pb::process_event::Event::Data(data)) => {
                if let Some(process_pb::process_event::data_event::Output::Stdout(bytes)) =
                    data.output
                {
                    stdout.extend(bytes);
                }
            }
            Some(process_pb::process_event::Event::End(end)) => exit = Some(end.exit_code),
            _ => {}
        }
    }
    anyhow::ensure!(exit == Some(0), "{script:?} failed ({exit:?})");
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Figures {
    download_mib_s: f64,
    setup_ms_p50: f64,
    setup_ms_p95: f64,
}

/// Downloads and connections from one guest.
async fn measure(envd: &ConnectClient, args: &EgressBenchArgs) -> anyhow::Result<Figures> {
    // The name resolves through the guest's resolver (the agent's, with domain rules); then
    // every fetch names the address, so DNS is not in the figures.
    let address = format!("{NET}.2");
    let resolve = format!("--resolve {NAME}:80:{address}");
    let _ = run(envd, &format!("getent hosts {NAME} || true")).await?;
    let mut rates = Vec::new();
    for _ in 0..args.downloads {
        let out = run(
            envd,
            &format!("curl -sS {resolve} -o /dev/null -w '%{{speed_download}}' http://{NAME}/big"),
        )
        .await?;
        let bytes_per_s: f64 = out.trim().parse().context("curl's speed")?;
        rates.push(bytes_per_s / (1024.0 * 1024.0));
    }
    let out = run(
        envd,
        &format!(
            "for i in $(seq {}); do curl -sS {resolve} -o /dev/null -w '%{{time_starttransfer}}\\n' http://{NAME}/small; done",
            args.connections
        ),
    )
    .await?;
    let mut setups: Vec<Duration> = out
        .lines()
        .filter_map(|line| line.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    anyhow::ensure!(setups.len() == args.connections, "curl gave {out:?}");
    setups.sort();
    let p95 = setups[((setups.len() * 95).div_ceil(100)).saturating_sub(1)];
    Ok(Figures {
        download_mib_s: median(&rates),
        setup_ms_p50: median(
            &setups
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        ),
        setup_ms_p95: p95.as_secs_f64() * 1000.0,
    })
}

pub async fn run_bench(args: EgressBenchArgs) -> anyhow::Result<()> {
    let _web = Web::start(args.mib)?;
    let agent = BenchAgent::start_with(
        &args.guest,
        "wbe",
        1300,
        &[
            "--guest-open-range".into(),
            format!("{NET}.0/24"),
            "--egress-dns".into(),
            format!("{NET}.2:53"),
        ],
    )?;
    agent.build_template(args.guest.memory_mib).await?;
    let mut results = Vec::new();
    for (label, egress) in [
        ("direct (no rules)", String::new()),
        (
            "through the egress proxy (domain rule)",
            serde_json::json!({"allowOut": [NAME], "denyOut": ["0.0.0.0/0"]}).to_string(),
        ),
        (
            "with a header transform (relayed per request)",
            serde_json::json!({
                "allowOut": [NAME],
                "denyOut": ["0.0.0.0/0"],
                "rules": {NAME: [{"transform": {"headers": {"X-Bench": "1"}}}]},
            })
            .to_string(),
        ),
    ] {
        eprintln!("{label} ...");
        let id = format!("egress{}", results.len());
        let created: pb::CreateSandboxResponse = agent
            .call::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
                template_id: "bench".into(),
                sandbox_id: id.clone(),
                allow_internet_access: true,
                egress_json: egress,
                ..Default::default()
            })
            .await?;
        let address = created
            .sandbox
            .context("the create's sandbox")?
            .envd_address;
        let envd = ConnectClient::new(
            format!("http://{address}"),
            HttpVersion::Http1,
            Codec::Proto,
        );
        let figures = measure(&envd, &args).await;
        agent.destroy(id).await?;
        results.push((label, figures?));
    }
    if args.guest.json {
        let rows: Vec<_> = results
            .iter()
            .map(|(label, figures)| serde_json::json!({"path": label, "figures": figures}))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "mib": args.mib, "results": rows })
        );
    } else {
        let mut shown = table(vec![
            "path",
            "download MiB/s (median)",
            "setup p50 ms",
            "setup p95 ms",
        ]);
        for (label, f) in &results {
            shown.add_row(vec![
                label.to_string(),
                format!("{:.1}", f.download_mib_s),
                format!("{:.2}", f.setup_ms_p50),
                format!("{:.2}", f.setup_ms_p95),
            ]);
        }
        println!(
            "{} MiB body, {} downloads and {} connections each\n{shown}",
            args.mib, args.downloads, args.connections
        );
    }
    Ok(())
}
