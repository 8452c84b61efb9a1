//! `wrenn key …`: API keys. Over a control plane's REST API by default (E2B's `/api-keys`
//! routes, as the key the CLI is given: its team's keys, within its role); with `--local`,
//! straight in the store on this machine (the one `wrenn up` and `wrenn server` open), which
//! is how the first key of a team is made.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_core::now_ms;

use super::plane::{create_key, open_store, team};
use crate::connection::Connection;
use crate::output::{print_json, table};

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
    #[command(flatten)]
    connection: Connection,
    /// Work in this machine's store instead of over the API (no API key needed: for the
    /// first key of a team).
    #[arg(long, global = true)]
    local: bool,
    /// With --local: the team (created if new).
    #[arg(long, global = true, default_value = "default", requires = "local")]
    team: String,
    /// With --local: the data directory whose store is used.
    #[arg(long, global = true, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
    data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; the key is shown once.
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        /// Its role: owner, admin or member [default: the caller's; with --local, owner].
        #[arg(long)]
        role: Option<String>,
    },
    /// List the team's keys (never the keys themselves).
    List,
    /// Rename a key.
    Rename { id: String, name: String },
    /// Revoke a key by its id: its next call is refused.
    Revoke { id: String },
}

pub async fn run(args: KeyArgs) -> anyhow::Result<()> {
    if args.local {
        return run_local(args).await;
    }
    let client = args.connection.api()?;
    let json = args.connection.json;
    match args.command {
        KeyCommand::Create { name, role } => {
            let new = wrenn_api::NewTeamApiKey { name, role };
            let created = client.create_api_key(&new).await?;
            if json {
                return print_json(&created);
            }
            println!(
                "{}\n(key {} \"{}\", {}: shown once, keep it)",
                created.key, created.id, created.name, created.role
            );
        }
        KeyCommand::List => {
            let keys = client.api_keys().await?;
            if json {
                return print_json(&keys);
            }
            let rows = keys
                .into_iter()
                .map(|key| {
                    let mask = &key.mask;
                    vec![
                        key.id,
                        key.name,
                        format!(
                            "{}{}…{}",
                            mask.prefix, mask.masked_value_prefix, mask.masked_value_suffix
                        ),
                        key.role,
                        key.created_at,
                    ]
                })
                .collect();
            println!("{}", table(&["id", "name", "key", "role", "created"], rows));
        }
        KeyCommand::Rename { id, name } => {
            client.rename_api_key(&id, &name).await?;
            println!("renamed {id} to \"{name}\"");
        }
        KeyCommand::Revoke { id } => {
            client.revoke_api_key(&id).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

/// `wrenn key --local …`: the store on this machine.
async fn run_local(args: KeyArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir, None).await?;
    let json = args.connection.json;
    match args.command {
        KeyCommand::Create { name, role } => {
            anyhow::ensure!(
                role.is_none_or(|role| role == "owner"),
                "keys made with --local are their team's owners (make others over the API)"
            );
            let team = team(&store, &args.team).await?;
            let (key, record) = create_key(&store, &team, &name).await?;
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
        KeyCommand::List => {
            let team = store
                .team_by_name(&args.team)
                .await?
                .with_context(|| format!("no team {}", args.team))?;
            let keys = store.list_keys(&team.id).await?;
            if json {
                return print_json(&keys);
            }
            let rows = keys
                .into_iter()
                .map(|key| {
                    vec![
                        key.id,
                        key.name,
                        format!("{}…", key.prefix),
                        key.role.to_string(),
                        chrono::DateTime::from_timestamp_millis(key.created_at_ms)
                            .unwrap_or_default()
                            .to_rfc3339(),
                        key.revoked.to_string(),
                    ]
                })
                .collect();
            let header = ["id", "name", "key starts", "role", "created", "revoked"];
            println!("{}", table(&header, rows));
        }
        KeyCommand::Rename { id, name } => {
            wrenn_cp::service::keys::check_key_name(&name)?;
            anyhow::ensure!(store.rename_key(&id, &name).await?, "no active key {id}");
            println!("renamed {id} to \"{name}\"");
        }
        KeyCommand::Revoke { id } => {
            anyhow::ensure!(store.revoke_key(&id, now_ms()).await?, "no active key {id}");
            println!("revoked {id}");
        }
    }
    Ok(())
}
