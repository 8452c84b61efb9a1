//! `wrenn-bench api`: the control plane's costs, with a host agent in the same process.
//! - create through the REST API (request to 201) against a create straight through the agent,
//!   alternating, from the same template; and the control plane's own share of each REST create
//!   (its `Server-Timing`: the handler's time minus the agent's);
//! - `GET /v2/sandboxes` pages over 10,000 sandboxes in the store, on SQLite and, when
//!   `--database-url` names one, on PostgreSQL;
//! - a 256 MiB download from a sandbox (envd's `/files`) through the edge proxy against a direct
//!   connection to the same guest.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use wrenn_agent::manager::CreateOptions;
use wrenn_agent::network::SlotConfig;
use wrenn_agent::{AgentConfig, Manager};
use wrenn_cp::ControlPlane;
use wrenn_cp::store::{ApiKey, SandboxRow, Store, Team};
use wrenn_vmm::accel::AccelSetting;

use super::report::{quantile, table};

#[derive(Debug, Args)]
pub struct ApiBenchArgs {
    /// Creates measured each way.
    #[arg(long, default_value_t = 20)]
    creates: usize,
    /// Sandboxes put in the store for the listing.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,
    /// Also measure the listing on this PostgreSQL database: an empty one (10,000 rows and a
    /// team are written to it).
    #[arg(long, env = "WRENN_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    #[arg(long, default_value = "auto")]
    accel: AccelSetting,
    #[arg(long)]
    json: bool,
}

fn p50_ms(samples: &mut [Duration]) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    quantile(&ms, 0.5)
}

