//! The host agent's Prometheus metrics (in `wrenn_http::metrics`' registry): the phases of each
//! create (pull, prepare, restore, ready, init) and the time of pauses, resumes and destroys as
//! histograms, and, read from the manager at each scrape, its sandboxes, slots, warm VMMs and
//! the telemetry buffer.

use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use wrenn_http::metrics::prometheus_client::metrics::counter::Counter;
use wrenn_http::metrics::prometheus_client::metrics::family::Family;
use wrenn_http::metrics::prometheus_client::metrics::gauge::Gauge;
use wrenn_http::metrics::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use wrenn_http::metrics::{Labels, register};

use crate::manager::Manager;

/// Every metric of the agent.
#[derive(Debug)]
struct AgentMetrics {
    create_phases: Family<Labels, Histogram>,
    creates: Family<Labels, Counter>,
    operations: Family<Labels, Histogram>,
    sandboxes: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
    warm_vmms: Gauge,
    memory_committed_mib: Gauge,
    telemetry_entries: Gauge,
}

fn seconds_histogram() -> Histogram {
    // 0.1 ms to about 100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    create_phases: register(
        "wrenn_agent_create_phase_duration_seconds",
        "Time of each phase of a create on this host: pull, prepare, restore, ready, init",
        Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
    ),
    creates: register(
        "wrenn_agent_creates",
        "Sandboxes started on this host, by whether a warm VMM took them",
        Family::default(),
    ),
    operations: register(
        "wrenn_agent_operation_duration_seconds",
        "Time of a pause, resume or destroy on this host",
        Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
    ),
    sandboxes: register(
        "wrenn_agent_sandboxes",
        "Sandboxes on this host by state",
        Family::default(),
    ),
    slots: register(
        "wrenn_agent_slots",
        "Network slots of this host: total, in use, starting",
        Family::default(),
    ),
    warm_vmms: register(
        "wrenn_agent_warm_vmms",
        "VMMs started ahead of creates, waiting",
        Gauge::default(),
    ),
    memory_committed_mib: register(
        "wrenn_agent_memory_committed_mib",
        "Guest memory promised to running sandboxes",
        Gauge::default(),
    ),
    telemetry_entries: register(
        "wrenn_agent_telemetry_buffered",
        "Samples and log lines held for the control plane to collect",
        Gauge::default(),
    ),
});

/// Counts a create's phases.
pub fn observe_create(timings: &wrenn_agent_api::CreateTimings) {
    let phases = [
        ("pull", timings.pull),
        ("prepare", timings.prepare),
        ("restore", timings.restore),
        ("ready", timings.ready),
        ("init", timings.init),
    ];
    for (phase, took) in phases {
        METRICS
            .create_phases
            .get_or_create(&vec![("phase", phase.into())])
            .observe(took.as_secs_f64());
    }
    METRICS
        .creates
        .get_or_create(&vec![("warm", timings.warm.to_string())])
        .inc();
}

/// Times an operation (`pause`, `resume`, `destroy`) that succeeded.
pub fn observe_operation(operation: &'static str, took: Duration) {
    METRICS
        .operations
        .get_or_create(&vec![("operation", operation.into())])
        .observe(took.as_secs_f64());
}

/// Registers the metrics and refreshes the manager's gauges at each scrape, while it lives.
pub fn watch(manager: &Arc<Manager>) {
    LazyLock::force(&METRICS);
    wrenn_http::metrics::register_request_metrics();
    let manager: Weak<Manager> = Arc::downgrade(manager);
    wrenn_http::metrics::on_scrape(move || {
        let Some(manager) = manager.upgrade() else {
            return;
        };
        let report = crate::join::report(&manager);
        let count = |value: u32| i64::from(value);
        for (state, value) in [
            ("running", report.sandboxes_running),
            ("paused", report.sandboxes_paused),
        ] {
            METRICS
                .sandboxes
                .get_or_create(&vec![("state", state.into())])
                .set(count(value));
        }
        for (state, value) in [
            ("total", report.slots_total),
            ("in_use", report.slots_in_use),
            ("starting", report.slots_starting),
        ] {
            METRICS
                .slots
                .get_or_create(&vec![("state", state.into())])
                .set(count(value));
        }
        METRICS
            .memory_committed_mib
            .set(i64::try_from(report.memory_committed_mib).unwrap_or(i64::MAX));
        METRICS
            .warm_vmms
            .set(i64::try_from(manager.warm_vmms()).unwrap_or(i64::MAX));
        METRICS
            .telemetry_entries
            .set(i64::try_from(manager.telemetry.buffered()).unwrap_or(i64::MAX));
    });
}
