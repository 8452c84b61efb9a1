//! `wrenn-bench events`: what recording events costs and how notification channels keep up.
//! On a real SQLite store in a temporary directory: the time one event takes to record and
//! publish (what it adds to a create, a pause, …), with no channel and with a webhook channel
//! (whose outbox row is written in the same transaction), and an audit row's; then a local
//! webhook receiver fed by the real deliverer: events published at a steady rate, all of
//! them expected, in order, with the lag from publication to arrival; and the deliverer's
//! ceiling (a burst published at once, the time until the last arrives).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wrenn_cp::ControlPlane;
use wrenn_cp::channels::{ChannelPolicy, Channels, SecretBox};
use wrenn_cp::events::EventKind;
use wrenn_cp::store::{AuditRow, Role, Store, Team};

use crate::report::{ms, quantile, table};

#[derive(Debug, Args)]
pub struct EventsBenchArgs {
    /// Events recorded one after another for the publication figures (each case).
    #[arg(long, default_value_t = 2000)]
    publishes: usize,
    /// The steady rate of the delivery run, events a second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long the delivery run publishes.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events published at once for the deliverer's ceiling.
    #[arg(long, default_value_t = 5000)]
    burst: usize,
    #[arg(long)]
    json: bool,
}

const TEAM: &str = "bench";

/// What the receiver saw: each event's `data.n` in arrival order, with its arrival.
#[derive(Debug, Default)]
struct Received {
    arrivals: Vec<(u64, Instant)>,
}

/// Sorted milliseconds of `samples`.
fn sorted_ms(samples: &[Duration]) -> Vec<f64> {
    let mut values: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    values.sort_by(f64::total_cmp);
    values
}

async fn publish_n(store: &Store, count: usize, first: u64) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(count);
    for n in first..first + count as u64 {
        let started = Instant::now();
        store
            .publish(
                EventKind::SandboxCreated,
                TEAM,
                "bench-sandbox",
                json!({ "n": n }),
            )
            .await;
        samples.push(started.elapsed());
    }
    samples
}

