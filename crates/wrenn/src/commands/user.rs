//! `wrenn user …`: users in this machine's store (the one `wrenn up` and `wrenn server`
//! open): the first operator, or anyone before invitations bring the rest (`POST
//! /v1/teams/{teamID}/invitations`). Users sign in over the API (`POST /v1/auth/login`).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use wrenn_core::now_ms;

use super::plane::{open_store, team};
use crate::output::{print_json, table};

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(subcommand)]
    command: UserCommand,
    /// The data directory whose store is used.
    #[arg(long, global = true, env = "WRENN_DATA_DIR", default_value = crate::paths::DATA_DIR)]
    data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from --password-file, else from the first line of
    /// standard input.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// An operator sees and acts in every team.
        #[arg(long)]
        operator: bool,
        /// A team to make them a member of (created if new).
        #[arg(long)]
        team: Option<String>,
        /// Their role in --team: owner, admin or member.
        #[arg(long, default_value = "owner", requires = "team")]
        role: String,
    },
    /// List the users.
    List,
}

pub async fn run(args: UserArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir, None).await?;
    match args.command {
        UserCommand::Create {
            email,
            password_file,
            operator,
            team: team_name,
            role,
        } => {
            let role = wrenn_cp::store::Role::from_name(&role)
                .with_context(|| format!("role {role:?} is not one of owner, admin, member"))?;
            let password = match password_file {
                Some(file) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                None => {
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line
                }
            };
            let password = password.trim_end_matches(['\r', '\n']);
            let user =
                wrenn_cp::service::users::make_user(&store, &email, password, operator).await?;
            if let Some(name) = &team_name {
                let team = team(&store, name).await?;
                let member = wrenn_cp::store::MemberRow {
                    team_id: team.id,
                    user_id: user.id.clone(),
                    role,
                    created_at_ms: now_ms(),
                };
                store.put_member(member).await?;
            }
            if args.json {
                return print_json(&user);
            }
            println!(
                "user {} ({}{})",
                user.email,
                user.id,
                if operator { ", operator" } else { "" }
            );
        }
        UserCommand::List => {
            let users = store.users().await?;
            if args.json {
                return print_json(&users);
            }
            let rows = users
                .into_iter()
                .map(|user| {
                    vec![
                        user.id,
                        user.email,
                        user.operator.to_string(),
                        chrono::DateTime::from_timestamp_millis(user.created_at_ms)
                            .unwrap_or_default()
                            .to_rfc3339(),
                    ]
                })
                .collect();
            println!("{}", table(&["id", "email", "operator", "created"], rows));
        }
    }
    Ok(())
}
