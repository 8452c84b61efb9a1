//! `wrenn up`: the whole of wrenn on this machine with its embedded defaults. It builds the base
//! image and template when they are missing (with progress), starts a host agent in-process and
//! the control plane on SQLite, creates a first team and API key, serves the E2B REST API and
//! the edge proxy, and prints how to point the `e2b` SDK at them. `--demo` also runs a sandbox.
//! `wrenn server` is the control plane alone, for a fleet of `wrenn agent serve --join` hosts
//! (`wrenn up` takes such agents too). `wrenn key …` manages API keys in the same store. The
//! store is SQLite in the data directory, or PostgreSQL when `DATABASE_URL` names one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_agent::{AgentConfig, Manager};
use wrenn_cp::store::{ApiKey, Store, Team};
use wrenn_cp::{ControlPlane, auth};

/// The control plane's settings, shared by `wrenn up` and `wrenn server`.
#[derive(Debug, Args, Clone)]
pub struct PlaneArgs {
    /// Where wrenn keeps its state: the store, the agent's templates and sandboxes.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
    data_dir: PathBuf,
    /// The E2B REST API (agents join here too).
    #[arg(long, default_value = "127.0.0.1:3000")]
    api_listen: SocketAddr,
    /// The edge proxy to sandbox ports (and envd).
    #[arg(long, default_value = "127.0.0.1:3001")]
    proxy_listen: SocketAddr,
    /// The domain the API (`api.<domain>`) and sandboxes (`<port>-<id>.<domain>`) are reached
    /// under over HTTPS, as the SDKs do with `E2B_DOMAIN` [default for `wrenn up`:
    /// wrenn.localhost, which names this machine; for `wrenn server`: none, no HTTPS].
    #[arg(long)]
    domain: Option<String>,
    /// Where HTTPS is served under the domain (repeat for more) [default: 127.0.0.1:443 and
    /// [::1]:443 for `wrenn up`, 0.0.0.0:443 for `wrenn server`]. On another port than 443 the
    /// SDKs are given `<domain>:<port>`.
    #[arg(long = "https-listen", value_name = "ADDRESS")]
    https_listen: Vec<SocketAddr>,
    /// No HTTPS front (the API and the proxy stay on their plain HTTP ports).
    #[arg(long, conflicts_with_all = ["https_listen", "tls_cert"])]
    no_https: bool,
    /// The certificate chain (PEM) to serve under the domain [default: one signed by a local
    /// certificate authority in <data>/tls, made once].
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep sandboxes off the internet.
    #[arg(long)]
    no_internet: bool,
    /// The token host agents join with [default: one generated into <data>/cp/join-token].
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long, env = "WRENN_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// A file holding the PostgreSQL URL (instead of `DATABASE_URL`, when it carries a password).
    #[arg(long, env = "DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// Where new sandboxes go: least-loaded or binpack.
    #[arg(long, default_value = "least-loaded")]
    placement: String,
    /// How often agents heartbeat, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    heartbeat_interval_ms: u64,
    /// A host silent this long (milliseconds) is down and its sandboxes lost.
    #[arg(long, default_value_t = 10_000)]
    down_after_ms: u64,
    /// How often every host's sandboxes are compared with the store, in seconds.
    #[arg(long, default_value_t = 30)]
    reconcile_interval_secs: u64,
    /// A sandbox a host runs that the store does not know is destroyed once this old (seconds).
    #[arg(long, default_value_t = 60)]
    orphan_grace_secs: u64,
    /// Running sandboxes a team may have (0: no limit).
    #[arg(long, default_value_t = 20)]
    quota_running: u32,
    /// Paused sandboxes a team may have (0: no limit).
    #[arg(long, default_value_t = 50)]
    quota_paused: u32,
    /// Disk a team's sandboxes may hold, in GiB (estimated: each its template's disk size, a
    /// paused one also its memory; 0: no limit).
    #[arg(long, default_value_t = 100)]
    quota_disk_gib: u64,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    plane: PlaneArgs,
    #[arg(long, env = "WRENN_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// The static envd to build the image with, if it must be built.
    #[arg(long, env = "WRENN_ENVD_BIN")]
    envd: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) host: crate::flags::HostFlags,
    /// Guest memory of the base template.
    #[arg(long, default_value_t = 512)]
    memory_mib: u32,
    /// Destroy every sandbox and network slot on exit (by default they outlive a restart).
    #[arg(long)]
    stop_sandboxes_on_exit: bool,
    /// Also create a sandbox, run Python in it, print the output and kill it.
    #[arg(long)]
    demo: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    plane: PlaneArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a team (created if new); the key is shown once.
    Create {
        #[arg(long, default_value = "default")]
        team: String,
        #[arg(long, default_value = "cli")]
        name: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List a team's keys (never the keys themselves).
    List {
        #[arg(long, default_value = "default")]
        team: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id.
    Revoke {
        id: String,
        #[arg(long, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
        data_dir: PathBuf,
    },
}

fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cp/wrenn.sqlite")
}

