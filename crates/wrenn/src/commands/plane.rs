//! What `wrenn up` and `wrenn server` share: the control plane's flags ([`PlaneArgs`]), its
//! store (SQLite in the data directory, or PostgreSQL when `DATABASE_URL` names one), the first
//! team and key, the HTTPS front, and starting the API and proxy servers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use clap::builder::TypedValueParser;
use wrenn_cp::store::{ApiKey, Store, Team};
use wrenn_cp::{ControlPlane, auth};

/// The control plane's settings, shared by `wrenn up` and `wrenn server`.
#[derive(Debug, Args, Clone)]
pub struct PlaneArgs {
    /// Where wrenn keeps its state: the store, the agent's templates and sandboxes.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
    pub(super) data_dir: PathBuf,
    /// The E2B REST API.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub(super) api_listen: SocketAddr,
    /// Where host agents join and heartbeat, over the fleet's mutual TLS (`--join
    /// https://<this>`) [default: nowhere; only the agent of `wrenn up`'s own process serves].
    #[arg(long, value_name = "ADDRESS")]
    pub(super) fleet_listen: Option<SocketAddr>,
    /// How long a host's fleet certificate is valid, in seconds (its agent renews it two
    /// thirds in; at least 30).
    #[arg(long, default_value = "2592000", value_parser = clap::value_parser!(u64).range(30..=31_536_000).map(Duration::from_secs))]
    pub(super) host_certificate_life_secs: Duration,
    /// The edge proxy to sandbox ports (and envd).
    #[arg(long, default_value = "127.0.0.1:3001")]
    pub(super) proxy_listen: SocketAddr,
    /// The domain the API (`api.<domain>`) and sandboxes (`<port>-<id>.<domain>`) are reached
    /// under over HTTPS, as the SDKs do with `E2B_DOMAIN` [default for `wrenn up`:
    /// wrenn.localhost, which names this machine; for `wrenn server`: none, no HTTPS].
    #[arg(long)]
    pub(super) domain: Option<String>,
    /// Where HTTPS is served under the domain (repeat for more) [default: 127.0.0.1:443 and
    /// [::1]:443 for `wrenn up`, 0.0.0.0:443 for `wrenn server`]. On another port than 443 the
    /// SDKs are given `<domain>:<port>`.
    #[arg(long = "https-listen", value_name = "ADDRESS")]
    pub(super) https_listen: Vec<SocketAddr>,
    /// No HTTPS front (the API and the proxy stay on their plain HTTP ports).
    #[arg(long, conflicts_with_all = ["https_listen", "tls_cert"])]
    pub(super) no_https: bool,
    /// The certificate chain (PEM) to serve under the domain [default: one signed by a local
    /// certificate authority in <data>/tls, made once].
    #[arg(long, requires = "tls_key")]
    pub(super) tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub(super) tls_key: Option<PathBuf>,
    /// Keep sandboxes off the internet.
    #[arg(long)]
    pub(super) no_internet: bool,
    /// Let notification channels call loopback, private and link-local addresses (refused
    /// by default: a team's channel must not reach into the control plane's network).
    #[arg(long)]
    pub(super) channels_allow_private: bool,
    /// How many days the channels' delivery log keeps a delivered or given-up delivery.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub(super) channels_log_days: u64,
    /// The token host agents join with [default: one generated into <data>/cp/join-token].
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    pub(super) join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long, env = "WRENN_JOIN_TOKEN_FILE")]
    pub(super) join_token_file: Option<PathBuf>,
    /// A file holding the PostgreSQL URL (instead of `DATABASE_URL`, when it carries a password).
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub(super) database_url_file: Option<PathBuf>,
    /// Where new sandboxes go: least-loaded or binpack.
    #[arg(long, default_value = "least-loaded")]
    pub(super) placement: String,
    /// How often agents heartbeat, in milliseconds.
    #[arg(long, default_value = "2000", value_parser = millis())]
    pub(super) heartbeat_interval_ms: Duration,
    /// A host silent this long (milliseconds) is down and its sandboxes lost.
    #[arg(long, default_value = "10000", value_parser = millis())]
    pub(super) down_after_ms: Duration,
    /// How often every host's sandboxes are compared with the store, in seconds.
    #[arg(long, default_value = "30", value_parser = seconds())]
    pub(super) reconcile_interval_secs: Duration,
    /// A sandbox a host runs that the store does not know is destroyed once this old (seconds).
    #[arg(long, default_value = "60", value_parser = seconds())]
    pub(super) orphan_grace_secs: Duration,
    /// Running sandboxes a team may have (0: no limit).
    #[arg(long, default_value_t = 20)]
    pub(super) quota_running: u32,
    /// Paused sandboxes a team may have (0: no limit).
    #[arg(long, default_value_t = 50)]
    pub(super) quota_paused: u32,
    /// Disk a team's sandboxes may hold, in GiB (estimated: each its template's disk size, a
    /// paused one also its memory; 0: no limit).
    #[arg(long, default_value_t = 100)]
    pub(super) quota_disk_gib: u64,
    /// Sandbox creates each API key may make per second on average (0: no limit); past it
    /// the API answers 429 with Retry-After.
    #[arg(long, default_value_t = 10.0)]
    pub(super) create_rate: f64,
    /// Sandbox creates each API key may make at once, before --create-rate applies.
    #[arg(long, default_value_t = 50)]
    pub(super) create_burst: u32,
    /// Teams a user may own (0: no limit; operators are not limited): quotas are per team.
    #[arg(long, default_value_t = wrenn_cp::service::users::TEAMS_PER_USER)]
    pub(super) teams_per_user: usize,
    /// The bearer token `GET /metrics` (Prometheus) asks of callers not on the loopback;
    /// without one, only the loopback may read the metrics.
    #[arg(long, env = "WRENN_METRICS_TOKEN", hide_env_values = true)]
    pub(crate) metrics_token: Option<String>,
    /// The most of a sandbox's log kept, in KiB (its oldest lines go first).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub(super) sandbox_log_kib: u64,
    /// How many days a sandbox's log is kept after it ended.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub(super) sandbox_log_days: u64,
    /// How often the hosts' sandbox samples and log lines are collected, in milliseconds.
    #[arg(long, default_value = "5000", value_parser = millis())]
    pub(super) telemetry_interval_ms: Duration,
    /// Run as one of several replicas on one PostgreSQL store (`wrenn server` only): each
    /// background duty (timeouts, the fleet's watch, reconcile, telemetry, deliveries) runs in
    /// one replica at a time, under a lease, and a replica's death hands it to another.
    /// Replicas share --join-token and --shared-dir. See docs/operations.md.
    #[arg(long)]
    pub(super) replica: bool,
    /// How long a replica's lease on a duty lasts unless renewed (renewed every third of it), in
    /// milliseconds: a dead replica's duties are taken over within it and a renewal round.
    #[arg(long, default_value = "10000", value_parser = millis(), requires = "replica")]
    pub(super) lease_life_ms: Duration,
    /// Where the secrets replicas must share are kept: the fleet's certificate authorities
    /// (`fleet-tls/`) and the channels' sealing key (`secrets.key`) [default: <data>/cp]. Give
    /// every replica the same directory's contents (start one first, which makes them).
    #[arg(long, value_name = "DIR")]
    pub(super) shared_dir: Option<PathBuf>,
}

