//! `wrenn agent …`: run the host agent (`serve`), or talk to one directly for debugging
//! (`sandbox`, `template`, `host`): tables by default, JSON with `--json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_agent::{AgentConfig, Manager};
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;

use crate::output::{Column, print_list};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Run the host agent.
    Serve(Box<ServeArgs>),
    /// Sandboxes of an agent.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Templates of an agent.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Capacity and usage of an agent's host.
    Host(ClientArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the agent's API.
    #[arg(long, default_value = "127.0.0.1:49990")]
    listen: SocketAddr,
    /// Bearer token clients must present (or --token-file).
    #[arg(long, env = "WRENN_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, env = "WRENN_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// State, templates and sandboxes.
    #[arg(long, default_value = crate::paths::AGENT_DATA_DIR)]
    data_dir: PathBuf,
    /// Image templates are built from [default: <cache>/images/base].
    #[arg(long, env = "WRENN_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    #[command(flatten)]
    pub(crate) host: crate::flags::HostFlags,
    /// Slots created ahead of demand.
    #[arg(long, default_value_t = 2)]
    slots_ahead: u32,
    /// Do not give guests a way to the internet through this host.
    #[arg(long)]
    no_internet: bool,
    /// Delete every network slot of this agent on exit (tests); by default running sandboxes
    /// keep theirs, for the next agent to adopt.
    #[arg(long)]
    cleanup_on_exit: bool,
    #[arg(long, default_value_t = 30)]
    header_read_timeout_secs: u64,
    #[arg(long, default_value_t = 640)]
    idle_timeout_secs: u64,
    /// Address of the sandbox proxy the control plane's edge proxy forwards to.
    #[arg(long, default_value = "127.0.0.1:49992")]
    proxy_listen: SocketAddr,
    /// A control plane to join (`https://host:port`, its --fleet-listen address). A joined
    /// agent serves its API and proxy to that control plane alone, over mutual TLS.
    #[arg(long, env = "WRENN_CONTROL_PLANE_URL")]
    join: Option<String>,
    /// The control plane's certificate authority, needed at the first join: `sha256:<hex>`
    /// as `wrenn server` prints it, or a copy of its <data>/cp/fleet-tls/plane-ca.pem.
    #[arg(long, env = "WRENN_CONTROL_PLANE_CA", requires = "join")]
    control_plane_ca: Option<String>,
    /// The control plane's join token (`<data>/cp/join-token` on its machine).
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token (e.g. a copy of the control plane's `<data>/cp/join-token`).
    #[arg(long, env = "WRENN_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// This host's name in the fleet [default: the machine's host name].
    #[arg(long)]
    host_name: Option<String>,
    /// The address the control plane reaches this host at [default: the listen addresses'].
    #[arg(long)]
    advertise_host: Option<String>,
    /// The bearer token `GET /metrics` (Prometheus) asks of callers not on the loopback;
    /// without one, only the loopback may read the metrics.
    #[arg(long, env = "WRENN_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The agent's API address.
    #[arg(
        long,
        env = "WRENN_AGENT_URL",
        default_value = "http://127.0.0.1:49990"
    )]
    agent: String,
    #[arg(long, env = "WRENN_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the agent's token.
    #[arg(long, env = "WRENN_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// An agent, and the id of the sandbox or template a command is about. (`about = None`: clap
/// would otherwise show this comment as the description of the commands taking it.)
#[derive(Debug, Args)]
#[command(about = None, long_about = None)]
pub struct IdArgs {
    #[command(flatten)]
    client: ClientArgs,
    id: String,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    Create {
        #[command(flatten)]
        client: ClientArgs,
        template: String,
        #[arg(long)]
        id: Option<String>,
        /// KEY=VALUE environment variables.
        #[arg(long = "env")]
        env: Vec<String>,
        #[arg(long)]
        access_token: Option<String>,
        #[arg(long)]
        internet: bool,
    },
    List(ClientArgs),
    Get(IdArgs),
    Pause(IdArgs),
    Resume(IdArgs),
    Destroy(IdArgs),
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    Build {
        #[command(flatten)]
        client: ClientArgs,
        id: String,
        #[arg(long, default_value_t = 512)]
        memory_mib: u32,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long)]
        image_dir: Option<String>,
    },
    List(ClientArgs),
    Delete(IdArgs),
}