/// The store: PostgreSQL when `DATABASE_URL` (or the file `url_file`, else
/// `$DATABASE_URL_FILE`) names one, else SQLite in the data directory.
async fn open_store(data_dir: &Path, url_file: Option<&Path>) -> anyhow::Result<Store> {
    let env_file = std::env::var_os("DATABASE_URL_FILE").map(PathBuf::from);
    let url = crate::secrets::resolve(
        "--database-url",
        std::env::var("DATABASE_URL").ok(),
        url_file.or(env_file.as_deref()),
    )?;
    let store = Store::open_configured(&store_path(data_dir), url.as_deref())
        .await
        .context("opening the store")?;
    Ok(store)
}

use wrenn_core::now_ms;

/// The team of this name, created if missing.
async fn team(store: &Store, name: &str) -> anyhow::Result<Team> {
    if let Some(team) = store.team_by_name(name).await? {
        return Ok(team);
    }
    let team = Team {
        id: auth::random_id(16)?,
        name: name.to_string(),
        created_at_ms: now_ms(),
        // The first team, made by `wrenn up` or `wrenn server`, runs the place.
        admin: name == "default",
    };
    store.create_team(team.clone()).await?;
    Ok(team)
}

async fn create_key(store: &Store, team: &Team, name: &str) -> anyhow::Result<(String, ApiKey)> {
    let (key, hash) = auth::new_key()?;
    let record = ApiKey {
        id: auth::random_id(12)?,
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
            let store = open_store(&data_dir, None).await?;
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
            let store = open_store(&data_dir, None).await?;
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
            let store = open_store(&data_dir, None).await?;
            anyhow::ensure!(store.revoke_key(&id, now_ms()).await?, "no active key {id}");
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// A control plane serving its API and proxy.
struct Running {
    plane: Arc<ControlPlane>,
    api_address: SocketAddr,
    proxy_address: SocketAddr,
    first_key: Option<String>,
    key_file: PathBuf,
    join_token_file: Option<PathBuf>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    https: Option<Https>,
}

/// The HTTPS front, when it runs.
struct Https {
    /// What the SDKs are given as the domain (with `:port` off 443).
    domain: String,
    addresses: Vec<SocketAddr>,
    /// The local authority that signed its certificate (none with --tls-cert).
    authority: Option<wrenn_cp::tls::LocalAuthority>,
}

/// Starts the HTTPS front when `args` (and `local`, for `wrenn up`'s defaults) ask for it:
/// binds its listeners and makes its certificate.
async fn start_https(
    args: &PlaneArgs,
    local: bool,
) -> anyhow::Result<
    Option<(
        Https,
        Vec<tokio::net::TcpListener>,
        Arc<rustls::ServerConfig>,
    )>,
> {
    if args.no_https {
        return Ok(None);
    }
    let domain = match (&args.domain, local) {
        (Some(domain), _) => domain.clone(),
        (None, true) => "wrenn.localhost".to_string(),
        (None, false) => return Ok(None),
    };
    let host = wrenn_cp::tls::domain_host(&domain)?.to_string();
    let (addresses, best_effort): (Vec<SocketAddr>, Vec<SocketAddr>) =
        if !args.https_listen.is_empty() {
            (args.https_listen.clone(), Vec::new())
        } else if local {
            (vec!["127.0.0.1:443".parse()?], vec!["[::1]:443".parse()?])
        } else {
            (vec!["0.0.0.0:443".parse()?], Vec::new())
        };
    let mut listeners = Vec::new();
    for address in &addresses {
        let listener = tokio::net::TcpListener::bind(address).await.with_context(|| {
            format!(
                "serving HTTPS for {domain} on {address} (choose another with --https-listen, or none with --no-https)"
            )
        })?;
        listeners.push(listener);
    }
    for address in &best_effort {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => listeners.push(listener),
            Err(error) => tracing::info!(%address, %error, "no HTTPS on this address"),
        }
    }
    let bound: Vec<SocketAddr> = listeners
        .iter()
        .map(|listener| listener.local_addr())
        .collect::<Result<_, _>>()?;
    let (cert, key, authority) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), None),
        _ => {
            let authority = wrenn_cp::tls::local_authority(&args.data_dir.join("tls"), &host)?;
            (
                authority.server_cert.clone(),
                authority.server_key.clone(),
                Some(authority),
            )
        }
    };
    let config = wrenn_cp::tls::server_config(&cert, &key)?;
    let port = bound[0].port();
    let advertised = if domain.contains(':') || port == 443 {
        domain.clone()
    } else {
        format!("{domain}:{port}")
    };
    Ok(Some((
        Https {
            domain: advertised,
            addresses: bound,
            authority,
        },
        listeners,
        config,
    )))
}