impl PlaneArgs {
    /// The directory of the secrets replicas share.
    fn shared_dir(&self) -> PathBuf {
        self.shared_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("cp"))
    }
}

/// A duration flag given in milliseconds: a whole number, parsed (and refused) as any other.
fn millis() -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).map(Duration::from_millis)
}

/// A duration flag given in seconds: a whole number, parsed (and refused) as any other.
fn seconds() -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).map(Duration::from_secs)
}

fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("cp/wrenn.sqlite")
}

/// The store: PostgreSQL when `DATABASE_URL` (or the file `url_file`, else
/// `$DATABASE_URL_FILE`) names one, else SQLite in the data directory.
pub(super) async fn open_store(data_dir: &Path, url_file: Option<&Path>) -> anyhow::Result<Store> {
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
pub(super) async fn team(store: &Store, name: &str) -> anyhow::Result<Team> {
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

pub(super) async fn create_key(
    store: &Store,
    team: &Team,
    name: &str,
) -> anyhow::Result<(String, ApiKey)> {
    // Keys made on the server's command line are their team's owners.
    Ok(
        wrenn_cp::service::keys::make_key(store, &team.id, name, wrenn_cp::store::Role::Owner)
            .await?,
    )
}

/// A control plane serving its API and proxy.
pub(super) struct Running {
    pub(super) plane: Arc<ControlPlane>,
    /// The plane's workers (event hooks, extensions'), stopped by `shutdown`.
    started: wrenn_cp::server::Started,
    shutdown: tokio_util::sync::CancellationToken,
    pub(super) api_address: SocketAddr,
    pub(super) proxy_address: SocketAddr,
    pub(super) first_key: Option<String>,
    pub(super) key_file: PathBuf,
    pub(super) join_token_file: Option<PathBuf>,
    pub(super) servers: Vec<tokio::task::JoinHandle<()>>,
    pub(super) https: Option<Https>,
    /// The fleet's listener and the plane authority's fingerprint, when agents may join.
    pub(super) fleet: Option<(SocketAddr, String)>,
}

/// The HTTPS front, when it runs.
pub(super) struct Https {
    /// What the SDKs are given as the domain (with `:port` off 443).
    domain: String,
    addresses: Vec<SocketAddr>,
    /// The local authority that signed its certificate (none with --tls-cert).
    authority: Option<wrenn_cp::tls::LocalAuthority>,
}

/// The HTTPS front's parts before it serves.
struct HttpsFront {
    https: Https,
    listeners: Vec<tokio::net::TcpListener>,
    served: Arc<wrenn_cp::tls::ServedCertificate>,
    /// The local authority's directory and the host it certifies (renewed while running).
    renew: Option<(PathBuf, String)>,
}

/// Starts the HTTPS front when `args` (and `local`, for `wrenn up`'s defaults) ask for it:
/// binds its listeners and makes its certificate.
async fn start_https(args: &PlaneArgs, local: bool) -> anyhow::Result<Option<HttpsFront>> {
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
    let served = wrenn_cp::tls::ServedCertificate::load(&cert, &key)?;
    let renew = authority
        .is_some()
        .then(|| (args.data_dir.join("tls"), host.clone()));
    let port = bound[0].port();
    let advertised = if domain.contains(':') || port == 443 {
        domain.clone()
    } else {
        format!("{domain}:{port}")
    };
    Ok(Some(HttpsFront {
        https: Https {
            domain: advertised,
            addresses: bound,
            authority,
        },
        listeners,
        served,
        renew,
    }))
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

/// The notification channels' settings: their sealing key (`<data>/cp/secrets.key`, made at
/// the first start; replicas sharing a PostgreSQL store must share the file) and policy.
fn channels(args: &PlaneArgs) -> anyhow::Result<wrenn_cp::channels::Channels> {
    let key = args.shared_dir().join("secrets.key");
    let secrets = wrenn_cp::channels::SecretBox::open_or_create(&key)
        .context("opening the channels' secrets key")?;
    let policy = wrenn_cp::channels::ChannelPolicy {
        allow_private: args.channels_allow_private,
        log_retention: Duration::from_secs(args.channels_log_days * 24 * 3600),
        ..Default::default()
    };
    Ok(wrenn_cp::channels::Channels { secrets, policy })
}

/// Writes a secret file (0600, in a 0700 directory) atomically.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().context("a secret file needs a directory")?;
    wrenn_cp::store::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    wrenn_cp::store::write_file_atomically(path, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

pub(super) async fn start_plane(
    args: &PlaneArgs,
    embedded: Option<Arc<dyn wrenn_agent_api::HostAgent>>,
    serve: &ServeFn<'_>,
    stop: &tokio::sync::watch::Receiver<bool>,
    extensions: &crate::Extensions,
) -> anyhow::Result<Running> {
    secure_plane_files(&args.data_dir.join("cp"))?;
    if args.shared_dir.is_some() {
        secure_plane_files(&args.shared_dir())?;
    }
    anyhow::ensure!(
        !(args.replica && embedded.is_some()),
        "--replica is for `wrenn server`: `wrenn up` runs alone with its own agent"
    );
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
    let authority = Arc::new(
        wrenn_cp::fleet::pki::FleetAuthority::open(
            &args.shared_dir().join("fleet-tls"),
            args.host_certificate_life_secs,
        )
        .context("the fleet's certificate authorities")?,
    );
    let config = wrenn_cp::fleet::FleetConfig {
        authority: Some(authority.clone()),
        join_token: Some(token),
        heartbeat_interval: args.heartbeat_interval_ms.max(Duration::from_millis(100)),
        down_after: args.down_after_ms.max(Duration::from_millis(300)),
        reconcile_interval: args.reconcile_interval_secs.max(Duration::from_secs(1)),
        orphan_grace: args.orphan_grace_secs,
    };
    let placement = wrenn_cp::fleet::placement(&args.placement).map_err(anyhow::Error::msg)?;
    let fleet = wrenn_cp::fleet::Fleet::load(&store, config, placement, embedded)
        .await
        .context("loading the fleet")?;
    let domain = match &https {
        Some(front) => Some(front.https.domain.clone()),
        None => args.domain.clone(),
    };
    let channels = channels(args)?;
    let (plane, wake) = ControlPlane::new(store, fleet, domain, !args.no_internet);
    let plane = if args.replica {
        let id = format!(
            "{}-{}-{}",
            nix::unistd::gethostname()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "replica".into()),
            std::process::id(),
            wrenn_cp::auth::random_id(6)?
        );
        tracing::info!(replica = %id, "running as a replica");
        plane.with_replica(wrenn_cp::replica::ReplicaSettings {
            id,
            lease_life: args.lease_life_ms,
        })?
    } else {
        plane
    };
    let plane = plane
        .with_channels(channels.clone())
        .with_template_files(args.data_dir.join("cp/template-files"))
        .with_quotas(wrenn_cp::quota::Quotas {
            running: args.quota_running,
            paused: args.quota_paused,
            disk_mib: args.quota_disk_gib.saturating_mul(1024),
        })
        .with_create_limit(wrenn_cp::ratelimit::RateLimit::new(
            args.create_rate,
            args.create_burst,
        ));
    let plane = plane
        .with_metrics_token(args.metrics_token.clone())
        .with_telemetry(wrenn_cp::telemetry::TelemetrySettings {
            collect_interval: args.telemetry_interval_ms.max(Duration::from_millis(100)),
            log_cap_chars: i64::try_from(args.sandbox_log_kib.saturating_mul(1024))
                .unwrap_or(i64::MAX),
            log_retention: Duration::from_secs(args.sandbox_log_days.saturating_mul(86_400)),
            ..wrenn_cp::telemetry::TelemetrySettings::default()
        });
    let mut plane = plane;
    plane.teams_per_user = args.teams_per_user;
    let mut builder = wrenn_cp::server::Server::builder(plane, wake);
    for extension in extensions {
        builder = builder.extension(extension.clone());
    }
    let server = builder.build()?;
    let interrupted = server
        .plane()
        .fail_interrupted_builds()
        .await
        .context("ending the builds a previous run left")?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "template builds a previous run left are failed"
        );
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = server.start(shutdown.clone());
    let plane = started.plane.clone();

    let api = crate::listen(args.api_listen).await?;
    let proxy = crate::listen(args.proxy_listen).await?;
    let api_address = api.local_addr()?;
    let proxy_address = proxy.local_addr()?;
    let mut servers = vec![
        serve(api, started.api_router()),
        serve(proxy, started.proxy_router()),
    ];
    let fleet_address = match args.fleet_listen {
        Some(address) => {
            let listener = crate::listen(address)
                .await
                .context("the fleet's listener (--fleet-listen)")?;
            let bound = listener.local_addr()?;
            servers.push(wrenn_cp::tls::spawn_fleet_until_stopped(
                listener,
                authority.registry_server_config()?,
                wrenn_cp::http::registry_router(plane.clone()),
                wrenn_http::server::ServerTimeouts::default(),
                stop.clone(),
            ));
            servers.push(renew_plane_certificate(authority.clone(), stop.clone()));
            Some(bound)
        }
        None => None,
    };
    let https = match https {
        Some(HttpsFront {
            https,
            listeners,
            served,
            renew,
        }) => {
            let host = wrenn_cp::tls::domain_host(&https.domain)?;
            let front =
                wrenn_cp::tls::front_router(host, started.api_router(), started.proxy_router());
            let config = served.server_config()?;
            servers.push(served.watch(wrenn_cp::tls::RELOAD_INTERVAL, renew, stop.clone()));
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
        started,
        shutdown,
        api_address,
        proxy_address,
        first_key,
        key_file,
        join_token_file,
        servers,
        https,
        fleet: fleet_address.map(|address| (address, authority.plane_ca_fingerprint())),
    })
}

/// Renews the control plane's own fleet certificate when due (checked hourly) until `stop`.
fn renew_plane_certificate(
    authority: Arc<wrenn_cp::fleet::pki::FleetAuthority>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
            if let Err(error) = authority.renew_plane_if_due() {
                tracing::warn!(%error, "cannot renew the control plane's fleet certificate");
            }
        }
    })
}

