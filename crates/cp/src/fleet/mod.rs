//! The fleet of host agents: how the control plane reaches each one (the agent embedded in its
//! own process, or a separate agent over its Connect API and sandbox proxy), what each last
//! reported of its capacity, where a new sandbox goes ([`Placement`]), which hosts are down, and
//! the reconcile pass that makes the store agree with what each agent really runs.
//!
//! Agents join with the fleet's join token (`wrenn.agent.v1.HostRegistry/Register`, over
//! Connect) and then heartbeat their [`HostReport`] (`HostRegistry/Heartbeat`) with a token of
//! their own. A host silent for longer than [`FleetConfig::down_after`] is marked down and its
//! sandboxes `lost`; when it heartbeats again it is up, and the reconcile pass gives back the
//! sandboxes it still runs.
//!
//! This module is the registry (the hosts, their templates, routes to sandboxes); [`host`] is one
//! host and its agent's calls, [`placement`] where a sandbox goes, [`join`] registration and
//! heartbeats, [`reconcile`] the reconcile pass.

mod host;
mod join;
pub mod pki;
mod placement;
mod reconcile;
mod routes;

pub use host::Host;
pub use placement::{BinPack, Candidate, LeastLoaded, Placed, Placement, placement};
pub use reconcile::{Reconciled, reconcile_host};
use routes::{CachedRoute, RouteCache};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wrenn_agent_api::join::{
    HostReport, IDENTITY_FILE, RegisterRequest, RegisterResponse, TemplateReport,
};
use wrenn_agent_api::{
    CreateOptions, GuestRoute, HostAgent, HostAgentError, RemoteAgent, SandboxState, SandboxSummary,
};

use crate::Error;
use crate::auth;
use crate::busy::{Busy, Claim};
use crate::deadlines;
use crate::store::SandboxState as RowState;
use crate::store::{EMBEDDED_API_URL, HostRow, HostState, SandboxRow, Store};

/// The host a request on the fleet's TLS listener comes from: the host id its connection's
/// verified certificate names (none: no certificate, or not a host's).
#[derive(Debug, Clone, Default)]
pub struct FleetPeer(pub Option<String>);

/// The id of the agent embedded in the control plane's process.
pub const EMBEDDED_HOST_ID: &str = "local";

/// Timings of the fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The token agents join with; without one, only the embedded agent serves.
    pub join_token: Option<String>,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// A host silent this long is down.
    pub down_after: Duration,
    /// How often every host's sandboxes are compared with the store.
    pub reconcile_interval: Duration,
    /// A sandbox an agent runs that the store does not know is destroyed once it is this old
    /// (younger ones may be creates whose row is being written).
    pub orphan_grace: Duration,
    /// The fleet's certificate authorities: agents are reached (and registered) over mutual
    /// TLS with them; without them, no agent in another process is.
    pub authority: Option<Arc<pki::FleetAuthority>>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            join_token: None,
            heartbeat_interval: Duration::from_secs(2),
            down_after: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(60),
            authority: None,
        }
    }
}

/// The fleet.
#[derive(Debug)]
pub struct Fleet {
    hosts: RwLock<HashMap<String, Arc<Host>>>,
    placement: Box<dyn Placement>,
    pub config: FleetConfig,
    /// Which host each running sandbox is on, and its traffic token, for the proxy (filled
    /// from the store on demand).
    routes: RouteCache,
    /// Serialises placements, so two creates do not both take a host's last slot.
    placing: Mutex<()>,
    /// Serialises registrations (and forgetting), so two agents cannot both claim a name.
    registering: tokio::sync::Mutex<()>,
    /// Sandboxes being created: on their host already, not in the store yet. Reconcile leaves
    /// them alone however long the create takes (an orphan grace alone would not: a create under
    /// load can outlast it).
    creating: Busy,
}

use wrenn_core::now_ms;

impl Fleet {
    /// Marks `sandbox_id` as being created until the claim goes (hold it past the row's
    /// insert).
    pub fn creating(&self, sandbox_id: &str) -> Option<Claim> {
        self.creating.claim(sandbox_id)
    }

