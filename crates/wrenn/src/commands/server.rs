//! `wrenn server`: the control plane alone, for a fleet of `wrenn agent serve --join` hosts.

use clap::Args;

use super::plane::{PlaneArgs, print_endpoints, server_spawner, start_plane};

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    plane: PlaneArgs,
}

/// `wrenn server`: the control plane alone; hosts join it.
pub async fn run(args: ServerArgs, extensions: crate::Extensions) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = server_spawner(stop_rx.clone());
    let running = start_plane(&args.plane, None, &serve, &stop_rx, &extensions).await?;
    println!(
        "wrenn server is up ({} hosts known, data in {})",
        running.plane.fleet.hosts().len(),
        args.plane.data_dir.display()
    );
    print_endpoints(&running);
    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    running.stopped().await;
    Ok(())
}
