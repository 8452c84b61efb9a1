//! The control plane's Prometheus metrics (in `wrenn_http::metrics`' registry): creates by
//! outcome and their latency, sandboxes by state and hosts by state (read from the store and
//! the fleet at each scrape, [`refresh`]), store calls' latency by backend, and what the
//! telemetry collector brings, and which background duties this process runs (replicas). The HTTP servers' request metrics are `wrenn_http`'s.

use std::sync::LazyLock;
use std::time::Duration;

use wrenn_http::metrics::prometheus_client::metrics::counter::Counter;
use wrenn_http::metrics::prometheus_client::metrics::family::Family;
use wrenn_http::metrics::prometheus_client::metrics::gauge::Gauge;
use wrenn_http::metrics::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use wrenn_http::metrics::{Labels, register};

use crate::service::{ControlPlane, Error};

/// Every metric of the control plane.
#[derive(Debug)]
pub struct PlaneMetrics {
    creates: Family<Labels, Counter>,
    create_seconds: Histogram,
    sandboxes: Family<Labels, Gauge>,
    hosts: Family<Labels, Gauge>,
    store_seconds: Family<Labels, Histogram>,
    telemetry_entries: Family<Labels, Counter>,
    telemetry_gaps: Counter,
    duties: Family<Labels, Gauge>,
}

fn seconds_histogram() -> Histogram {
    // 0.1 ms to about 100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

static METRICS: LazyLock<PlaneMetrics> = LazyLock::new(|| PlaneMetrics {
    creates: register(
        "wrenn_sandbox_creates",
        "Sandbox creates by outcome: created, refused (the request, a quota, a limit) or failed (no host could)",
        Family::default(),
    ),
    create_seconds: register(
        "wrenn_sandbox_create_duration_seconds",
        "Time to a sandbox created, placement and the host's work included",
        seconds_histogram(),
    ),
    sandboxes: register(
        "wrenn_sandboxes",
        "Sandboxes by state, of every team",
        Family::default(),
    ),
    hosts: register(
        "wrenn_hosts",
        "Hosts of the fleet by state",
        Family::default(),
    ),
    store_seconds: register(
        "wrenn_store_call_duration_seconds",
        "Time of a store call, by backend",
        Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
    ),
    telemetry_entries: register(
        "wrenn_telemetry_entries",
        "Sandbox samples and log lines collected from the hosts, by kind",
        Family::default(),
    ),
    telemetry_gaps: register(
        "wrenn_telemetry_gaps",
        "Collections that found a host had dropped entries before they were read",
        Counter::default(),
    ),
    duties: register(
        "wrenn_duties_held",
        "Background duties this process runs now (1) or leaves to another replica (0)",
        Family::default(),
    ),
});

/// Registers every metric now, so a scrape before the first create shows them at 0.
pub fn register_all() {
    let metrics = &*METRICS;
    for outcome in ["created", "refused", "failed"] {
        metrics
            .creates
            .get_or_create(&vec![("outcome", outcome.into())])
            .inc_by(0);
    }
    wrenn_http::metrics::register_request_metrics();
}

/// Counts a create's outcome and, when it made a sandbox, its time.
pub fn count_create<T>(result: &Result<T, Error>, took: Duration) {
    let outcome = match result {
        Ok(_) => {
            METRICS.create_seconds.observe(took.as_secs_f64());
            "created"
        }
        Err(
            Error::NoCapacity(_)
            | Error::HostDown(_)
            | Error::Host { .. }
            | Error::HostTimedOut { .. }
            | Error::Store(_)
            | Error::Internal(_),
        ) => "failed",
        Err(_) => "refused",
    };
    METRICS
        .creates
        .get_or_create(&vec![("outcome", outcome.into())])
        .inc();
}

/// Times a store call of `backend` (`sqlite`, `postgres`).
pub fn observe_store_call(backend: &'static str, took: Duration) {
    METRICS
        .store_seconds
        .get_or_create(&vec![("backend", backend.into())])
        .observe(took.as_secs_f64());
}

/// Counts what a telemetry collection brought.
pub fn count_telemetry(samples: usize, lines: usize, gap: bool) {
    let count = |kind: &str, n: usize| {
        METRICS
            .telemetry_entries
            .get_or_create(&vec![("kind", kind.into())])
            .inc_by(n as u64);
    };
    count("sample", samples);
    count("log_line", lines);
    if gap {
        METRICS.telemetry_gaps.inc();
    }
}

/// Sets the gauges read from the store and the fleet (at each scrape).
pub async fn refresh(plane: &ControlPlane) -> Result<(), Error> {
    let counts = plane.store.sandbox_counts().await?;
    METRICS.sandboxes.clear();
    for state in wrenn_api::SandboxState::ALL {
        let count = counts
            .iter()
            .find(|(name, _)| name == state.as_str())
            .map_or(0, |(_, count)| *count);
        METRICS
            .sandboxes
            .get_or_create(&vec![("state", state.as_str().into())])
            .set(count);
    }
    METRICS.hosts.clear();
    for state in ["up", "down"] {
        METRICS
            .hosts
            .get_or_create(&vec![("state", state.into())])
            .set(0);
    }
    for host in plane.fleet.hosts() {
        let state = if host.is_up() { "up" } else { "down" };
        METRICS
            .hosts
            .get_or_create(&vec![("state", state.into())])
            .inc();
    }
    for duty in crate::replica::Duty::ALL {
        METRICS
            .duties
            .get_or_create(&vec![("duty", duty.lease_name().into())])
            .set(i64::from(plane.holds(duty)));
    }
    Ok(())
}
