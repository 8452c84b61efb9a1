//! Where a new sandbox goes: the hosts that can take it ([`Candidate`]), the strategy that chooses
//! among them ([`Placement`]: least-loaded or binpack), and the count of creates in flight.

use super::*;

/// A host that could take a new sandbox, as a [`Placement`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub host_id: String,
    pub slots_total: u32,
    /// Slots in use, creates in flight included: an estimate, which may reach `slots_total`
    /// (such a host is tried only when no other has room by it).
    pub slots_used: u32,
    pub memory_available_mib: u64,
}

impl Candidate {
    /// The share of the host's slots in use.
    pub fn load(&self) -> f64 {
        f64::from(self.slots_used) / f64::from(self.slots_total.max(1))
    }

    /// Whether the host has a free slot by the plane's estimate.
    pub fn has_room(&self) -> bool {
        self.slots_used < self.slots_total
    }
}

/// Chooses the host of a new sandbox among hosts that can all take it.
pub trait Placement: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// The index in `candidates` of the chosen host (`candidates` is never empty).
    fn choose(&self, candidates: &[Candidate]) -> usize;
}

/// The placement strategies (each variant is re-exported, so `LeastLoaded` is a placement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The host with the smallest share of its slots in use; then the most free memory.
    LeastLoaded,
    /// The fullest host that still has room: keeps other hosts empty (to drain or power down).
    BinPack,
}

pub use Strategy::{BinPack, LeastLoaded};

impl Strategy {
    /// Every strategy, in the order an unknown name's error lists them.
    const ALL: [Strategy; 2] = [LeastLoaded, BinPack];

    /// The order in which this strategy ranks two hosts (the first is chosen); a tie goes to
    /// the smaller host id.
    fn order(self, a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
        let by_load = match self {
            LeastLoaded => a
                .load()
                .total_cmp(&b.load())
                .then(b.memory_available_mib.cmp(&a.memory_available_mib)),
            BinPack => b.load().total_cmp(&a.load()),
        };
        by_load.then(a.host_id.cmp(&b.host_id))
    }
}

impl Placement for Strategy {
    fn name(&self) -> &'static str {
        match self {
            LeastLoaded => "least-loaded",
            BinPack => "binpack",
        }
    }
    fn choose(&self, candidates: &[Candidate]) -> usize {
        (0..candidates.len())
            .min_by(|&a, &b| self.order(&candidates[a], &candidates[b]))
            .unwrap_or(0)
    }
}

/// A placement strategy by name: `least-loaded` or `binpack`.
pub fn placement(name: &str) -> Result<Box<dyn Placement>, String> {
    match Strategy::ALL
        .into_iter()
        .find(|strategy| strategy.name() == name)
    {
        Some(strategy) => Ok(Box::new(strategy)),
        None => Err(format!(
            "unknown placement {name:?}: use {}",
            Strategy::ALL.map(|strategy| strategy.name()).join(" or ")
        )),
    }
}

