//! `wrenn audit` and `wrenn events`: a control plane's audit log (every call that changed, or
//! tried to change, state) and its lifecycle events, over the REST API, a page at a time.

use clap::Args;

use crate::connection::Connection;
use crate::output::{print_json, table};

/// The filters both listings take.
#[derive(Debug, Args)]
pub struct LogArgs {
    #[command(flatten)]
    connection: Connection,
    /// Rows after this cursor (the `next` of the previous page).
    #[arg(long)]
    after: Option<i64>,
    /// At most this many rows (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Events: their types (`sandbox.created,sandbox.killed`); audit: methods (`POST,DELETE`).
    #[arg(long = "type")]
    kind: Option<String>,
    /// Events: the id they happened to; audit: the resource (`/sandboxes/<id>`).
    #[arg(long)]
    subject: Option<String>,
    /// Only this actor's (`key:<id>`, `system`).
    #[arg(long)]
    actor: Option<String>,
    /// Only rows at or after this time (RFC 3339, or milliseconds since the epoch).
    #[arg(long)]
    since: Option<String>,
    /// Operators: another team's id, or `all`.
    #[arg(long)]
    team: Option<String>,
}

impl LogArgs {
    fn query(&self) -> String {
        wrenn_api::client::query(&[
            ("after", self.after.map(|after| after.to_string())),
            ("limit", Some(self.limit.to_string())),
            ("type", self.kind.clone()),
            ("subject", self.subject.clone()),
            ("actor", self.actor.clone()),
            ("since", self.since.clone()),
            ("team", self.team.clone()),
        ])
    }
}

/// `wrenn audit`.
pub async fn audit(args: LogArgs) -> anyhow::Result<()> {
    let log = args.connection.api()?.audit(&args.query()).await?;
    if args.connection.json {
        return print_json(&log);
    }
    let rows = log
        .entries
        .iter()
        .map(|entry| {
            vec![
                entry.seq.to_string(),
                entry.timestamp.clone(),
                entry.actor.clone(),
                entry.action.clone(),
                entry.resource.clone(),
                entry.outcome.to_string(),
                entry.client.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "seq", "time", "actor", "action", "resource", "outcome", "client"
            ],
            rows,
        )
    );
    println!("next page: --after {}", log.next);
    Ok(())
}

/// `wrenn events`.
pub async fn events(args: LogArgs) -> anyhow::Result<()> {
    let page = args.connection.api()?.events(&args.query()).await?;
    if args.connection.json {
        return print_json(&page);
    }
    let rows = page
        .events
        .iter()
        .map(|event| {
            vec![
                event.seq.to_string(),
                event.timestamp.clone(),
                event.kind.clone(),
                event.subject.clone(),
                event.actor.clone(),
                event.data.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["seq", "time", "type", "subject", "actor", "data"], rows)
    );
    println!("next page: --after {}", page.next);
    Ok(())
}
