//! `wrenn up`: the whole of wrenn on this machine with its embedded defaults. It builds the base
//! image and template when they are missing (with progress), starts a host agent in-process and
//! the control plane on SQLite, creates a first team and API key, serves the E2B REST API and
//! the edge proxy, and prints how to point the `e2b` SDK at them. `--demo` also runs a sandbox.
//! `wrenn key …` manages API keys in the same store. The store is SQLite in the data directory,
//! or PostgreSQL when `DATABASE_URL` names one.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_agent::network::SlotConfig;
use wrenn_agent::{AgentConfig, Manager};
use wrenn_cp::store::{ApiKey, Store, Team};
use wrenn_cp::{ControlPlane, auth};
use wrenn_vmm::accel::AccelSetting;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where wrenn keeps its state: the store, the agent's templates and sandboxes.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    /// The E2B REST API.
    #[arg(long, default_value = "127.0.0.1:3000")]
    api_listen: SocketAddr,
    /// The edge proxy to sandbox ports (and envd).
    #[arg(long, default_value = "127.0.0.1:3001")]
    proxy_listen: SocketAddr,
    /// The domain sandboxes are reached under (`<port>-<id>.<domain>`), if one points here.
    #[arg(long)]
    domain: Option<String>,
    #[arg(long, env = "WRENN_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// The static envd to build the image with, if it must be built.
    #[arg(long, env = "WRENN_ENVD_BIN")]
    envd: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    accel: AccelSetting,
    /// Guest memory of the base template.
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    /// Keep sandboxes off the internet.
    #[arg(long)]
    no_internet: bool,
    #[arg(long, default_value = "wrenn")]
    slot_prefix: String,
    #[arg(long, default_value_t = 1)]
    first_slot: u32,
    #[arg(long, default_value_t = 256)]
    slots: u32,
    #[arg(long, default_value_t = 49991)]
    mmds_port: u16,
    /// Destroy every sandbox and network slot on exit (by default they outlive a restart).
    #[arg(long)]
    stop_sandboxes_on_exit: bool,
    /// Also create a sandbox, run Python in it, print the output and kill it.
    #[arg(long)]
    demo: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a team (created if new); the key is shown once.
    Create {
        #[arg(long, default_value = "default")]
        team: String,
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List a team's keys (never the keys themselves).
    List {
        #[arg(long, default_value = "default")]
        team: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id.
    Revoke {
        id: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
        data_dir: PathBuf,
    },
}

fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cp/wrenn.sqlite")
}

