//! `wrenn-bench replicas`: how long control plane replicas take to hand a duty over when its
//! holder dies. Three real `wrenn server --replica` processes on one PostgreSQL database (a
//! schema of their own); each round SIGKILLs the replica that holds the lifecycle lease (at a
//! point of its hold spread evenly over a lease life, round after round) and
//! times, from the kill, until another replica's `/metrics` says it runs the lifecycle (asked
//! every 10 ms of each survivor), then starts the killed replica again. The handover is bounded
//! by the lease's life (renewals every third of it: a kill lands between two and three thirds
//! before the lease would lapse) plus the survivors' poll of the lease (100 ms).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use wrenn_http::client::{ClientOptions, reqwest};

use crate::report::{median, ms, quantile, table};

#[derive(Debug, Args)]
pub struct ReplicasBenchArgs {
    /// Kills of the lifecycle's holder measured.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// The replicas' lease life, in milliseconds (`wrenn server --lease-life-ms`).
    #[arg(long, default_value_t = 10_000)]
    lease_life_ms: u64,
    /// The PostgreSQL the replicas share (a schema of this run's is made in it).
    #[arg(long, env = "WRENN_TEST_DATABASE_URL")]
    database_url: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One `wrenn server --replica` of the benchmark.
struct Replica {
    child: Option<Child>,
    data: tempfile::TempDir,
    api_port: u16,
}

impl Replica {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The replicas, their shared directory and database.
struct Replicas {
    replicas: Vec<Replica>,
    shared: tempfile::TempDir,
    database_url: String,
    join_token: String,
    lease_life_ms: u64,
    http: reqwest::Client,
}

impl Replicas {
    /// Starts replica `index` (again, on its data directory, when it ran before).
    async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let wrenn = crate::wrenn_binary()?;
        let replica = &mut self.replicas[index];
        replica.api_port = crate::free_port()?;
        let proxy_port = crate::free_port()?;
        let child = Command::new(wrenn)
            .args(["server", "--replica", "--no-internet", "--data-dir"])
            .arg(replica.data.path())
            .args(["--api-listen", &format!("127.0.0.1:{}", replica.api_port)])
            .args(["--proxy-listen", &format!("127.0.0.1:{proxy_port}")])
            .arg("--shared-dir")
            .arg(self.shared.path().join("cp"))
            .args(["--lease-life-ms", &self.lease_life_ms.to_string()])
            .env("DATABASE_URL", &self.database_url)
            .env("WRENN_JOIN_TOKEN", &self.join_token)
            .env("WRENN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting wrenn server --replica")?;
        replica.child = Some(child);
        let url = format!("{}/health", replica.url());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = self.http.get(&url).send().await
                && response.status() == 204
            {
                return Ok(());
            }
            let replica = &mut self.replicas[index];
            if let Some(status) = replica.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                anyhow::bail!("a replica exited while starting: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "a replica did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether replica `index` runs the lifecycle now.
    async fn holds_lifecycle(&self, index: usize) -> bool {
        let replica = &self.replicas[index];
        if replica.child.is_none() {
            return false;
        }
        let url = format!("{}/metrics", replica.url());
        match self.http.get(&url).send().await {
            Ok(response) => response
                .text()
                .await
                .is_ok_and(|text| text.contains("wrenn_duties_held{duty=\"lifecycle\"} 1")),
            Err(_) => false,
        }
    }

    /// The replica that runs the lifecycle, once one does.
    async fn lifecycle_holder(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_millis(self.lease_life_ms * 3 + 10_000);
        loop {
            for index in 0..self.replicas.len() {
                if self.holds_lifecycle(index).await {
                    return Ok(index);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no replica took the lifecycle");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Makes a schema of this run's in `url`: the URL that uses it.
async fn schema_of_this_run(url: &str) -> anyhow::Result<(String, String)> {
    let schema = format!("bench_replicas_{}", std::process::id());
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the PostgreSQL of --database-url")?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok((
        format!("{url}{separator}options=-csearch_path%3D{schema}"),
        schema,
    ))
}

async fn drop_schema(url: &str, schema: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
    }
}

pub async fn run(args: ReplicasBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.kills > 0, "--kills must be at least 1");
    let (database_url, schema) = schema_of_this_run(&args.database_url).await?;
    let outcome = measure(&args, database_url).await;
    drop_schema(&args.database_url, &schema).await;
    let handovers = outcome?;
    let mut sorted = handovers.clone();
    sorted.sort_by(f64::total_cmp);
    let life = args.lease_life_ms as f64;
    if args.json {
        let figures = json!({
            "leaseLifeMs": args.lease_life_ms,
            "kills": handovers.len(),
            "handoverMs": {
                "p50": median(&handovers),
                "p90": quantile(&sorted, 0.9),
                "min": sorted[0],
                "max": sorted[sorted.len() - 1],
            },
        });
        println!("{}", serde_json::to_string_pretty(&figures)?);
        return Ok(());
    }
    let mut report = table([
        "lifecycle handover after SIGKILL",
        "p50",
        "p90",
        "min",
        "max",
    ]);
    report.add_row([
        format!(
            "{} kills, lease life {} ms",
            handovers.len(),
            args.lease_life_ms
        ),
        ms(median(&handovers), 0),
        ms(quantile(&sorted, 0.9), 0),
        ms(sorted[0], 0),
        ms(sorted[sorted.len() - 1], 0),
    ]);
    println!("{report}");
    println!(
        "median handover / lease life: {:.2}",
        median(&handovers) / life
    );
    Ok(())
}

/// The handovers, in milliseconds.
async fn measure(args: &ReplicasBenchArgs, database_url: String) -> anyhow::Result<Vec<f64>> {
    let http = wrenn_http::client::client(ClientOptions {
        connect_timeout: Some(Duration::from_secs(1)),
        keep_idle: true,
        http2_prior_knowledge: false,
    });
    let mut replicas = Replicas {
        replicas: Vec::new(),
        shared: tempfile::tempdir()?,
        database_url,
        join_token: format!("bench-join-{}", std::process::id()),
        lease_life_ms: args.lease_life_ms,
        http,
    };
    for index in 0..3 {
        replicas.replicas.push(Replica {
            child: None,
            data: tempfile::tempdir()?,
            api_port: 0,
        });
        // The first makes the shared secrets; the others start after it.
        replicas.start(index).await?;
    }
    let mut handovers = Vec::new();
    for kill in 0..args.kills {
        let holder = replicas.lifecycle_holder().await?;
        // Deaths come at any point of a hold: the kills are spread evenly over a lease life
        // after the holder was found (a holder found just after it took the lease would
        // otherwise always die at the start of a renewal round).
        let offset = Duration::from_millis(args.lease_life_ms * ((kill * 7) % 10) as u64 / 10);
        tokio::time::sleep(offset).await;
        anyhow::ensure!(
            replicas.holds_lifecycle(holder).await,
            "the lifecycle moved while it waited"
        );
        eprintln!(
            "kill {} of {}: the lifecycle's replica ...",
            kill + 1,
            args.kills
        );
        let killed_at = Instant::now();
        if let Some(mut child) = replicas.replicas[holder].child.take() {
            child.kill()?;
            child.wait()?;
        }
        let taken_by = replicas.lifecycle_holder().await?;
        let took = killed_at.elapsed();
        anyhow::ensure!(
            taken_by != holder,
            "the killed replica still holds the lease"
        );
        handovers.push(took.as_secs_f64() * 1000.0);
        replicas.start(holder).await?;
    }
    Ok(handovers)
}