pub async fn run(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::Serve(args) => serve(*args).await,
        AgentCommand::Sandbox(command) => sandbox(command).await,
        AgentCommand::Template(command) => template(command).await,
        AgentCommand::Host(client) => {
            let info = call::<host_agent::HostInfo>(&client, &pb::HostInfoRequest {})
                .await?
                .report
                .context("the agent's answer carries no report")?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let mut table = crate::output::table(&["field", "value"], Vec::new());
                for (field, value) in serde_json::to_value(&info)?
                    .as_object()
                    .into_iter()
                    .flatten()
                {
                    table.add_row([
                        field.clone(),
                        value.to_string().trim_matches('"').to_string(),
                    ]);
                }
                println!("{table}");
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let token = crate::secrets::resolve("--token", args.token.clone(), args.token_file.as_deref())?
        .context("--token, WRENN_AGENT_TOKEN or --token-file is required (and not empty)")?;
    let join_token = crate::secrets::resolve(
        "--join-token",
        args.join_token.clone(),
        args.join_token_file.as_deref(),
    )?;
    let identity_file = args.data_dir.join(wrenn_agent::join::IDENTITY_FILE);
    anyhow::ensure!(
        args.join.is_none()
            || join_token.is_some()
            || args
                .data_dir
                .join(wrenn_agent::join::CERTIFICATE_FILE)
                .exists(),
        "--join needs --join-token, WRENN_JOIN_TOKEN or --join-token-file (until the host has its certificate)"
    );
    let config = AgentConfig {
        data_dir: args.data_dir.clone(),
        image_dir: args
            .image_dir
            .clone()
            .unwrap_or_else(wrenn_image::default_image_dir),
        vmm: args.host.vmm,
        qemu_binary: args.qemu.clone(),
        firecracker_binary: args.host.firecracker.clone(),
        accel: args.host.accel,
        slots: args.host.slot_config(),
        slots_ahead: args.slots_ahead,
        host_nat: !args.no_internet,
        vmm_uid_base: args.host.vmm_uid_base,
        insecure_registries: args.host.insecure_registries.clone(),
        image_cache_bytes: args.host.image_cache_mib << 20,
        template_store: args.host.template_store.clone(),
        template_cache_bytes: args.host.template_cache_mib << 20,
        mapped_memory: !args.host.classic_memory,
        warm_pool: args.host.warm_pool,
        warm_pool_min_free_mib: args.host.warm_pool_min_free_mib,
        sample_interval: std::time::Duration::from_secs_f64(args.host.sample_interval),
        metrics_token: args.metrics_token.clone(),
    };
    let manager = Manager::start(config).await.context("starting the agent")?;
    let api = crate::listen(args.listen).await?;
    let proxy = crate::listen(args.proxy_listen).await?;
    let mmds_address = wrenn_agent::mmds_bind_address(args.host.mmds_port);
    let mmds = tokio::net::TcpListener::bind(mmds_address)
        .await
        .with_context(|| format!("listening for metadata requests on {mmds_address}"))?;
    let api_address = api.local_addr()?;
    let proxy_address = proxy.local_addr()?;
    tracing::info!(
        listen = %api_address,
        proxy = %proxy_address,
        accel = manager.accel().as_str(),
        data_dir = %args.data_dir.display(),
        "host agent ready"
    );
    let timeouts = wrenn_http::server::ServerTimeouts {
        header_read: Duration::from_secs(args.header_read_timeout_secs),
        idle: Duration::from_secs(args.idle_timeout_secs.max(1)),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let (fleet_tls, fleet_settings) = wrenn_agent::join::FleetTls::new();
    let joiner = match &args.join {
        Some(url) => {
            anyhow::ensure!(
                args.advertise_host.is_some()
                    || !(api_address.ip().is_unspecified() || proxy_address.ip().is_unspecified()),
                "--advertise-host is required when listening on every address: the control plane must be told where to reach this agent"
            );
            let advertise = |address: SocketAddr| match &args.advertise_host {
                Some(host) => format!("{host}:{}", address.port()),
                None => address.to_string(),
            };
            let config = wrenn_agent::join::JoinConfig {
                control_plane_url: url.trim_end_matches('/').to_string(),
                join_token: join_token.clone(),
                control_plane_ca: args
                    .control_plane_ca
                    .as_deref()
                    .map(wrenn_agent::join::PlaneAuthority::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                name: match &args.host_name {
                    Some(name) => name.clone(),
                    None => nix::unistd::gethostname()
                        .context("reading the host name (or pass --host-name)")?
                        .to_string_lossy()
                        .into_owned(),
                },
                api_url: format!("https://{}", advertise(api_address)),
                proxy_address: advertise(proxy_address),
                agent_token: token.clone(),
                identity_file,
            };
            wrenn_agent::join::prepare(&config, &fleet_tls).map_err(anyhow::Error::msg)?;
            Some(tokio::spawn(wrenn_agent::join::run(
                config,
                manager.clone(),
                fleet_tls.clone(),
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let server = wrenn_agent::serve(
        manager.clone(),
        wrenn_agent::Listeners { api, mmds, proxy },
        &token,
        timeouts,
        joiner.is_some().then_some(fleet_settings),
        stopped(stop_rx),
    );
    let signal = async {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(server, signal);
    if let Some(joiner) = joiner {
        let _ = joiner.await;
    }
    if args.cleanup_on_exit {
        manager.slots.delete_all().await;
    } else {
        manager.shutdown().await;
    }
    tracing::info!("host agent stopped");
    Ok(())
}

async fn call<M>(client: &ClientArgs, request: &M::Request) -> anyhow::Result<M::Response>
where
    M: wrenn_proto::Rpc,
    M::Request: wrenn_connect::Message,
    M::Response: wrenn_connect::Message,
{
    let token = crate::secrets::resolve(
        "--token",
        client.token.clone(),
        client.token_file.as_deref(),
    )?
    .context("--token, WRENN_AGENT_TOKEN or --token-file is required")?;
    let connect = ConnectClient::new(client.agent.clone(), HttpVersion::Http1, Codec::Json)
        .with_header("authorization", &format!("Bearer {token}"));
    connect
        .call::<M>(request, &http::HeaderMap::new())
        .await
        .map_err(|error| {
            // A joined agent's API speaks only the fleet's mutual TLS, to its control plane:
            // a plain call is taken and gets no HTTP answer at all.
            let no_http_answer = error.code == wrenn_connect::Code::Unavailable
                && error.message.starts_with("request failed")
                && !error.message.contains("refused");
            let hint = if no_http_answer {
                " (if the agent joined a control plane, it takes calls from its control plane \
                 alone, over the fleet's mutual TLS: reach its sandboxes with `wrenn sandbox …` \
                 through the control plane)"
            } else {
                ""
            };
            anyhow::anyhow!("{}: {error}{hint}", M::PATH)
        })
}

fn print_sandboxes(sandboxes: &[pb::Sandbox], json: bool) -> anyhow::Result<()> {
    let columns: [Column<pb::Sandbox>; 7] = [
        ("sandbox", |s| s.sandbox_id.clone()),
        ("template", |s| s.template_id.clone()),
        ("state", |s| s.state.clone()),
        ("envd", |s| s.envd_address.clone()),
        ("memory", |s| format!("{} MiB", s.memory_mib)),
        ("rss", |s| format!("{} MiB", s.rss_bytes >> 20)),
        ("error", |s| s.error.clone()),
    ];
    print_list(sandboxes, json, &columns)
}

async fn sandbox(command: SandboxCommand) -> anyhow::Result<()> {
    let (client, sandboxes) = match command {
        SandboxCommand::Create {
            client,
            template,
            id,
            env,
            access_token,
            internet,
        } => {
            let request = pb::CreateSandboxRequest {
                template_id: template,
                sandbox_id: id.unwrap_or_default(),
                env_vars: crate::output::parse_pairs(&env, "--env")?
                    .into_iter()
                    .collect(),
                envd_access_token: access_token.unwrap_or_default(),
                allow_internet_access: internet,
                ..Default::default()
            };
            let created = call::<host_agent::CreateSandbox>(&client, &request).await?;
            (client, Vec::from_iter(created.sandbox))
        }
        SandboxCommand::List(client) => {
            let request = pb::ListSandboxesRequest {};
            let listed = call::<host_agent::ListSandboxes>(&client, &request).await?;
            (client, listed.sandboxes)
        }
        SandboxCommand::Get(IdArgs { client, id }) => {
            let request = pb::GetSandboxRequest { sandbox_id: id };
            let found = call::<host_agent::GetSandbox>(&client, &request).await?;
            (client, Vec::from_iter(found.sandbox))
        }
        SandboxCommand::Pause(IdArgs { client, id }) => {
            let request = pb::PauseSandboxRequest {
                sandbox_id: id,
                ..Default::default()
            };
            let paused = call::<host_agent::PauseSandbox>(&client, &request).await?;
            (client, Vec::from_iter(paused.sandbox))
        }
        SandboxCommand::Resume(IdArgs { client, id }) => {
            let request = pb::ResumeSandboxRequest {
                sandbox_id: id,
                ..Default::default()
            };
            let resumed = call::<host_agent::ResumeSandbox>(&client, &request).await?;
            (client, Vec::from_iter(resumed.sandbox))
        }
        SandboxCommand::Destroy(IdArgs { client, id }) => {
            let request = pb::DestroySandboxRequest {
                sandbox_id: id.clone(),
            };
            call::<host_agent::DestroySandbox>(&client, &request).await?;
            if client.json {
                println!("{}", serde_json::json!({ "destroyed": id }));
            } else {
                println!("destroyed {id}");
            }
            return Ok(());
        }
    };
    print_sandboxes(&sandboxes, client.json)
}

fn print_templates(templates: &[pb::Template], json: bool) -> anyhow::Result<()> {
    let columns: [Column<pb::Template>; 7] = [
        ("template", |t| t.template_id.clone()),
        ("memory", |t| format!("{} MiB", t.memory_mib)),
        ("vcpus", |t| t.vcpus.to_string()),
        ("accel", |t| t.accel.clone()),
        ("snapshot", |t| format!("{} MiB", t.snapshot_bytes >> 20)),
        ("envd", |t| t.envd_version.clone()),
        ("built in", |t| {
            format!("{:.1} s", t.build_ms as f64 / 1000.0)
        }),
    ];
    print_list(templates, json, &columns)
}

async fn template(command: TemplateCommand) -> anyhow::Result<()> {
    let (client, templates) = match command {
        TemplateCommand::Build {
            client,
            id,
            memory_mib,
            vcpus,
            image_dir,
        } => {
            eprintln!(
                "building template {id} (boots the image once; minutes under software emulation) ..."
            );
            let request = pb::BuildTemplateRequest {
                template_id: id,
                image_dir: image_dir.unwrap_or_default(),
                memory_mib,
                vcpus,
                boot_timeout_ms: 0,
            };
            let built = call::<host_agent::BuildTemplate>(&client, &request).await?;
            (client, Vec::from_iter(built.template))
        }
        TemplateCommand::List(client) => {
            let request = pb::ListTemplatesRequest {};
            let listed = call::<host_agent::ListTemplates>(&client, &request).await?;
            (client, listed.templates)
        }
        TemplateCommand::Delete(IdArgs { client, id }) => {
            let request = pb::DeleteTemplateRequest {
                template_id: id.clone(),
            };
            call::<host_agent::DeleteTemplate>(&client, &request).await?;
            println!("deleted {id}");
            return Ok(());
        }
    };
    print_templates(&templates, client.json)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `wrenn agent …` alone.
    #[derive(Debug, Parser)]
    struct Agent {
        #[command(subcommand)]
        command: AgentCommand,
    }

    #[test]
    fn calls_on_one_sandbox_or_template_take_the_agent_and_an_id() {
        for (group, call) in [
            ("sandbox", "get"),
            ("sandbox", "pause"),
            ("sandbox", "resume"),
            ("sandbox", "destroy"),
            ("template", "delete"),
        ] {
            let words = [
                "agent",
                group,
                call,
                "x1",
                "--agent",
                "http://h:1",
                "--json",
            ];
            let parsed = Agent::try_parse_from(words).unwrap_or_else(|e| panic!("{call}: {e}"));
            let (AgentCommand::Sandbox(
                SandboxCommand::Get(args)
                | SandboxCommand::Pause(args)
                | SandboxCommand::Resume(args)
                | SandboxCommand::Destroy(args),
            )
            | AgentCommand::Template(TemplateCommand::Delete(args))) = parsed.command
            else {
                panic!("{group} {call}: parsed as {:?}", parsed.command)
            };
            assert_eq!(args.id, "x1", "{group} {call}");
            assert_eq!(args.client.agent, "http://h:1", "{group} {call}");
            assert!(args.client.json, "{group} {call}");
        }
    }
}