/// One plain call, timed by the caller.
async fn request(
    address: SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> anyhow::Result<(u16, http::HeaderMap, bytes::Bytes)> {
    let mut request = http_client()
        .request(method, format!("http://{address}{path}"))
        .timeout(Duration::from_secs(600))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = wrenn_http::client::read_bounded(response, 64 << 20).await?;
    Ok((status, headers, body))
}

/// Creates a sandbox of the `base` template through the REST API at `api`, killed after
/// `timeout` seconds: its id, the response's headers and the time from request to response.
async fn create_through_api(
    api: SocketAddr,
    key: &str,
    timeout: u64,
) -> anyhow::Result<(String, http::HeaderMap, Duration)> {
    let started = Instant::now();
    let (status, headers, body) = request(
        api,
        http::Method::POST,
        "/v2/sandboxes",
        &[("x-api-key", key), ("content-type", "application/json")],
        // Unsecured: the downloads below go to envd without its access token (a token changes
        // nothing on the timed paths).
        json!({ "templateID": "base", "timeout": timeout, "secure": false }).to_string(),
    )
    .await?;
    let took = started.elapsed();
    Ok((created_sandbox_id(status, &body)?, headers, took))
}

/// The sandbox id of a `POST /v2/sandboxes` answer, which must be a 201.
pub(super) fn created_sandbox_id(status: u16, body: &[u8]) -> anyhow::Result<String> {
    anyhow::ensure!(
        status == 201,
        "create: HTTP {status}: {}",
        String::from_utf8_lossy(body)
    );
    Ok(
        serde_json::from_slice::<serde_json::Value>(body)?["sandboxID"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The benchmark's one HTTP client.
fn http_client() -> &'static wrenn_http::client::reqwest::Client {
    static CLIENT: std::sync::OnceLock<wrenn_http::client::reqwest::Client> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| wrenn_http::client::client(Default::default()))
}

/// The `agent` and `total` durations (ms) of a create's `Server-Timing` header.
fn server_timing(header: &str) -> Option<(f64, f64)> {
    let value = |name: &str| {
        header.split(',').find_map(|part| {
            let (metric, duration) = part.trim().split_once(";dur=")?;
            (metric == name).then(|| duration.parse::<f64>().ok())?
        })
    };
    Some((value("agent")?, value("total")?))
}

/// Times a streamed GET, counting the bytes without keeping them.
async fn download(
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut request = http_client().get(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.send().await?;
    anyhow::ensure!(
        response.status() == 200,
        "download: HTTP {}",
        response.status()
    );
    let mut bytes = 0u64;
    while let Some(data) = response.chunk().await? {
        bytes += data.len() as u64;
    }
    Ok((bytes, started.elapsed()))
}

async fn serve(router: axum::Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(wrenn_http::server::serve(
        listener,
        router,
        Arc::new(wrenn_http::server::ConnectionTracker::default()),
        wrenn_http::server::ServerTimeouts::default(),
        std::future::pending(),
    ));
    Ok(address)
}

async fn plane_over(
    store: Store,
    manager: Arc<Manager>,
) -> anyhow::Result<(Arc<ControlPlane>, String)> {
    let team = Team {
        id: "bench".into(),
        name: "bench".into(),
        created_at_ms: 0,
        admin: true,
    };
    store.create_team(team.clone()).await?;
    let (key, hash) = wrenn_cp::auth::new_key()?;
    store
        .add_key(
            ApiKey {
                id: "k".into(),
                team_id: team.id,
                name: "bench".into(),
                prefix: key[..10].into(),
                created_at_ms: 0,
                revoked: false,
                role: wrenn_cp::store::Role::Owner,
                mask_suffix: key[40..].into(),
            },
            hash,
        )
        .await?;
    let fleet = wrenn_cp::fleet::Fleet::load(
        &store,
        wrenn_cp::fleet::FleetConfig::default(),
        Box::new(wrenn_cp::fleet::LeastLoaded),
        Some(Arc::new(wrenn_agent::LocalAgent::new(manager))),
    )
    .await?;
    let (plane, _wake) = ControlPlane::new(store, fleet, None, false);
    Ok((Arc::new(plane), key))
}

/// p50 of the pages of a 10,000-row listing, following `X-Next-Token`.
async fn list_pages(
    store: Store,
    manager: Arc<Manager>,
    rows: usize,
) -> anyhow::Result<(f64, usize)> {
    let (plane, key) = plane_over(store.clone(), manager).await?;
    for index in 0..rows {
        store
            .put_sandbox(SandboxRow {
                id: format!("row{index:06}"),
                team_id: "bench".into(),
                template_id: "base".into(),
                alias: Some("base".into()),
                state: if index % 5 == 0 {
                    wrenn_cp::store::SandboxState::Paused
                } else {
                    wrenn_cp::store::SandboxState::Running
                },
                started_at_ms: 1_700_000_000_000 + index as i64,
                end_at_ms: i64::MAX / 2,
                metadata: [("n".to_string(), (index % 10).to_string())].into(),
                cpu_count: 1,
                memory_mb: 512,
                envd_version: "0.6.4".into(),
                host_id: wrenn_cp::fleet::EMBEDDED_HOST_ID.into(),
                ..SandboxRow::default()
            })
            .await?;
    }
    let address = serve(wrenn_cp::http::router(plane)).await?;
    let mut samples = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..20 {
        let path = match &token {
            Some(token) => format!("/v2/sandboxes?limit=100&nextToken={token}"),
            None => "/v2/sandboxes?limit=100".to_string(),
        };
        let started = Instant::now();
        let (status, headers, _) = request(
            address,
            http::Method::GET,
            &path,
            &[("x-api-key", &key)],
            String::new(),
        )
        .await?;
        samples.push(started.elapsed());
        anyhow::ensure!(status == 200, "listing: HTTP {status}");
        token = headers
            .get("x-next-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    Ok((p50_ms(&mut samples), rows))
}

pub async fn run(args: ApiBenchArgs) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let config = AgentConfig {
        data_dir: work.path().join("agent"),
        image_dir: wrenn_image::default_image_dir(),
        vmm: wrenn_vmm::VmmKind::Qemu,
        qemu_binary: "qemu-system-x86_64".into(),
        firecracker_binary: "firecracker".into(),
        accel: args.accel,
        slots: SlotConfig {
            prefix: "wbapi".into(),
            first_index: 1200,
            capacity: 16,
            mmds_port: 0,
            opened_ranges: Vec::new(),
            upstream_dns: None,
            egress_authorities: None,
        },
        slots_ahead: 2,
        host_nat: false,
        vmm_uid_base: wrenn_agent::manager::DEFAULT_VMM_UID_BASE,
        insecure_registries: Vec::new(),
        image_cache_bytes: wrenn_agent::oci::cache::DEFAULT_CACHE_BYTES,
        template_store: None,
        template_cache_bytes: 0,
        mapped_memory: true,
        warm_pool: 0,
        warm_pool_min_free_mib: 0,
        sample_interval: wrenn_agent::telemetry::DEFAULT_INTERVAL,
        metrics_token: None,
    };
    let mmds = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let config = AgentConfig {
        slots: SlotConfig {
            mmds_port: mmds.local_addr()?.port(),
            opened_ranges: Vec::new(),
            upstream_dns: None,
            egress_authorities: None,
            ..config.slots.clone()
        },
        ..config
    };
    let manager = Manager::start(config).await?;
    tokio::spawn(wrenn_http::server::serve(
        mmds,
        manager.mmds.router(),
        Arc::new(wrenn_http::server::ConnectionTracker::default()),
        wrenn_http::server::ServerTimeouts::default(),
        std::future::pending(),
    ));

    // Whatever happens (an error, Ctrl-C), the benchmark's VMs and slots go with it.
    let outcome = tokio::select! {
        outcome = measure(&args, work.path(), &manager) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    for record in manager.list() {
        let _ = manager.destroy(&record.sandbox_id).await;
    }
    manager.slots.delete_all().await;
    outcome
}

/// The measurements, over an agent `run` started and cleans up after.
async fn measure(args: &ApiBenchArgs, work: &Path, manager: &Arc<Manager>) -> anyhow::Result<()> {
    eprintln!("listing {} sandboxes on SQLite ...", args.rows);
    let sqlite = Store::open(&work.join("list.sqlite"))?;
    let (list_sqlite_ms, _) = list_pages(sqlite, manager.clone(), args.rows).await?;
    let list_postgres_ms = match &args.database_url {
        Some(url) => {
            eprintln!("listing {} sandboxes on PostgreSQL ...", args.rows);
            let store = Store::open_configured(Path::new("/nonexistent"), Some(url))
                .await
                .context("connecting to PostgreSQL")?;
            if store.team_by_id("bench").await?.is_some() {
                anyhow::bail!(
                    "the PostgreSQL database already holds an earlier run's rows: give the \
                     benchmark an empty database (e.g. `createdb wrenn_bench` and its URL)"
                );
            }
            Some(list_pages(store, manager.clone(), args.rows).await?.0)
        }
        None => None,
    };

    eprintln!("building the template ...");
    manager.build_template("base", None, 512, 1, None).await?;
    let (plane, key) = plane_over(Store::open(&work.join("api.sqlite"))?, manager.clone()).await?;
    let api = serve(wrenn_cp::http::router(plane.clone())).await?;
    let proxy = serve(wrenn_cp::proxy::router(plane.clone())).await?;

    eprintln!("creates through the REST API and straight through the agent, alternating ...");
    let (mut through_api, mut through_agent) = (Vec::new(), Vec::new());
    let mut own_time = Vec::new();
    for run in 0..args.creates {
        // Which goes first alternates, so neither always follows the other's clean-up.
        for api_first in [run % 2 == 0, run % 2 == 1] {
            if api_first {
                let (id, headers, took) = create_through_api(api, &key, 300).await?;
                through_api.push(took);
                if let Some((agent, total)) = headers
                    .get("server-timing")
                    .and_then(|v| v.to_str().ok())
                    .and_then(server_timing)
                {
                    own_time.push(Duration::from_secs_f64((total - agent).max(0.0) / 1000.0));
                }
                plane
                    .kill_by_id(&id)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            } else {
                let started = Instant::now();
                manager
                    .create(CreateOptions {
                        template_id: "base".into(),
                        sandbox_id: Some(format!("direct{run}")),
                        ..Default::default()
                    })
                    .await?;
                through_agent.push(started.elapsed());
                manager.destroy(&format!("direct{run}")).await?;
            }
        }
    }

    eprintln!("256 MiB download, through the proxy and direct ...");
    let (id, _, _) = create_through_api(api, &key, 600).await?;
    let record = manager.get(&id)?;
    let guest = SocketAddr::new(
        wrenn_agent::network::Slot::address_of(record.slot.context("no slot")?).into(),
        wrenn_proto::ENVD_PORT,
    );
    // A 256 MiB file, uploaded once through envd's /files, then read both ways.
    let (status, _, _) = request(
        guest,
        http::Method::POST,
        "/files?path=/tmp/big&username=root",
        &[("content-type", "application/octet-stream")],
        String::from_utf8(vec![b'x'; 256 << 20]).unwrap_or_default(),
    )
    .await?;
    anyhow::ensure!(status == 200, "upload: HTTP {status}");
    let path = "/files?path=/tmp/big&username=root";
    let mut direct = Vec::new();
    let mut proxied = Vec::new();
    for _ in 0..3 {
        let (bytes, elapsed) = download(guest, path, &[]).await?;
        direct.push(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64());
        let (bytes, elapsed) = download(
            proxy,
            path,
            &[
                ("e2b-sandbox-id", &id),
                ("e2b-sandbox-port", &wrenn_proto::ENVD_PORT.to_string()),
            ],
        )
        .await?;
        proxied.push(bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64());
    }
    plane
        .kill_by_id(&id)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    direct.sort_by(f64::total_cmp);
    proxied.sort_by(f64::total_cmp);

    let own_p50 = p50_ms(&mut own_time);
    let api_p50 = p50_ms(&mut through_api);
    let agent_p50 = p50_ms(&mut through_agent);
    let (direct_mib_s, proxied_mib_s) = (quantile(&direct, 0.5), quantile(&proxied, 0.5));
    if args.json {
        println!(
            "{}",
            json!({
                "accel": manager.accel().as_str(),
                "create_rest_p50_ms": api_p50, "create_agent_p50_ms": agent_p50,
                "control_plane_adds_p50_ms": api_p50 - agent_p50,
                "control_plane_own_time_p50_ms": own_p50,
                "list_page_p50_ms_sqlite": list_sqlite_ms, "list_page_p50_ms_postgres": list_postgres_ms,
                "rows": args.rows,
                "download_direct_mib_s": direct_mib_s, "download_proxied_mib_s": proxied_mib_s,
            })
        );
    } else {
        let mut table = table(["measure", "result"]);
        table.add_row([
            "create through the REST API, p50".to_string(),
            format!("{api_p50:.0} ms"),
        ]);
        table.add_row([
            "create straight through the agent, p50".to_string(),
            format!("{agent_p50:.0} ms"),
        ]);
        table.add_row([
            "the control plane adds, p50".to_string(),
            format!("{:+.1} ms", api_p50 - agent_p50),
        ]);
        table.add_row([
            "the control plane's own time per create (handler minus agent), p50".to_string(),
            format!("{own_p50:.2} ms"),
        ]);
        table.add_row([
            format!(
                "GET /v2/sandboxes page of 100, {} rows, SQLite, p50",
                args.rows
            ),
            format!("{list_sqlite_ms:.1} ms"),
        ]);
        if let Some(ms) = list_postgres_ms {
            table.add_row([
                format!(
                    "GET /v2/sandboxes page of 100, {} rows, PostgreSQL, p50",
                    args.rows
                ),
                format!("{ms:.1} ms"),
            ]);
        }
        table.add_row([
            "256 MiB download, direct to the guest, median".to_string(),
            format!("{direct_mib_s:.0} MiB/s"),
        ]);
        table.add_row([
            "256 MiB download, through the proxy, median".to_string(),
            format!("{proxied_mib_s:.0} MiB/s"),
        ]);
        println!("accel {}", manager.accel().as_str());
        println!("{table}");
    }
    Ok(())
}
