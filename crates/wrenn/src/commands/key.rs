//! `wrenn key …`: API keys in the control plane's store (the same store `wrenn up` and `wrenn
//! server` open).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use wrenn_core::now_ms;

use super::plane::{create_key, open_store, team};
use crate::output::{print_json, table};

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

pub async fn run(command: KeyCommand) -> anyhow::Result<()> {
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
                print_json(&keys)?;
            } else {
                let rows = keys
                    .into_iter()
                    .map(|key| {
                        vec![
                            key.id,
                            key.name,
                            format!("{}…", key.prefix),
                            chrono::DateTime::from_timestamp_millis(key.created_at_ms)
                                .unwrap_or_default()
                                .to_rfc3339(),
                            key.revoked.to_string(),
                        ]
                    })
                    .collect();
                let header = ["id", "name", "key starts", "created", "revoked"];
                println!("{}", table(&header, rows));
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