    /// The fleet as the store has it; the embedded agent, if any, becomes host `local`. Hosts
    /// are given a full `down_after` to heartbeat before they are marked down. A stored embedded
    /// host with no agent in this process is down at once.
    pub async fn load(
        store: &Store,
        config: FleetConfig,
        placement: Box<dyn Placement>,
        embedded: Option<Arc<dyn HostAgent>>,
    ) -> Result<Fleet, crate::store::StoreError> {
        let fleet = Fleet {
            hosts: RwLock::new(HashMap::new()),
            placement,
            config,
            routes: RouteCache::default(),
            placing: Mutex::new(()),
            registering: tokio::sync::Mutex::new(()),
            creating: Busy::default(),
        };
        for row in store.hosts().await? {
            if row.api_url == EMBEDDED_API_URL {
                if embedded.is_none() && row.state == HostState::Up {
                    fleet.mark_down(store, row).await?;
                }
                continue;
            }
            match fleet.remote_agent(&row).await {
                Ok(agent) => fleet.insert(row, Arc::new(agent), false),
                Err(error) => {
                    tracing::warn!(host = %row.name, %error, "cannot reach a stored host");
                    if row.state == HostState::Up {
                        fleet.mark_down(store, row).await?;
                    }
                }
            }
        }
        if let Some(agent) = embedded {
            let now = now_ms();
            let row = HostRow {
                id: EMBEDDED_HOST_ID.into(),
                name: nix::unistd::gethostname()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "local".into()),
                api_url: EMBEDDED_API_URL.into(),
                proxy_address: String::new(),
                agent_token: String::new(),
                heartbeat_hash: String::new(),
                state: HostState::Up,
                report: agent.report_in_process().unwrap_or_default(),
                last_heartbeat_ms: now,
                registered_at_ms: now,
                identity_hash: String::new(),
            };
            store.put_host(row.clone()).await?;
            fleet.insert(row, agent, true);
        }
        Ok(fleet)
    }

    fn insert(&self, row: HostRow, agent: Arc<dyn HostAgent>, in_process: bool) {
        let id = row.id.clone();
        let host = Arc::new(Host {
            row: Mutex::new(row),
            agent,
            in_process,
            inflight: AtomicU32::new(0),
            last_seen: Mutex::new(Instant::now()),
        });
        self.hosts.write().expect("fleet lock").insert(id, host);
    }

    pub fn host(&self, id: &str) -> Option<Arc<Host>> {
        self.hosts.read().expect("fleet lock").get(id).cloned()
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        let mut hosts: Vec<_> = self
            .hosts
            .read()
            .expect("fleet lock")
            .values()
            .cloned()
            .collect();
        hosts.sort_by_cached_key(|h| h.row().name);
        hosts
    }

    pub fn placement_name(&self) -> &'static str {
        self.placement.name()
    }

    /// The templates up hosts have (the first host's report of each).
    pub fn templates(&self) -> Vec<TemplateReport> {
        let mut seen = HashSet::new();
        let mut templates = Vec::new();
        for host in self.hosts() {
            if !host.is_up() {
                continue;
            }
            for template in host.row().report.templates {
                if seen.insert(template.template_id.clone()) {
                    templates.push(template);
                }
            }
        }
        templates.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        templates
    }

    /// Keeps each sandbox's route for `life` at most (replicas: another's pause or kill is
    /// not forgotten in this process).
    pub fn set_route_life(&mut self, life: Duration) {
        self.routes.set_life(life);
    }

    /// Forgets where a sandbox runs (it was paused, killed or lost): call it once the store
    /// says so, so that no route read before the change outlives it.
    pub fn forget(&self, sandbox_id: &str) {
        self.routes.forget(sandbox_id);
    }

    /// Holds a sandbox's route out of the proxy's cache for the length of a change (a pause,
    /// a kill): take it before the host is asked, drop it once the store has the change.
    pub fn hold_route(&self, sandbox_id: &str) -> routes::RouteHold<'_> {
        self.routes.hold(sandbox_id)
    }

    /// How to reach `port` of a sandbox running on an up host, and what its proxying needs
    /// (its traffic token, its host mask).
    pub async fn route(
        &self,
        store: &Store,
        sandbox_id: &str,
        port: u16,
    ) -> Option<(GuestRoute, CachedRoute)> {
        let route = match self.routes.get(sandbox_id) {
            Ok(route) => route,
            Err(miss) => {
                let row = store.sandbox(sandbox_id).await.ok()??;
                if row.state != RowState::Running {
                    return None;
                }
                let route = CachedRoute {
                    host_id: row.host_id,
                    traffic_token: row.traffic_access_token,
                    host_mask: row.network.mask_request_host,
                };
                self.routes.keep(sandbox_id, route.clone(), miss);
                route
            }
        };
        let host = self.host(&route.host_id)?;
        if !host.is_up() {
            return None;
        }
        Some((host.route(sandbox_id, port)?, route))
    }

    /// The host of a sandbox row, if it is up (else a 503 naming it).
    pub fn up_host(&self, row: &SandboxRow) -> Result<Arc<Host>, Error> {
        match self.host(&row.host_id) {
            Some(host) if host.is_up() => Ok(host),
            Some(host) => Err(Error::HostDown(format!(
                "sandbox \"{}\" is on host {}, which is down",
                row.id,
                host.row().name
            ))),
            None => Err(Error::HostDown(format!(
                "sandbox \"{}\" is on host {}, which the fleet does not know",
                row.id, row.host_id
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, total: u32, used: u32, memory: u64) -> Candidate {
        Candidate {
            host_id: id.into(),
            slots_total: total,
            slots_used: used,
            memory_available_mib: memory,
        }
    }

    #[test]
    fn least_loaded_takes_the_emptiest_share_then_the_most_memory() {
        let hosts = [
            candidate("a", 10, 5, 1000),
            candidate("b", 100, 10, 1000),
            candidate("c", 100, 10, 4000),
        ];
        assert_eq!(LeastLoaded.choose(&hosts), 2);
        assert_eq!(LeastLoaded.choose(&hosts[..2]), 1);
    }

    #[test]
    fn binpack_takes_the_fullest_host() {
        let hosts = [candidate("a", 10, 5, 1000), candidate("b", 100, 10, 1000)];
        assert_eq!(BinPack.choose(&hosts), 0);
    }

    fn fleet_of(hosts: &[(&str, &str, u32, u32, u64)]) -> Fleet {
        fleet_with_disk(
            &hosts
                .iter()
                .map(|&(name, state, total, used, memory)| {
                    (name, state, total, used, memory, 1 << 40)
                })
                .collect::<Vec<_>>(),
        )
    }

    fn fleet_with_disk(hosts: &[(&str, &str, u32, u32, u64, u64)]) -> Fleet {
        fleet_with(hosts, wrenn_agent_api::fake::template("base", 512))
    }

    /// Hosts (name, state, slots, slots in use, MiB of memory, bytes of disk free) that have
    /// `template`.
    fn fleet_with(
        hosts: &[(&str, &str, u32, u32, u64, u64)],
        template: wrenn_agent_api::join::TemplateReport,
    ) -> Fleet {
        let fleet = Fleet {
            hosts: RwLock::new(HashMap::new()),
            placement: Box::new(LeastLoaded),
            config: FleetConfig::default(),
            routes: RouteCache::default(),
            placing: Mutex::new(()),
            registering: tokio::sync::Mutex::new(()),
            creating: Busy::default(),
        };
        // The agents are never called: any fleet's TLS settings do.
        let dir = tempfile::tempdir().unwrap();
        let authority =
            pki::FleetAuthority::open(dir.path(), pki::DEFAULT_HOST_CERTIFICATE_LIFE).unwrap();
        for (name, state, total, used, memory_mib, disk_bytes) in hosts {
            let row = HostRow {
                id: format!("id-{name}"),
                name: name.to_string(),
                api_url: "http://127.0.0.1:1".into(),
                proxy_address: "127.0.0.1:1".into(),
                agent_token: "t".into(),
                heartbeat_hash: String::new(),
                state: HostState::from_stored(state),
                report: HostReport {
                    slots_total: *total,
                    slots_in_use: *used,
                    memory_available_bytes: memory_mib << 20,
                    disk_available_bytes: *disk_bytes,
                    templates: vec![template.clone()],
                    ..Default::default()
                },
                last_heartbeat_ms: 0,
                registered_at_ms: 0,
                identity_hash: String::new(),
            };
            let agent = RemoteAgent::new(
                "https://127.0.0.1:1",
                "127.0.0.1:1".parse().unwrap(),
                "t",
                Duration::from_secs(1),
                authority.host_tls(name).unwrap(),
            )
            .unwrap();
            fleet.insert(row, Arc::new(agent), false);
        }
        fleet
    }

    #[test]
    fn placement_skips_down_full_and_excluded_hosts_and_counts_creates_in_flight() {
        let fleet = fleet_of(&[
            ("a", "up", 4, 3, 8192),
            ("b", "up", 4, 0, 8192),
            ("c", "down", 4, 0, 8192),
            ("d", "up", 4, 0, 100),
        ]);
        let first = fleet.place("base", None, &[]).unwrap();
        assert_eq!(first.host.row().name, "b");
        let unknown = fleet.place("nope", None, &[]).unwrap_err();
        assert!(matches!(unknown, Error::TemplateNotFound(ref t) if t == "nope"));
        // b holds 1 in flight of 4; a has 3 of 4: b again, until its in-flight creates fill it.
        let mut held = vec![first];
        for _ in 0..2 {
            let placed = fleet.place("base", None, &[]).unwrap();
            assert_eq!(placed.host.row().name, "b");
            held.push(placed);
        }
        let fourth = fleet.place("base", None, &[]).unwrap();
        assert_eq!(
            fourth.host.row().name,
            "a",
            "both 3/4 full: a has more memory free"
        );
        held.push(fourth);
        // Without b, a is full by the estimate (3 of 4 in its report, 1 in flight) but not by
        // its own count: it is tried, and refuses itself if its slot is taken.
        let excluded = vec!["id-b".to_string()];
        let fifth = fleet.place("base", None, &excluded).unwrap();
        assert_eq!(fifth.host.row().name, "a");
        held.push(fifth);
        let excluded = vec!["id-a".to_string(), "id-b".to_string()];
        let full = fleet.place("base", None, &excluded).unwrap_err();
        assert!(matches!(full, Error::NoCapacity(_)), "{full}");
        for words in [
            "a said it had no room",
            "b said it had no room",
            "c is down",
            "d has 100 MiB free",
        ] {
            assert!(full.to_string().contains(words), "{words}: {full}");
        }
        drop(held);
        assert_eq!(
            fleet.place("base", None, &[]).unwrap().host.row().name,
            "b",
            "finished creates free their count"
        );
    }

    #[test]
    fn a_template_in_the_store_goes_to_a_host_that_has_it_else_to_one_that_can_pull_it() {
        let fleet = fleet_of(&[
            ("has", "up", 4, 3, 8192),
            ("pulls", "up", 4, 0, 8192),
            ("nostore", "up", 4, 0, 8192),
        ]);
        let set = |name: &str, store: &str, built: bool| {
            let host = fleet
                .hosts()
                .into_iter()
                .find(|h| h.row().name == name)
                .unwrap();
            let mut row = host.row.lock().unwrap();
            row.report.template_store = store.into();
            if built {
                row.report
                    .templates
                    .push(wrenn_agent_api::fake::template("built", 1024));
            }
        };
        set("has", "s3://fleet", true);
        set("pulls", "s3://fleet", false);
        let stored = wrenn_agent_api::fake::template("built", 1024);
        // The host that has it, though it is the busier one.
        let first = fleet.place("built", Some(&stored), &[]).unwrap();
        assert_eq!(first.host.row().name, "has");
        // Full now (3 + 1 of 4): the host with the store pulls it; the one without never.
        let second = fleet.place("built", Some(&stored), &[]).unwrap();
        assert_eq!(second.host.row().name, "pulls");
        assert_eq!(second.template.memory_mib, 1024);
        // Not in the store (`None`): only the host that has it, full by the estimate but not by
        // its own count (3 of 4): tried, it refuses itself if its slot is taken; without it,
        // no host.
        let third = fleet.place("built", None, &[]).unwrap();
        assert_eq!(third.host.row().name, "has");
        drop(third);
        let excluded = vec!["id-has".to_string()];
        let full = fleet.place("built", None, &excluded).unwrap_err();
        assert!(matches!(full, Error::NoCapacity(_)), "{full}");
        // Nobody has it and nobody may pull it: not found.
        set("pulls", "", false);
        set("has", "", false);
        drop((first, second));
        let fleet_without = fleet_of(&[("nostore", "up", 4, 0, 8192)]);
        let unknown = fleet_without
            .place("built", Some(&stored), &[])
            .unwrap_err();
        assert!(matches!(unknown, Error::TemplateNotFound(_)), "{unknown}");
    }

    #[test]
    fn placement_skips_hosts_without_the_disk_a_sandbox_may_take() {
        let fleet = fleet_with_disk(&[
            ("small", "up", 64, 0, 8192, 1 << 30),
            ("roomy", "up", 64, 0, 65536, 3 << 30),
        ]);
        let first = fleet.place("base", None, &[]).unwrap();
        assert_eq!(
            first.host.row().name,
            "roomy",
            "small has 1 GiB, 2 GiB needed"
        );
        // A create in flight is counted at what a new sandbox's overlay takes (64 MiB), not at
        // the 2 GiB its disk may grow to: roomy's 3 GiB take 17 at once (the last one still
        // sees 2 GiB free), not one.
        let mut placed = vec![first];
        for _ in 1..17 {
            placed.push(fleet.place("base", None, &[]).unwrap());
        }
        let full = fleet.place("base", None, &[]).unwrap_err();
        assert!(matches!(full, Error::NoCapacity(_)), "{full}");
        for words in [
            "small has 1024 MiB of disk free, 2048 MiB needed",
            "roomy has 1984 MiB of disk free, 2048 MiB needed",
        ] {
            assert!(full.to_string().contains(words), "{words}: {full}");
        }
        placed.pop();
        assert_eq!(
            fleet.place("base", None, &[]).unwrap().host.row().name,
            "roomy"
        );
    }

    #[test]
    fn a_hosts_creates_not_up_yet_are_not_counted_twice() {
        let fleet = fleet_with_disk(&[
            ("host", "up", 8, 0, 1 << 20, 1 << 40),
            ("busy", "up", 8, 7, 1 << 20, 1 << 40),
        ]);
        let host_of = |placed: &Placed| placed.host.row().name;
        let mut placed: Vec<_> = (0..6)
            .map(|_| fleet.place("base", None, &[]).unwrap())
            .collect();
        assert!(placed.iter().all(|p| host_of(p) == "host"));
        // Its heartbeat: the six creates have their slots, none is up yet. Counted twice, it
        // would be full (6 + 6 of 8) and the next create would go to busy (7 of 8).
        let set_report = |in_use, starting| {
            let host = fleet.hosts().into_iter().find(|h| h.row().name == "host");
            let host = host.unwrap();
            let mut row = host.row.lock().unwrap();
            row.report.slots_in_use = in_use;
            row.report.slots_starting = starting;
        };
        set_report(6, 6);
        let seventh = fleet.place("base", None, &[]).unwrap();
        assert_eq!(host_of(&seventh), "host");
        placed.push(seventh);
        // Full by its own count: refused, busy takes it.
        set_report(8, 0);
        let ninth = fleet.place("base", None, &[]).unwrap();
        assert_eq!(host_of(&ninth), "busy");
        let excluded = vec!["id-busy".to_string()];
        let full = fleet.place("base", None, &excluded).unwrap_err();
        assert!(
            full.to_string().contains("host has no free network slot"),
            "{full}"
        );
        drop((placed, ninth));
    }

    #[test]
    fn creates_in_flight_count_a_mapped_templates_memory_at_what_a_sandbox_starts_with() {
        let classic = wrenn_agent_api::fake::template("base", 1024);
        let mapped = wrenn_agent_api::join::TemplateReport {
            memory_mapped: true,
            ..classic.clone()
        };
        let at_once = |template| {
            let fleet = fleet_with(&[("host", "up", 100, 0, 4096, 1 << 40)], template);
            let mut placed = Vec::new();
            while let Ok(one) = fleet.place("base", None, &[]) {
                placed.push(one);
            }
            placed.len()
        };
        // 4 GiB: four 1 GiB guests that read their memory in; with it mapped, a sandbox is
        // counted at 64 MiB until its host reports it, while 1 GiB stays free for each.
        assert_eq!(at_once(classic), 4);
        assert_eq!(at_once(mapped), 49);
    }

    #[test]
    fn strategies_are_chosen_by_name() {
        assert_eq!(placement("binpack").unwrap().name(), "binpack");
        assert_eq!(placement("least-loaded").unwrap().name(), "least-loaded");
        assert!(placement("random").unwrap_err().contains("least-loaded"));
    }
}
