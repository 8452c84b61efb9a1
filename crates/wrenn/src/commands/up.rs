//! `wrenn up`: the whole of wrenn on this machine with its embedded defaults. It builds the base
//! image and template when they are missing (with progress), starts a host agent in-process and
//! the control plane on SQLite, creates a first team and API key, serves the E2B REST API and
//! the edge proxy, and prints how to point the `e2b` SDK at them. `--demo` also runs a sandbox.
//! Hosts that join with `wrenn agent serve --join` are taken too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use wrenn_agent::{AgentConfig, Manager};

use super::plane::{PlaneArgs, print_endpoints, server_spawner, start_plane};

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

pub async fn run(args: UpArgs, extensions: crate::Extensions) -> anyhow::Result<()> {
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
            None => super::image::find_static_envd()?,
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
        vmm: args.host.vmm,
        qemu_binary: "qemu-system-x86_64".into(),
        firecracker_binary: args.host.firecracker.clone(),
        accel: args.host.accel,
        slots: args.host.slot_config(),
        slots_ahead: 2,
        host_nat: !args.plane.no_internet,
        vmm_uid_base: args.host.vmm_uid_base,
        insecure_registries: args.host.insecure_registries.clone(),
        image_cache_bytes: args.host.image_cache_mib << 20,
        template_store: Some(args.host.template_store.clone().unwrap_or_else(|| {
            let dir = args.plane.data_dir.join("template-store");
            std::path::absolute(&dir)
                .unwrap_or(dir)
                .to_string_lossy()
                .into_owned()
        })),
        template_cache_bytes: args.host.template_cache_mib << 20,
        mapped_memory: !args.host.classic_memory,
        warm_pool: args.host.warm_pool,
        warm_pool_min_free_mib: args.host.warm_pool_min_free_mib,
        sample_interval: std::time::Duration::from_secs_f64(args.host.sample_interval),
        metrics_token: args.plane.metrics_token.clone(),
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
        &extensions,
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
    let plane = running.plane.clone();
    running.stopped().await;
    let _ = mmds_server.await;
    // Warm VMMs have no sandbox to outlive the agent for.
    manager.close_warm_pool().await;
    if args.stop_sandboxes_on_exit {
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
    let client = wrenn_api::client::Client::new(&format!("http://{api}"), Some(key))?;
    let created = client
        .create_sandbox(&wrenn_api::NewSandbox {
            template_id: Some("base".into()),
            timeout: Some(120),
            ..Default::default()
        })
        .await?;
    let id = created.sandbox_id;
    println!("demo: created sandbox {id}");
    let mut envd = ConnectClient::new(format!("http://{proxy}"), HttpVersion::Http1, Codec::Json)
        .with_header("e2b-sandbox-id", &id)
        .with_header("e2b-sandbox-port", &wrenn_proto::ENVD_PORT.to_string());
    // A create without `secure` is secured, as the SDKs' are: envd wants the sandbox's token.
    if let Some(token) = &created.envd_access_token {
        envd = envd.with_header("x-access-token", token);
    }
    // Through bash, as the SDKs' `commands.run` (and `wrenn sandbox exec`) run a command.
    let script = "python3 -c 'print(sum(range(10)))'";
    let request = super::sandbox::bash_request(script, None, Default::default());
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", crate::connection::basic_user("user")?);
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
    client.kill(&id).await?;
    println!("demo: killed {id}");
    Ok(())
}
