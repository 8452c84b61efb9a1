//! `wrenn sandbox …`: sandboxes of a control plane. Lifecycle calls go to its REST API through
//! the typed client (`wrenn_api::client`); `exec`, `shell` and `cp` reach the sandbox's envd
//! through the edge proxy (routing by the `E2b-Sandbox-*` headers), as the SDKs do. Output is a
//! table by default and JSON with `--json`; `exec` and `shell` exit with the command's exit code.

mod copy;
mod exec;
pub mod telemetry;

pub(crate) use exec::bash_request;

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::json;
use wrenn_api::client::ListFilter;
use wrenn_api::{ListedSandbox, NewSandbox, SandboxState};

use crate::connection::Connection;
use crate::output::{Column, pairs_text, parse_pairs, print_json, print_list, table};

#[derive(Debug, Args)]
pub struct SandboxArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from a template.
    Create {
        #[arg(default_value = "base")]
        template: String,
        /// Seconds until it is killed (or paused with --auto-pause).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// KEY=VALUE metadata (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// KEY=VALUE environment variables (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Require an access token for envd (returned, and used by exec, shell and cp).
        #[arg(long)]
        secure: bool,
        /// Pause instead of kill on timeout.
        #[arg(long)]
        auto_pause: bool,
    },
    /// List sandboxes (every page).
    List {
        /// running, paused or both (comma-separated).
        #[arg(long, default_value = "running,paused")]
        state: String,
        /// KEY=VALUE metadata every listed sandbox has (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
    },
    /// Show one sandbox.
    Info { id: String },
    /// Run a command in a sandbox (through bash -l, like the SDKs); exits with its code.
    Exec {
        id: String,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long)]
        cwd: Option<String>,
        /// KEY=VALUE environment variables (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
    },
    /// An interactive shell in a sandbox, on a PTY.
    Shell {
        id: String,
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long, default_value = "/bin/bash")]
        shell: String,
    },
    /// Copy a file in or out: `cp ./local ID:/path` or `cp ID:/path ./local`.
    Cp {
        source: String,
        destination: String,
        #[arg(long, default_value = "user")]
        user: String,
    },
    /// Pause a running sandbox (memory, processes and files kept).
    Pause {
        id: String,
        /// Keep the disk alone (synced first): the resume boots the sandbox, its files kept,
        /// its processes gone.
        #[arg(long)]
        disk_only: bool,
    },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Boot it from its disk, leaving its pause's memory aside.
        #[arg(long)]
        from_disk: bool,
    },
    /// Take a persistent snapshot of a running sandbox (it goes on); sandboxes are created
    /// from it by its id or name, on any host.
    Snapshot {
        id: String,
        /// The snapshot's name (`name` or `name:tag`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Fork a running sandbox: one checkpoint, then N sandboxes from it (the source goes on).
    Fork {
        id: String,
        /// How many forks.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
        /// Seconds until each fork is killed.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Kill a sandbox.
    Kill { id: String },
    /// A sandbox's log (its console, envd's lines), oldest first; also after it ended, for
    /// a while.
    Logs {
        id: String,
        /// Keep printing new lines as they come (Ctrl-C to stop).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines of this level or more severe: debug, info, warn or error.
        #[arg(long)]
        level: Option<String>,
        /// Lines whose message holds this text (any case).
        #[arg(long)]
        search: Option<String>,
        /// Lines from this many seconds ago on [default: every line kept].
        #[arg(long)]
        since_secs: Option<u64>,
        /// At most this many lines a page (at most 1000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// A sandbox's resource samples (CPU, memory, disk, network), oldest first.
    Metrics {
        id: String,
        /// Samples of the last this many seconds.
        #[arg(long, default_value_t = 600)]
        since_secs: u64,
    },
    /// Set a sandbox's timeout, from now.
    Timeout { id: String, seconds: u64 },
}

/// `running,paused` → the states; any other word is refused by name.
fn parse_states(text: &str) -> anyhow::Result<Vec<SandboxState>> {
    text.split(',')
        .map(str::trim)
        .filter(|word| !word.is_empty())
        .map(|word| {
            SandboxState::from_name(word).ok_or_else(|| {
                anyhow::anyhow!("--state {word:?}: use running, paused or lost (comma-separated)")
            })
        })
        .collect()
}

fn print_sandboxes(sandboxes: &[ListedSandbox], json: bool) -> anyhow::Result<()> {
    let columns: [Column<ListedSandbox>; 7] = [
        ("id", |s| s.sandbox_id.clone()),
        ("template", |s| s.template_id.clone()),
        ("state", |s| s.state.to_string()),
        ("started", |s| s.started_at.clone()),
        ("ends", |s| s.end_at.clone()),
        ("cpus / memory", |s| {
            format!("{} / {} MiB", s.cpu_count, s.memory_mb)
        }),
        ("metadata", |s| pairs_text(&s.metadata)),
    ];
    print_list(sandboxes, json, &columns)
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let SandboxArgs {
        connection,
        command,
    } = args;
    let json = connection.json;
    match command {
        SandboxCommand::Create {
            template,
            timeout,
            metadata,
            env,
            secure,
            auto_pause,
        } => {
            let new = NewSandbox {
                template_id: Some(template),
                timeout: Some(timeout),
                metadata: Some(parse_pairs(&metadata, "--metadata")?),
                env_vars: Some(parse_pairs(&env, "--env")?),
                secure: Some(secure),
                auto_pause: Some(auto_pause),
                ..NewSandbox::default()
            };
            let created = connection.api()?.create_sandbox(&new).await?;
            if json {
                print_json(&created)?;
            } else {
                let mut rows = vec![
                    vec!["id".to_string(), created.sandbox_id.clone()],
                    vec!["template".to_string(), created.template_id.clone()],
                    vec!["envd".to_string(), created.envd_version.clone()],
                ];
                if let Some(token) = &created.envd_access_token {
                    rows.push(vec!["access token".to_string(), token.clone()]);
                }
                println!("{}", table(&["sandbox", ""], rows));
            }
        }
        SandboxCommand::List { state, metadata } => {
            let filter = ListFilter {
                states: parse_states(&state)?,
                metadata: parse_pairs(&metadata, "--metadata")?,
            };
            let all = connection.api()?.list_all(&filter).await?;
            print_sandboxes(&all, json)?;
        }
        SandboxCommand::Info { id } => {
            let detail = connection.api()?.sandbox(&id).await?;
            if json {
                print_json(&detail)?;
            } else {
                // Every field the API gives, in its own words.
                let fields = serde_json::to_value(&detail)?;
                let rows = fields
                    .as_object()
                    .map(|fields| {
                        fields
                            .iter()
                            .map(|(k, v)| vec![k.clone(), field_text(v)])
                            .collect()
                    })
                    .unwrap_or_default();
                println!("{}", table(&["field", "value"], rows));
            }
        }
        SandboxCommand::Exec {
            id,
            command,
            user,
            cwd,
            env,
        } => {
            let script = command
                .iter()
                .map(|w| exec::quote(w))
                .collect::<Vec<_>>()
                .join(" ");
            let envs = parse_pairs(&env, "--env")?;
            let code = exec::exec(&connection, &id, &user, cwd, envs, &script).await?;
            std::io::stdout().flush()?;
            std::process::exit(code);
        }
        SandboxCommand::Shell { id, user, shell } => {
            let code = exec::shell_session(&connection, &id, &user, &shell).await?;
            std::process::exit(code);
        }
        SandboxCommand::Cp {
            source,
            destination,
            user,
        } => {
            copy::copy(&connection, &source, &destination, &user).await?;
        }
        SandboxCommand::Pause { id, disk_only } => {
            connection.api()?.pause(&id, !disk_only).await?;
            report(
                json,
                &id,
                if disk_only {
                    "paused (disk only)"
                } else {
                    "paused"
                },
            );
        }
        SandboxCommand::Resume {
            id,
            timeout,
            from_disk,
        } => {
            let api = connection.api()?;
            if from_disk {
                api.resume_from_disk(&id, Some(timeout)).await?;
            } else {
                api.resume(&id, Some(timeout)).await?;
            }
            report(json, &id, "running");
        }
        SandboxCommand::Snapshot { id, name } => {
            let snapshot = connection.api()?.create_snapshot(&id, name).await?;
            if json {
                print_json(&snapshot)?;
            } else {
                println!("{id}: snapshot {}", snapshot.snapshot_id);
            }
        }
        SandboxCommand::Fork { id, count, timeout } => {
            let forks = connection.api()?.fork(&id, count, Some(timeout)).await?;
            if json {
                print_json(&forks)?;
            } else {
                let columns: [Column<wrenn_api::ForkResult>; 2] = [
                    ("fork", |f| {
                        f.sandbox
                            .as_ref()
                            .map(|s| s.sandbox_id.clone())
                            .unwrap_or_else(|| "-".into())
                    }),
                    ("outcome", |f| match &f.error {
                        Some(error) => format!("failed: {}", error.message),
                        None => "running".into(),
                    }),
                ];
                print_list(&forks, false, &columns)?;
            }
            if forks.iter().all(|fork| fork.sandbox.is_none()) {
                anyhow::bail!("no fork of {id} started");
            }
        }
        SandboxCommand::Logs {
            id,
            follow,
            level,
            search,
            since_secs,
            limit,
        } => {
            let filter = telemetry::LogFilter {
                level,
                search,
                since_ms: since_secs
                    .map(|secs| wrenn_core::now_ms() - (secs as i64).saturating_mul(1000)),
                limit,
            };
            telemetry::logs(&connection, &id, filter, follow).await?;
        }
        SandboxCommand::Metrics { id, since_secs } => {
            telemetry::metrics(&connection, &id, std::time::Duration::from_secs(since_secs))
                .await?;
        }
        SandboxCommand::Kill { id } => {
            connection.api()?.kill(&id).await?;
            report(json, &id, "killed");
        }
        SandboxCommand::Timeout { id, seconds } => {
            connection.api()?.set_timeout(&id, seconds).await?;
            if json {
                println!("{}", json!({ "sandboxID": id, "timeout": seconds }));
            } else {
                println!("{id}: ends in {seconds} s");
            }
        }
    }
    Ok(())
}

/// A field of `sandbox info` as table text: strings bare, objects as `key=value` words.
fn field_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| format!("{k}={}", field_text(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

fn report(json: bool, id: &str, state: &str) {
    if json {
        println!("{}", json!({ "sandboxID": id, "state": state }));
    } else {
        println!("{id}: {state}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_read_by_name_and_others_refused() {
        assert_eq!(
            parse_states("running, paused").unwrap(),
            vec![SandboxState::Running, SandboxState::Paused]
        );
        let refused = parse_states("running,asleep").unwrap_err().to_string();
        assert!(refused.contains("asleep"), "{refused}");
    }

    #[test]
    fn info_fields_read_as_words() {
        assert_eq!(field_text(&json!("x")), "x");
        assert_eq!(field_text(&json!(null)), "");
        assert_eq!(field_text(&json!({"a": "1", "b": true})), "a=1 b=true");
    }
}