impl Running {
    /// Stops the servers (`stop` must have been told) and the plane's workers, and waits for
    /// them.
    pub(super) async fn stopped(self) {
        for server in self.servers {
            let _ = server.await;
        }
        self.shutdown.cancel();
        self.started.stopped().await;
    }
}

pub(super) fn print_endpoints(running: &Running) {
    match &running.first_key {
        Some(key) => println!(
            "  E2B_API_KEY={key}    (also in {})",
            running.key_file.display()
        ),
        None => println!("  E2B_API_KEY=<a key of yours: `wrenn key create --local`>"),
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
    match &running.fleet {
        Some((address, fingerprint)) => println!(
            "Hosts join with: wrenn agent serve --join https://{address} --control-plane-ca sha256:{fingerprint} {token} --token-file <agent token file>"
        ),
        None => println!("No hosts join (--fleet-listen ADDRESS takes them)."),
    }
}

pub(super) fn server_spawner(
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> impl Fn(tokio::net::TcpListener, axum::Router) -> tokio::task::JoinHandle<()> {
    let timeouts = wrenn_http::server::ServerTimeouts::default();
    move |listener: tokio::net::TcpListener, router: axum::Router| {
        wrenn_http::server::spawn_until_stopped(listener, router, timeouts.clone(), stop_rx.clone())
    }
}