/// A create placed on a host: counted in flight until dropped.
#[derive(Debug)]
pub struct Placed {
    pub host: Arc<Host>,
    pub template: TemplateReport,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.host.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fleet {
    /// The disk a sandbox of `template_id` may take (its template's disk size, as the first
    /// up host that has it reports it); 0 when no up host has it.
    pub fn template_disk_mib(&self, template_id: &str) -> u64 {
        self.templates()
            .iter()
            .find(|t| t.template_id == template_id)
            .map(|t| t.disk_size_mb)
            .unwrap_or(0)
    }

    /// Picks the host for a new sandbox of `template_id`, skipping `excluded` hosts: one
    /// that has the template when one can take it; else, when the template store has it
    /// (`stored`: its figures), one with a store, which pulls it. 404 when no host has it or
    /// can pull it, 503 when none has room.
    pub fn place(
        &self,
        template_id: &str,
        stored: Option<&TemplateReport>,
        excluded: &[String],
    ) -> Result<Placed, Error> {
        let _placing = self.placing.lock().expect("placement lock");
        // Hosts that have the template, then hosts that would pull it.
        let mut having = (Vec::new(), Vec::new());
        let mut pulling = (Vec::new(), Vec::new());
        let mut known = false;
        let mut reasons = Vec::new();
        for host in self.hosts() {
            // This process's own agent: its report is read now, not at the last tick.
            if let Some(report) = host.agent.report_in_process() {
                host.row.lock().expect("host lock").report = report;
            }
            let row = host.row();
            let has = row
                .report
                .templates
                .iter()
                .find(|t| t.template_id == template_id)
                .cloned();
            let (template, list, pulls) = match (has, stored) {
                (Some(template), _) => (template, &mut having, false),
                (None, Some(stored)) if !row.report.template_store.is_empty() => {
                    (stored.clone(), &mut pulling, true)
                }
                (None, _) => continue,
            };
            known = true;
            match room_for(&host, &row, &template, excluded) {
                Ok(candidate) => {
                    list.0.push(candidate);
                    list.1.push((host, template));
                }
                Err(reason) if pulls => reasons.push(format!("{reason} (it would pull it)")),
                Err(reason) => reasons.push(reason),
            }
        }
        if !known {
            return Err(Error::TemplateNotFound(template_id.to_string()));
        }
        // Hosts that have the template before those that would pull it; hosts full by the
        // estimate only when no other has room: each refuses a create it has no slot for, and
        // the create goes on to the next.
        let with_room = |(candidates, hosts): (Vec<Candidate>, Vec<_>)| -> (Vec<_>, Vec<_>) {
            candidates
                .into_iter()
                .zip(hosts)
                .filter(|(candidate, _)| candidate.has_room())
                .unzip()
        };
        let (candidates, mut hosts) = [
            with_room(having.clone()),
            with_room(pulling.clone()),
            having,
            pulling,
        ]
        .into_iter()
        .find(|(candidates, _)| !candidates.is_empty())
        .unwrap_or_default();
        if candidates.is_empty() {
            return Err(Error::NoCapacity(format!(
                "no host can take a sandbox of template '{template_id}' now: {}",
                reasons.join("; ")
            )));
        }
        let chosen = self.placement.choose(&candidates).min(hosts.len() - 1);
        let (host, template) = hosts.swap_remove(chosen);
        host.inflight.fetch_add(1, Ordering::SeqCst);
        Ok(Placed { host, template })
    }

    /// Counts a finished create in the host's report until its next heartbeat says so itself.
    pub fn created(&self, placed: &Placed) {
        let mut row = placed.host.row.lock().expect("host lock");
        row.report.slots_in_use += 1;
        row.report.sandboxes_running += 1;
        let (memory_mib, disk_mib) = start_cost(&placed.template);
        row.report.memory_available_bytes = row
            .report
            .memory_available_bytes
            .saturating_sub(memory_mib << 20);
        row.report.disk_available_bytes = row
            .report
            .disk_available_bytes
            .saturating_sub(disk_mib << 20);
    }
}

/// What a sandbox mapping its template's memory is counted to hold of its own at first (an
/// idle one holds ~45 MiB under TCG, benchmarks.md).
const MAPPED_START_MEMORY_MIB: u64 = 64;
/// What a new sandbox's disk is counted to take at first: its overlay and first writes.
const START_DISK_MIB: u64 = 64;

/// What a new sandbox of `template` takes of its host at once, in MiB of memory and of disk:
/// counted for creates in flight and just made until the host's next report says what they
/// take. Its disk is a copy-on-write overlay of the template's; its memory is the template's
/// whole when it reads it in, its own writes when it maps it. What it may grow to is checked
/// for each create ([`room_for`]), as it is for the sandboxes already running.
fn start_cost(template: &TemplateReport) -> (u64, u64) {
    let memory = if template.memory_mapped {
        MAPPED_START_MEMORY_MIB.min(u64::from(template.memory_mib))
    } else {
        u64::from(template.memory_mib)
    };
    (memory, START_DISK_MIB.min(template.disk_size_mb))
}

/// Whether `host` (whose row is `row`) can take a sandbox of `template` now: a candidate, or
/// why not.
fn room_for(
    host: &Host,
    row: &HostRow,
    template: &TemplateReport,
    excluded: &[String],
) -> Result<Candidate, String> {
    if row.state != HostState::Up {
        return Err(format!("{} is down", row.name));
    }
    if excluded.contains(&row.id) {
        return Err(format!("{} said it had no room", row.name));
    }
    let inflight = host.inflight.load(Ordering::SeqCst);
    // The host's creates not up yet are this plane's creates in flight, counted here.
    let used = row
        .report
        .slots_in_use
        .saturating_sub(row.report.slots_starting)
        + inflight;
    let (start_memory_mib, start_disk_mib) = start_cost(template);
    let memory_mib = (row.report.memory_available_bytes >> 20)
        .saturating_sub(u64::from(inflight) * start_memory_mib);
    // The host's own count refuses; the estimate only ranks. A create that has just come up
    // is counted twice until the plane hears its answer (in the host's report and in flight):
    // the host itself, which leases the slot, refuses a create it has no slot for.
    if row.report.slots_in_use >= row.report.slots_total {
        return Err(format!("{} has no free network slot", row.name));
    }
    if memory_mib < u64::from(template.memory_mib) {
        return Err(format!(
            "{} has {memory_mib} MiB free, {} MiB needed",
            row.name, template.memory_mib
        ));
    }
    // The sandbox's disk may grow to the template's size: that much must be free.
    let disk_free_mib = (row.report.disk_available_bytes >> 20)
        .saturating_sub(u64::from(inflight) * start_disk_mib);
    if disk_free_mib < template.disk_size_mb {
        return Err(format!(
            "{} has {disk_free_mib} MiB of disk free, {} MiB needed",
            row.name, template.disk_size_mb
        ));
    }
    Ok(Candidate {
        host_id: row.id.clone(),
        slots_total: row.report.slots_total,
        slots_used: used,
        memory_available_mib: memory_mib,
    })
}
