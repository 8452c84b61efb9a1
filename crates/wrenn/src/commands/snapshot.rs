//! `wrenn snapshot …`: the persistent snapshots of a control plane's team (`wrenn sandbox
//! snapshot` takes them): `list` (all, or one sandbox's) and `delete` (refused while a sandbox
//! made from it exists), through the REST client.

use clap::{Args, Subcommand};

use crate::connection::Connection;
use crate::output::{Column, print_list};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// The team's snapshots (every page).
    List {
        /// Only the snapshots of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Delete a snapshot (refused while a sandbox made from it exists).
    Delete {
        /// Its id or name.
        snapshot: String,
    },
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let SnapshotArgs {
        connection,
        command,
    } = args;
    let api = connection.api()?;
    match command {
        SnapshotCommand::List { sandbox } => {
            let snapshots = api.snapshots(sandbox.as_deref()).await?;
            let columns: [Column<wrenn_api::SnapshotInfo>; 2] = [
                ("snapshot", |s| s.snapshot_id.clone()),
                ("names", |s| s.names.join(", ")),
            ];
            print_list(&snapshots, connection.json, &columns)
        }
        SnapshotCommand::Delete { snapshot } => {
            // A snapshot is a template: deleted as E2B's SDKs delete it.
            let id = snapshot.split(':').next().unwrap_or(&snapshot).to_string();
            api.delete_template(&id).await?;
            if connection.json {
                println!(
                    "{}",
                    serde_json::json!({ "snapshotID": snapshot, "deleted": true })
                );
            } else {
                println!("deleted snapshot {snapshot}");
            }
            Ok(())
        }
    }
}
