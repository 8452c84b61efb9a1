//! `wrenn template list`: the templates of a control plane.

use clap::{Args, Subcommand};

use crate::connection::Connection;
use crate::output::{print_json, table};

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TemplateCommand,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// The templates sandboxes can be created from.
    List,
}

pub async fn run(args: TemplateArgs) -> anyhow::Result<()> {
    let TemplateArgs {
        connection,
        command: TemplateCommand::List,
    } = args;
    let templates = connection.api()?.templates().await?;
    if connection.json {
        return print_json(&templates);
    }
    let rows = templates
        .iter()
        .map(|t| {
            vec![
                t.template_id.clone(),
                t.cpu_count.to_string(),
                format!("{} MiB", t.memory_mb),
                format!("{} MiB", t.disk_size_mb),
                t.envd_version.clone(),
                t.created_at.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["template", "cpus", "memory", "disk", "envd", "built"],
            rows
        )
    );
    Ok(())
}
