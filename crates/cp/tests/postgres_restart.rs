//! The PostgreSQL store outlives its server's restarts. A cluster of the test's own
//! (`scripts/postgres.sh` with `WRENN_PG_DIR` and `WRENN_PG_PORT`, so the shared test database
//! is not touched) is restarted, cutting every open connection, while writers keep writing
//! through one store. Every write the store acknowledged is there afterwards, read through the
//! same store: nothing lost, and no reopening.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wrenn_cp::store::{SandboxRow, Store, Team};

const WRITERS: usize = 4;
/// How long a writer keeps retrying one row before the store counts as not recovered.
const RECOVERY: Duration = Duration::from_secs(30);

/// A PostgreSQL cluster in a temporary directory, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    /// Starts the cluster; its database URL.
    fn start() -> (Cluster, String) {
        let cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            port: wrenn_testkit::free_port(),
        };
        let started = cluster.script("start");
        let url = String::from_utf8(started.stdout)
            .unwrap()
            .trim()
            .to_string();
        assert!(
            url.starts_with("postgres://"),
            "postgres.sh printed {url:?}"
        );
        (cluster, url)
    }

    /// Runs `scripts/postgres.sh <action>` on this cluster; it must succeed.
    fn script(&self, action: &str) -> std::process::Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/postgres.sh");
        let output = Command::new("bash")
            .arg(script)
            .arg(action)
            .env("WRENN_PG_DIR", self.dir.path())
            .env("WRENN_PG_PORT", self.port.to_string())
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "postgres.sh {action} failed: its errors are above"
        );
        output
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script("stop");
    }
}

fn row(id: &str) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        team_id: "t1".into(),
        template_id: "base".into(),
        started_at_ms: 1,
        end_at_ms: 2,
        envd_version: "0.6.4".into(),
        host_id: "h1".into(),
        ..SandboxRow::default()
    }
}

/// A row a writer wrote, and when the store acknowledged it.
struct Acknowledged {
    id: String,
    at: Instant,
}

/// Writes rows one by one until `stop`, retrying a failed write (the restart's window) until it
/// is acknowledged: the rows acknowledged, and how many writes failed.
async fn write_rows(
    store: Store,
    writer: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Acknowledged>, usize) {
    let mut acknowledged = Vec::new();
    let mut failed = 0;
    for index in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let id = format!("w{writer}-{index}");
        let since = Instant::now();
        loop {
            match store.put_sandbox(row(&id)).await {
                Ok(()) => break,
                Err(error) => {
                    failed += 1;
                    assert!(
                        since.elapsed() < RECOVERY,
                        "{id}: the store did not recover within {RECOVERY:?}: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        acknowledged.push(Acknowledged {
            id,
            at: Instant::now(),
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (acknowledged, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_outlives_a_postgres_restart_under_load() {
    if !nix::unistd::Uid::effective().is_root() {
        wrenn_testkit::missing_prerequisite(
            "the PostgreSQL restart test",
            "not root (it runs a PostgreSQL cluster of its own as the postgres user)",
        );
        return;
    }
    let (cluster, url) = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = Store::open_configured(&PathBuf::from("/nonexistent"), Some(&url))
        .await
        .unwrap();
    store
        .create_team(Team {
            id: "t1".into(),
            name: "restart".into(),
            created_at_ms: 1,
            admin: false,
        })
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| tokio::spawn(write_rows(store.clone(), writer, stop.clone())))
        .collect();
    // Restart while they write: every connection of the pool is cut. They go on writing a while
    // after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.script("restart");
        cluster
    })
    .await
    .unwrap();
    let restarted_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);

    let mut acknowledged = Vec::new();
    let mut failed = 0;
    for writer in writers {
        let (rows, failures) = writer.await.unwrap();
        acknowledged.extend(rows);
        failed += failures;
    }
    let after_restart = acknowledged
        .iter()
        .filter(|row| row.at > restarted_at)
        .count();
    assert!(
        after_restart > 0,
        "writes went on after the restart ({} in all)",
        acknowledged.len()
    );
    eprintln!(
        "{} rows written, {after_restart} after the restart; {failed} writes failed and were retried",
        acknowledged.len()
    );
    let mut acknowledged: Vec<String> = acknowledged.into_iter().map(|row| row.id).collect();

    // The same store, after the restart: every acknowledged row is there, and it still writes.
    let mut stored: Vec<String> = store
        .all_sandboxes()
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect();
    stored.sort();
    acknowledged.sort();
    assert_eq!(stored, acknowledged, "the rows the store acknowledged");
    store.put_sandbox(row("after")).await.unwrap();
    assert!(store.sandbox("after").await.unwrap().is_some());
    drop(cluster);
}
