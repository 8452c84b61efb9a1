//! `wrenn template list`: the templates of a control plane.

use clap::{Args, Subcommand};

use crate::connection::Connection;
use crate::output::{Column, print_list};

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
    let columns: [Column<wrenn_api::Template>; 6] = [
        ("template", |t| t.template_id.clone()),
        ("cpus", |t| t.cpu_count.to_string()),
        ("memory", |t| format!("{} MiB", t.memory_mb)),
        ("disk", |t| format!("{} MiB", t.disk_size_mb)),
        ("envd", |t| t.envd_version.clone()),
        ("built", |t| t.created_at.clone()),
    ];
    print_list(&templates, connection.json, &columns)
}