type ServeFn<'a> =
    dyn Fn(tokio::net::TcpListener, axum::Router) -> tokio::task::JoinHandle<()> + 'a;

/// The join token: given, or read from (created in) `<data>/cp/join-token`.
fn join_token(args: &PlaneArgs) -> anyhow::Result<(String, Option<PathBuf>)> {
    if let Some(token) = crate::secrets::resolve(
        "--join-token",
        args.join_token.clone(),
        args.join_token_file.as_deref(),
    )? {
        return Ok((token, args.join_token_file.clone()));
    }
    let file = args.data_dir.join("cp/join-token");
    if let Ok(token) = std::fs::read_to_string(&file)
        && !token.trim().is_empty()
    {
        return Ok((token.trim().to_string(), Some(file)));
    }
    let token = auth::random_token()?;
    write_secret(&file, &token)?;
    Ok((token, Some(file)))
}

/// The control plane's directory (`<data>/cp`: the SQLite store, the first API key, the join
/// token) 0700 and every file in it 0600: created so, and tightened if an older wrenn or an
/// operator left them readable.
fn secure_plane_files(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    wrenn_cp::store::private_dir(dir).with_context(|| format!("securing {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("securing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Writes a secret file (0600, in a 0700 directory) atomically.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().context("a secret file needs a directory")?;
    wrenn_cp::store::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    wrenn_cp::store::write_file_atomically(path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

async fn start_plane(
    args: &PlaneArgs,
    embedded: Option<Arc<dyn wrenn_agent_api::HostAgent>>,
    serve: &ServeFn<'_>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    secure_plane_files(&args.data_dir.join("cp"))?;
    let https = start_https(args, embedded.is_some()).await?;
    let store = open_store(&args.data_dir, args.database_url_file.as_deref()).await?;
    let key_file = args.data_dir.join("cp/initial-api-key");
    let first_key = if store.team_by_name("default").await?.is_none() {
        let team = team(&store, "default").await?;
        let (key, _) = create_key(&store, &team, "initial").await?;
        write_secret(&key_file, &key)?;
        Some(key)
    } else {
        std::fs::read_to_string(&key_file).ok()
    };
    let (token, join_token_file) = join_token(args)?;
    let config = wrenn_cp::fleet::FleetConfig {
        join_token: Some(token),
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms.max(100)),
        down_after: Duration::from_millis(args.down_after_ms.max(300)),
        reconcile_interval: Duration::from_secs(args.reconcile_interval_secs.max(1)),
        orphan_grace: Duration::from_secs(args.orphan_grace_secs),
    };
    let placement = wrenn_cp::fleet::placement(&args.placement).map_err(anyhow::Error::msg)?;
    let fleet = wrenn_cp::fleet::Fleet::load(&store, config, placement, embedded)
        .await
        .context("loading the fleet")?;
    let domain = match &https {
        Some((https, _, _)) => Some(https.domain.clone()),
        None => args.domain.clone(),
    };
    let (plane, wake) = ControlPlane::new(store, fleet, domain, !args.no_internet);
    let plane = Arc::new(plane.with_quotas(wrenn_cp::quota::Quotas {
        running: args.quota_running,
        paused: args.quota_paused,
        disk_mib: args.quota_disk_gib.saturating_mul(1024),
    }));
    tokio::spawn(plane.clone().run_lifecycle());
    tokio::spawn(plane.clone().run_fleet(wake));

    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("listening on {}", args.api_listen))?;
    let proxy = tokio::net::TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("listening on {}", args.proxy_listen))?;
    let api_address = api.local_addr()?;
    let proxy_address = proxy.local_addr()?;
    let mut servers = vec![
        serve(api, wrenn_cp::api::router(plane.clone())),
        serve(proxy, wrenn_cp::proxy::router(plane.clone())),
    ];
    let https = match https {
        Some((https, listeners, config)) => {
            let host = wrenn_cp::tls::domain_host(&https.domain)?;
            let front = wrenn_cp::tls::front_router(
                host,
                wrenn_cp::api::router(plane.clone()),
                wrenn_cp::proxy::router(plane.clone()),
            );
            for listener in listeners {
                servers.push(wrenn_cp::tls::spawn_tls_until_stopped(
                    listener,
                    config.clone(),
                    front.clone(),
                    wrenn_http::server::ServerTimeouts::default(),
                    stop.clone(),
                ));
            }
            Some(https)
        }
        None => None,
    };
    Ok(Running {
        plane,
        api_address,
        proxy_address,
        first_key,
        key_file,
        join_token_file,
        servers,
        https,
    })
}

fn print_endpoints(running: &Running) {
    match &running.first_key {
        Some(key) => println!(
            "  E2B_API_KEY={key}    (also in {})",
            running.key_file.display()
        ),
        None => println!("  E2B_API_KEY=<a key of yours: `wrenn key create`>"),
    }
    if let Some(https) = &running.https {
        let listening: Vec<String> = https.addresses.iter().map(|a| a.to_string()).collect();
        println!(
            "  E2B_DOMAIN={}    (HTTPS on {}: https://api.{0} and https://<port>-<sandbox id>.{0}, as on E2B)",
            https.domain,
            listening.join(", ")
        );
        if let Some(authority) = &https.authority {
            println!(
                "  SSL_CERT_FILE={} NODE_EXTRA_CA_CERTS={}    (trust wrenn's local certificate authority)",
                authority.bundle.display(),
                authority.ca_cert.display()
            );
            println!(
                "  or trust it system-wide: cp {} /usr/local/share/ca-certificates/wrenn-local-ca.crt && update-ca-certificates",
                authority.ca_cert.display()
            );
        }
        println!("Or without HTTPS (signed file URLs and get_host() need the domain):");
    }
    println!("  E2B_API_URL=http://{}", running.api_address);
    println!("  E2B_SANDBOX_URL=http://{}", running.proxy_address);
    println!(
        "Then: python3 -c 'from e2b import Sandbox; print(Sandbox.create().commands.run(\"echo hi\").stdout)'"
    );
    println!(
        "CLI:  WRENN_API_URL=http://{} WRENN_SANDBOX_URL=http://{} WRENN_API_KEY=… wrenn sandbox list",
        running.api_address, running.proxy_address
    );
    let token = match &running.join_token_file {
        Some(file) => format!("--join-token-file <a copy of {}>", file.display()),
        None => "--join-token <the --join-token>".to_string(),
    };
    println!(
        "Hosts join with: wrenn agent serve --join http://{} {token} --token-file <agent token file>",
        running.api_address
    );
}

fn server_spawner(
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> impl Fn(tokio::net::TcpListener, axum::Router) -> tokio::task::JoinHandle<()> {
    let timeouts = wrenn_http::server::ServerTimeouts::default();
    move |listener: tokio::net::TcpListener, router: axum::Router| {
        wrenn_http::server::spawn_until_stopped(listener, router, timeouts.clone(), stop_rx.clone())
    }
}

/// `wrenn server`: the control plane alone; hosts join it.
pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = server_spawner(stop_rx.clone());
    let running = start_plane(&args.plane, None, &serve, &stop_rx).await?;
    println!(
        "wrenn server is up ({} hosts known, data in {})",
        running.plane.fleet.hosts().len(),
        args.plane.data_dir.display()
    );
    print_endpoints(&running);
    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    for server in running.servers {
        let _ = server.await;
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
        data_dir: args.plane.data_dir.join("agent"),
        image_dir,
        qemu_binary: "qemu-system-x86_64".into(),
        accel: args.host.accel,
        slots: args.host.slot_config(),
        slots_ahead: 2,
        host_nat: !args.plane.no_internet,
        vmm_uid_base: args.host.vmm_uid_base,
    };
    let manager = Manager::start(config)
        .await
        .context("starting the host agent")?;
    let mmds_port = args.host.mmds_port;
    let mmds = tokio::net::TcpListener::bind(wrenn_agent::mmds_bind_address(mmds_port))
        .await
        .with_context(|| format!("listening for metadata requests on port {mmds_port}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = server_spawner(stop_rx.clone());
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

    let running = start_plane(
        &args.plane,
        Some(Arc::new(wrenn_agent::LocalAgent::new(manager.clone()))),
        &serve,
        &stop_rx,
    )
    .await?;
    println!(
        "wrenn is up ({} guests, data in {})",
        manager.accel().as_str(),
        args.plane.data_dir.display()
    );
    print_endpoints(&running);

    if args.demo {
        let key = running
            .first_key
            .clone()
            .context("--demo needs the initial key file")?;
        demo(&running.api_address, &running.proxy_address, &key).await?;
    }

    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    for server in running.servers {
        let _ = server.await;
    }
    let _ = mmds_server.await;
    if args.stop_sandboxes_on_exit {
        let plane = &running.plane;
        for row in plane
            .store
            .sandboxes_on_host(wrenn_cp::fleet::EMBEDDED_HOST_ID)
            .await
            .unwrap_or_default()
        {
            let _ = plane.kill(&row).await;
        }
        for record in manager.list() {
            let _ = manager.destroy(&record.sandbox_id).await;
        }
        manager.slots.delete_all().await;
    } else {
        manager.shutdown().await;
    }
    Ok(())
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
        .with_header("e2b-sandbox-port", &wrenn_proto::ENVD_PORT.to_string());
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
        .call_streaming::<wrenn_proto::process::process::Start>(&request, &headers)
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
    let response = wrenn_connect::plain::call(
        method,
        &format!("http://{api}{path}"),
        &[("x-api-key", key), ("content-type", "application/json")],
        body.to_string(),
        Duration::from_secs(120),
    )
    .await?;
    Ok((response.status.as_u16(), response.text()))
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