/// The store: PostgreSQL when `DATABASE_URL` names one, else SQLite in the data directory.
async fn open_store(data_dir: &Path) -> anyhow::Result<Store> {
    let url = std::env::var("DATABASE_URL").ok();
    let store = Store::open_configured(&store_path(data_dir), url.as_deref())
        .await
        .context("opening the store")?;
    Ok(store)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The team of this name, created if missing.
async fn team(store: &Store, name: &str) -> anyhow::Result<Team> {
    if let Some(team) = store.team_by_name(name).await? {
        return Ok(team);
    }
    let team = Team {
        id: auth::random_id(16),
        name: name.to_string(),
        created_at_ms: now_ms(),
    };
    store.create_team(team.clone()).await?;
    Ok(team)
}

async fn create_key(store: &Store, team: &Team, name: &str) -> anyhow::Result<(String, ApiKey)> {
    let (key, hash) = auth::new_key();
    let record = ApiKey {
        id: auth::random_id(12),
        team_id: team.id.clone(),
        name: name.to_string(),
        prefix: key[..10].to_string(),
        created_at_ms: now_ms(),
        revoked: false,
    };
    store.add_key(record.clone(), hash).await?;
    Ok((key, record))
}

pub async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            team: name,
            name: key_name,
            data_dir,
            json,
        } => {
            let store = open_store(&data_dir).await?;
            let team = team(&store, &name).await?;
            let (key, record) = create_key(&store, &team, &key_name).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "id": record.id, "team": team.name, "key": key })
                );
            } else {
                println!(
                    "{key}\n(key {} of team {}: shown once, keep it)",
                    record.id, team.name
                );
            }
        }
        KeyCommand::List {
            team: name,
            data_dir,
            json,
        } => {
            let store = open_store(&data_dir).await?;
            let team = store
                .team_by_name(&name)
                .await?
                .with_context(|| format!("no team {name}"))?;
            let keys = store.list_keys(&team.id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
                table.set_header(["id", "name", "key starts", "created", "revoked"]);
                for key in keys {
                    table.add_row([
                        key.id,
                        key.name,
                        format!("{}…", key.prefix),
                        chrono::DateTime::from_timestamp_millis(key.created_at_ms)
                            .unwrap_or_default()
                            .to_rfc3339(),
                        key.revoked.to_string(),
                    ]);
                }
                println!("{table}");
            }
        }
        KeyCommand::Revoke { id, data_dir } => {
            let store = open_store(&data_dir).await?;
            anyhow::ensure!(store.revoke_key(&id, now_ms()).await?, "no active key {id}");
            println!("revoked {id}");
        }
    }
    Ok(())
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let image_dir = args
        .image_dir
        .clone()
        .unwrap_or_else(wrenn_image::default_image_dir);
    if wrenn_image::Manifest::read(&image_dir).is_err() {
        eprintln!(
            "wrenn up: no base image in {}: building it (a few minutes the first time)",
            image_dir.display()
        );
        let envd = match &args.envd {
            Some(path) => path.clone(),
            None => crate::image::find_static_envd()?,
        };
        let options = wrenn_image::BuildOptions {
            image_dir: image_dir.clone(),
            cache_dir: wrenn_image::default_cache_dir(),
            envd_binary: envd,
            expected_envd_version: wrenn_envd::ENVD_VERSION.to_string(),
            mirror: wrenn_image::DEFAULT_MIRROR.to_string(),
            headroom_mib: 1024,
            force: false,
        };
        tokio::task::spawn_blocking(move || {
            wrenn_image::build(&options, &mut wrenn_image::progress::Progress::stderr())
        })
        .await??;
    }
    let config = AgentConfig {
        data_dir: args.data_dir.join("agent"),
        image_dir,
        qemu_binary: "qemu-system-x86_64".into(),
        accel: args.accel,
        slots: SlotConfig {
            prefix: args.slot_prefix.clone(),
            first_index: args.first_slot,
            capacity: args.slots,
            mmds_port: args.mmds_port,
        },
        slots_ahead: 2,
        host_nat: !args.no_internet,
    };
    let manager = Manager::start(config)
        .await
        .context("starting the host agent")?;
    let mmds = tokio::net::TcpListener::bind(wrenn_agent::mmds_bind_address(args.mmds_port))
        .await
        .with_context(|| format!("listening for metadata requests on port {}", args.mmds_port))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let timeouts = wrenn_envd::server::ServerTimeouts::default();
    let serve = |listener: tokio::net::TcpListener, router: axum::Router| {
        let mut stop = stop_rx.clone();
        tokio::spawn(wrenn_envd::server::serve(
            listener,
            router,
            Arc::new(wrenn_envd::server::ConnectionTracker::default()),
            timeouts.clone(),
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
        ))
    };
    let mmds_server = serve(mmds, manager.mmds.router());
    if !manager
        .list_templates()
        .iter()
        .any(|t| t.template_id == "base")
    {
        eprintln!(
            "wrenn up: building the template `base` (boots the image once; about 20 s under software emulation) ..."
        );
        let template = manager
            .build_template("base", None, args.memory_mib, 1, None)
            .await?;
        eprintln!(
            "wrenn up: template `base` ready in {:.1} s",
            template.build_ms as f64 / 1000.0
        );
    }

    let store = open_store(&args.data_dir).await?;
    let key_file = args.data_dir.join("cp/initial-api-key");
    let first_key = if store.team_by_name("default").await?.is_none() {
        let team = team(&store, "default").await?;
        let (key, _) = create_key(&store, &team, "initial").await?;
        if let Some(dir) = key_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key_file)?;
        std::io::Write::write_all(&mut file, key.as_bytes())?;
        Some(key)
    } else {
        std::fs::read_to_string(&key_file).ok()
    };
    let disk_size_mb = manager
        .list_templates()
        .iter()
        .find(|t| t.template_id == "base")
        .and_then(|t| std::fs::metadata(t.machine.disk.with_file_name("rootfs.ext4")).ok())
        .map(|m| m.len() >> 20)
        .unwrap_or(0);
    let plane = Arc::new(ControlPlane {
        store,
        manager: manager.clone(),
        domain: args.domain.clone(),
        internet: !args.no_internet,
        disk_size_mb,
        idempotency: Default::default(),
    });
    reconcile(&plane).await;
    tokio::spawn(plane.clone().run_lifecycle());

    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("listening on {}", args.api_listen))?;
    let proxy = tokio::net::TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("listening on {}", args.proxy_listen))?;
    let api_address = api.local_addr()?;
    let proxy_address = proxy.local_addr()?;
    let api_server = serve(api, wrenn_cp::api::router(plane.clone()));
    let proxy_server = serve(proxy, wrenn_cp::proxy::router(plane.clone()));

    println!(
        "wrenn is up ({} guests, data in {})",
        manager.accel().as_str(),
        args.data_dir.display()
    );
    println!("  E2B_API_URL=http://{api_address}");
    println!("  E2B_SANDBOX_URL=http://{proxy_address}");
    match &first_key {
        Some(key) => println!("  E2B_API_KEY={key}    (also in {})", key_file.display()),
        None => println!("  E2B_API_KEY=<a key of yours: `wrenn key create`>"),
    }
    println!(
        "Then: python3 -c 'from e2b import Sandbox; print(Sandbox.create().commands.run(\"echo hi\").stdout)'"
    );

    if args.demo {
        let key = first_key
            .clone()
            .context("--demo needs the initial key file")?;
        demo(&api_address, &proxy_address, &key).await?;
    }

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(api_server, proxy_server, mmds_server);
    if args.stop_sandboxes_on_exit {
        for record in manager.list() {
            let _ = plane.kill(&record.sandbox_id).await;
        }
        manager.slots.delete_all().await;
    } else {
        manager.shutdown().await;
    }
    Ok(())
}

