//! `wrenn host list` and `wrenn host forget`: the hosts of a control plane's fleet.

use clap::{Args, Subcommand};
use wrenn_agent_api::join::HostReport;

use crate::connection::Connection;
use crate::output::{print_json, table};

#[derive(Debug, Args)]
pub struct HostArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// The fleet's hosts, their state and capacity.
    List,
    /// Forget a host that is down, for good, with its sandboxes: a new agent may then take
    /// its name (the old one's identity no longer counts).
    Forget { name: String },
}

pub async fn run(args: HostArgs) -> anyhow::Result<()> {
    let HostArgs {
        connection,
        command,
    } = args;
    let api = connection.api()?;
    if let HostCommand::Forget { name } = command {
        let forgotten = api.forget_host(&name).await?;
        if connection.json {
            return print_json(&forgotten);
        }
        println!(
            "forgot host {name} and its {} sandboxes",
            forgotten.sandboxes
        );
        return Ok(());
    }
    let fleet = api.hosts().await?;
    if connection.json {
        return print_json(&fleet);
    }
    let rows = fleet
        .hosts
        .iter()
        .map(|host| {
            // A report this CLI cannot read shows as empty rather than failing the listing.
            let report: HostReport =
                serde_json::from_value(host.report.clone()).unwrap_or_default();
            let templates: Vec<&str> = report
                .templates
                .iter()
                .map(|t| t.template_id.as_str())
                .collect();
            vec![
                host.name.clone(),
                host.state.clone(),
                if host.embedded {
                    "embedded".to_string()
                } else {
                    host.api_url.clone()
                },
                format!("{} / {}", report.slots_in_use, report.slots_total),
                format!("{} / {}", report.sandboxes_running, report.sandboxes_paused),
                // Software emulation is a weaker boundary than KVM: the table says so.
                match report.accel.as_str() {
                    "tcg" => "tcg (software emulation)".to_string(),
                    other => other.to_string(),
                },
                format!(
                    "{:.1} GiB",
                    report.memory_available_bytes as f64 / (1u64 << 30) as f64
                ),
                templates.join(","),
                host.last_heartbeat_at.clone(),
            ]
        })
        .collect();
    println!("placement: {}", fleet.placement);
    println!(
        "{}",
        table(
            &[
                "host",
                "state",
                "agent",
                "slots used",
                "running / paused",
                "accel",
                "memory free",
                "templates",
                "last heartbeat"
            ],
            rows
        )
    );
    Ok(())
}