/// Waits until the receiver has `count` events (or `deadline` passes): whether it has.
async fn wait_for(received: &Mutex<Received>, count: usize, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if received.lock().expect("receiver lock").arrivals.len() >= count {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn run(args: EventsBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("cp.db"))?;
    let team = Team {
        id: TEAM.into(),
        name: TEAM.into(),
        created_at_ms: 0,
        admin: false,
    };
    store.create_team(team).await?;

    // Recording alone.
    let bare = publish_n(&store, args.publishes, 0).await;
    let mut audit = Vec::with_capacity(args.publishes);
    for _ in 0..args.publishes {
        let row = AuditRow {
            id: wrenn_cp::auth::random_uuid()?,
            at_ms: wrenn_core::now_ms(),
            team_id: TEAM.into(),
            actor: "key:bench".into(),
            action: "POST /sandboxes".into(),
            resource: "bench".into(),
            outcome: 201,
            client: "127.0.0.1".into(),
            ..Default::default()
        };
        let started = Instant::now();
        store.add_audit(row).await?;
        audit.push(started.elapsed());
    }

    // A webhook receiver on the loopback, and a channel to it.
    let received = Arc::new(Mutex::new(Received::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let sink = received.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let n = event["data"]["n"].as_u64().unwrap_or(u64::MAX);
                sink.lock()
                    .expect("receiver lock")
                    .arrivals
                    .push((n, Instant::now()));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let policy = ChannelPolicy {
        allow_private: true,
        ..ChannelPolicy::default()
    };
    let mut key = [0u8; 32];
    wrenn_core::random::fill(&mut key)?;
    let channels = Channels {
        secrets: SecretBox::from_key(key),
        policy: policy.clone(),
    };
    let fleet = wrenn_cp::fleet::Fleet::load(
        &store,
        wrenn_cp::fleet::FleetConfig::default(),
        Box::new(wrenn_cp::fleet::LeastLoaded),
        None,
    )
    .await?;
    let (plane, _wake) = ControlPlane::new(store.clone(), fleet, None, true);
    let plane = plane.with_channels(channels.clone());
    let new = wrenn_cp::channels::manage::NewChannel {
        name: "bench".into(),
        kind: "webhook".into(),
        url,
        ..Default::default()
    };
    plane
        .create_channel(TEAM, Role::Owner, new)
        .await
        .context("making the bench's channel")?;

    // Recording with a channel (the outbox row in the same transaction); delivered after.
    let first = args.publishes as u64;
    let with_channel = publish_n(&store, args.publishes, first).await;
    let shutdown = CancellationToken::new();
    let deliverer = tokio::spawn(wrenn_cp::channels::run_deliveries(
        store.clone(),
        channels.secrets.clone(),
        policy,
        shutdown.clone(),
    ));
    anyhow::ensure!(
        wait_for(&received, args.publishes, Duration::from_secs(120)).await,
        "the deliverer did not deliver the {} events recorded before it started",
        args.publishes
    );

    // A steady rate: every event expected, in order; the lag from publication to arrival.
    let steady_count = (args.rate as u64 * args.seconds) as usize;
    let steady_first = first + args.publishes as u64;
    let mut published: HashMap<u64, Instant> = HashMap::with_capacity(steady_count);
    let tick = Duration::from_millis(10);
    let per_tick = (args.rate as f64 * tick.as_secs_f64()).max(1.0) as usize;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut n = steady_first;
    while ((n - steady_first) as usize) < steady_count {
        ticker.tick().await;
        for _ in 0..per_tick.min(steady_count - (n - steady_first) as usize) {
            published.insert(n, Instant::now());
            store
                .publish(
                    EventKind::SandboxCreated,
                    TEAM,
                    "bench-sandbox",
                    json!({ "n": n }),
                )
                .await;
            n += 1;
        }
    }
    let publishing = started.elapsed();
    let before = args.publishes;
    let all = wait_for(&received, before + steady_count, Duration::from_secs(120)).await;
    let (lags, in_order, delivered) = {
        let received = received.lock().expect("receiver lock");
        let steady: Vec<&(u64, Instant)> = received.arrivals[args.publishes..]
            .iter()
            .filter(|(n, _)| *n >= steady_first)
            .collect();
        let in_order = received
            .arrivals
            .windows(2)
            .all(|pair| pair[0].0 < pair[1].0);
        let lags: Vec<Duration> = steady
            .iter()
            .filter_map(|(n, at)| published.get(n).map(|sent| at.duration_since(*sent)))
            .collect();
        (lags, in_order, steady.len())
    };

    // The ceiling: a burst at once, the time until its last event arrives.
    let burst_first = n;
    for n in burst_first..burst_first + args.burst as u64 {
        store
            .publish(
                EventKind::SandboxCreated,
                TEAM,
                "bench-sandbox",
                json!({ "n": n }),
            )
            .await;
    }
    let burst_started = Instant::now();
    let expected = before + steady_count + args.burst;
    let burst_all = wait_for(&received, expected, Duration::from_secs(300)).await;
    let burst_time = burst_started.elapsed();
    shutdown.cancel();
    let _ = deliverer.await;

    let (bare, with_channel, audit, lags) = (
        sorted_ms(&bare),
        sorted_ms(&with_channel),
        sorted_ms(&audit),
        sorted_ms(&lags),
    );
    let ceiling = args.burst as f64 / burst_time.as_secs_f64();
    let steady_rate = steady_count as f64 / publishing.as_secs_f64();
    if args.json {
        let figures = json!({
            "publish_ms": {"p50": quantile(&bare, 0.5), "p99": quantile(&bare, 0.99)},
            "publish_with_channel_ms": {"p50": quantile(&with_channel, 0.5), "p99": quantile(&with_channel, 0.99)},
            "audit_row_ms": {"p50": quantile(&audit, 0.5), "p99": quantile(&audit, 0.99)},
            "steady": {
                "events": steady_count, "published_per_s": steady_rate, "delivered": delivered,
                "all_delivered": all, "in_order": in_order,
                "lag_ms": {"p50": quantile(&lags, 0.5), "p99": quantile(&lags, 0.99)},
            },
            "burst": {"events": args.burst, "all_delivered": burst_all, "per_s": ceiling},
        });
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        let mut out = table(vec!["figure", "p50", "p99"]);
        out.add_row(vec![
            format!("an event recorded and published ({} runs)", args.publishes),
            ms(quantile(&bare, 0.5), 3),
            ms(quantile(&bare, 0.99), 3),
        ]);
        out.add_row(vec![
            "the same, with a webhook channel (outbox row)".to_string(),
            ms(quantile(&with_channel, 0.5), 3),
            ms(quantile(&with_channel, 0.99), 3),
        ]);
        out.add_row(vec![
            "an audit row".to_string(),
            ms(quantile(&audit, 0.5), 3),
            ms(quantile(&audit, 0.99), 3),
        ]);
        out.add_row(vec![
            format!(
                "{steady_count} events at {steady_rate:.0}/s to a local webhook: {delivered} delivered, {}, lag",
                if in_order { "in order" } else { "OUT OF ORDER" }
            ),
            ms(quantile(&lags, 0.5), 1),
            ms(quantile(&lags, 0.99), 1),
        ]);
        out.add_row(vec![
            format!(
                "a burst of {} events: delivered {} at",
                args.burst,
                if burst_all { "all" } else { "NOT all" }
            ),
            format!("{ceiling:.0}/s"),
            String::new(),
        ]);
        println!("{out}");
    }
    anyhow::ensure!(
        all && burst_all && in_order && delivered == steady_count,
        "events were lost or reordered"
    );
    Ok(())
}