/// Store and agent agree: store rows whose VM is gone go, failed VMs are killed.
async fn reconcile(plane: &ControlPlane) {
    let Ok(rows) = plane.store.all_sandboxes().await else {
        return;
    };
    for row in rows {
        let state = plane.manager.get(&row.id).map(|record| record.state);
        match state {
            Ok(wrenn_agent::store::SandboxState::Running)
            | Ok(wrenn_agent::store::SandboxState::Paused) => {}
            _ => {
                tracing::warn!(sandbox = %row.id, "the sandbox's VM is gone: removing it");
                let _ = plane.kill(&row.id).await;
            }
        }
    }
}

async fn demo(api: &SocketAddr, proxy: &SocketAddr, key: &str) -> anyhow::Result<()> {
    use wrenn_connect::Codec;
    use wrenn_connect::client::{ConnectClient, HttpVersion};
    use wrenn_proto::process as pb;
    let client = api_post(
        api,
        key,
        "/sandboxes",
        r#"{"templateID":"base","timeout":120}"#,
    )
    .await?;
    let created: serde_json::Value = serde_json::from_str(&client)?;
    let id = created["sandboxID"]
        .as_str()
        .context("no sandboxID")?
        .to_string();
    println!("demo: created sandbox {id}");
    let envd = ConnectClient::new(format!("http://{proxy}"), HttpVersion::Http1, Codec::Json)
        .with_header("e2b-sandbox-id", &id)
        .with_header("e2b-sandbox-port", "49983");
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "python3".into(),
            args: vec!["-c".into(), "print(sum(range(10)))".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", "Basic dXNlcjo=".parse()?);
    let mut stream = envd
        .server_stream::<_, pb::StartResponse>("/process.Process/Start", &request, &headers)
        .await?;
    let mut output = String::new();
    while let Some(message) = stream.message().await {
        if let Some(pb::process_event::Event::Data(data)) =
            message?.event.and_then(|event| event.event)
            && let Some(pb::process_event::data_event::Output::Stdout(bytes)) = data.output
        {
            output.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    println!(
        "demo: python3 -c \"print(sum(range(10)))\" printed {}",
        output.trim()
    );
    api_delete(api, key, &format!("/sandboxes/{id}")).await?;
    println!("demo: killed {id}");
    Ok(())
}

async fn http_call(
    api: &SocketAddr,
    key: &str,
    method: http::Method,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(api).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", api.to_string())
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn api_post(api: &SocketAddr, key: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let (status, text) = http_call(api, key, http::Method::POST, path, body).await?;
    anyhow::ensure!(status == 201, "POST {path}: HTTP {status}: {text}");
    Ok(text)
}

async fn api_delete(api: &SocketAddr, key: &str, path: &str) -> anyhow::Result<()> {
    let (status, text) = http_call(api, key, http::Method::DELETE, path, "").await?;
    anyhow::ensure!(status == 204, "DELETE {path}: HTTP {status}: {text}");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
