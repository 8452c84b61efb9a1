//! Per-team quotas: how many sandboxes a team may have running, how many paused, and how much
//! disk its sandboxes and snapshots may hold. [`Quotas::check`] decides whether one change (a create, a
//! resume, a pause) stays within them; [`Admission`] makes the count and the decision atomic,
//! counting the changes admitted but not yet written to the store, so that two concurrent
//! creates cannot both take a team's last slot.
//!
//! Disk is an estimate, since agents do not report what each sandbox's files hold: a sandbox
//! counts its template's disk size (the most its copy-on-write disk can grow to), and a paused
//! one also its memory (the snapshot it wrote). The store's rows are counted by the caller;
//! this module owns the arithmetic and the reservations, not the store or HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A team's limits; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    pub running: u32,
    pub paused: u32,
    pub disk_mib: u64,
}

/// What a team's sandboxes hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub running: u32,
    pub paused: u32,
    pub disk_mib: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage {
            running: self.running.saturating_add(other.running),
            paused: self.paused.saturating_add(other.paused),
            disk_mib: self.disk_mib.saturating_add(other.disk_mib),
        }
    }
}

/// A change a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new running sandbox, whose disk may grow to `disk_mib`.
    Create { disk_mib: u64 },
    /// A paused sandbox runs again.
    Resume,
    /// A running sandbox is paused and writes a memory snapshot of `snapshot_mib`.
    Pause { snapshot_mib: u64 },
    /// A persistent snapshot is taken, holding `disk_mib` (its memory and its disk's most).
    Snapshot { disk_mib: u64 },
}

impl Change {
    /// What the change adds while it is in flight (a resume's paused sandbox is still counted
    /// as paused until the store says otherwise: counting it twice errs on the safe side).
    fn adds(self) -> Usage {
        match self {
            Change::Create { disk_mib } => Usage {
                running: 1,
                disk_mib,
                ..Usage::default()
            },
            Change::Resume => Usage {
                running: 1,
                ..Usage::default()
            },
            Change::Pause { snapshot_mib } => Usage {
                paused: 1,
                disk_mib: snapshot_mib,
                ..Usage::default()
            },
            Change::Snapshot { disk_mib } => Usage {
                disk_mib,
                ..Usage::default()
            },
        }
    }
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("team {team} has {limit} running sandboxes, the limit: kill or pause one first")]
    Running { team: String, limit: u32 },
    #[error("team {team} has {limit} paused sandboxes, the limit: kill one first")]
    Paused { team: String, limit: u32 },
    #[error(
        "team {team}'s sandboxes hold {used_mib} MiB of disk; {needed_mib} MiB more would pass the limit of {limit_mib} MiB"
    )]
    Disk {
        team: String,
        used_mib: u64,
        needed_mib: u64,
        limit_mib: u64,
    },
    #[error(
        "team {team}'s uploaded template files hold {used_mib} MiB, the limit: files no build used for {unused_days} days go"
    )]
    TemplateFiles {
        team: String,
        used_mib: u64,
        unused_days: u64,
    },
}

impl Quotas {
    /// Whether `team`, holding `usage`, may make `change`.
    pub fn check(&self, team: &str, usage: Usage, change: Change) -> Result<(), QuotaExceeded> {
        let adds = change.adds();
        if adds.running > 0 && self.running > 0 && usage.running + adds.running > self.running {
            return Err(QuotaExceeded::Running {
                team: team.to_string(),
                limit: self.running,
            });
        }
        if adds.paused > 0 && self.paused > 0 && usage.paused + adds.paused > self.paused {
            return Err(QuotaExceeded::Paused {
                team: team.to_string(),
                limit: self.paused,
            });
        }
        if adds.disk_mib > 0
            && self.disk_mib > 0
            && usage.disk_mib.saturating_add(adds.disk_mib) > self.disk_mib
        {
            return Err(QuotaExceeded::Disk {
                team: team.to_string(),
                used_mib: usage.disk_mib,
                needed_mib: adds.disk_mib,
                limit_mib: self.disk_mib,
            });
        }
        Ok(())
    }
}

/// Per team, the changes admitted and not yet stored, by reservation number.
type Pending = Arc<Mutex<HashMap<String, Vec<(u64, Usage)>>>>;

/// Changes admitted and not yet in the store, per team; admissions happen one at a time.
#[derive(Debug, Default)]
pub struct Admission {
    /// Held from counting a team's usage to reserving the change, and by
    /// [`Reservation::settle`] from a change's store write to its reservation's release: an
    /// admission never sees a change in neither the store nor the pending reservations.
    serial: Arc<tokio::sync::Mutex<()>>,
    pending: Pending,
    next: std::sync::atomic::AtomicU64,
}

/// A change admitted: counted as the team's until dropped (once the store holds it, or it
/// failed).
#[derive(Debug)]
pub struct Reservation {
    pending: Pending,
    team: String,
    id: u64,
    serial: Arc<tokio::sync::Mutex<()>>,
}

impl Reservation {
    /// Runs `write`, the store write that makes the change the store's, and then releases the
    /// reservation, with no admission in between (one that read the store before the write
    /// and the reservations after the release would count the change nowhere).
    pub async fn settle<T>(self, write: impl std::future::Future<Output = T>) -> T {
        let serial = self.serial.clone();
        let _serial = serial.lock().await;
        let written = write.await;
        drop(self);
        written
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut pending = self.pending.lock().expect("quota lock");
        if let Some(entries) = pending.get_mut(&self.team) {
            entries.retain(|(id, _)| *id != self.id);
            if entries.is_empty() {
                pending.remove(&self.team);
            }
        }
    }
}

impl Admission {
    /// Admits `change` for team `team_id` (named `team_name` in refusals) under `quotas`:
    /// `stored` counts what the store holds, read while no other admission runs.
    pub async fn admit<E: From<QuotaExceeded>>(
        &self,
        quotas: &Quotas,
        team_id: &str,
        team_name: &str,
        change: Change,
        stored: impl std::future::Future<Output = Result<Usage, E>>,
    ) -> Result<Reservation, E> {
        let _serial = self.serial.lock().await;
        let stored = stored.await?;
        let pending = self
            .pending
            .lock()
            .expect("quota lock")
            .get(team_id)
            .map(|entries| {
                entries
                    .iter()
                    .fold(Usage::default(), |sum, (_, usage)| sum + *usage)
            })
            .unwrap_or_default();
        quotas.check(team_name, stored + pending, change)?;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.pending
            .lock()
            .expect("quota lock")
            .entry(team_id.to_string())
            .or_default()
            .push((id, change.adds()));
        Ok(Reservation {
            pending: self.pending.clone(),
            team: team_id.to_string(),
            id,
            serial: self.serial.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change being written to the store when another admission counts: it is counted
    /// either in the store or as pending, never nowhere. (Without `settle`'s lock, the
    /// admission below read the store before the write and the reservations after the
    /// release, and let a second sandbox past a limit of one.)
    #[tokio::test]
    async fn a_change_being_settled_is_never_counted_nowhere() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let quotas = Quotas {
            running: 1,
            ..Quotas::default()
        };
        let admission = Arc::new(Admission::default());
        let stored_running = Arc::new(AtomicU32::new(0));
        let create = Change::Create { disk_mib: 0 };
        let first = admission
            .admit::<QuotaExceeded>(&quotas, "t", "t", create, async { Ok(Usage::default()) })
            .await
            .unwrap();
        let written = stored_running.clone();
        let settling = tokio::spawn(first.settle(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            written.store(1, Ordering::SeqCst);
        }));
        tokio::task::yield_now().await;
        let read = stored_running.clone();
        let slow_count = async move {
            let running = read.load(Ordering::SeqCst);
            // The store answers slowly: the first change is released meanwhile.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Ok(Usage {
                running,
                ..Usage::default()
            })
        };
        let second = admission
            .admit::<QuotaExceeded>(&quotas, "t", "t", create, slow_count)
            .await;
        settling.await.unwrap();
        assert!(
            matches!(second, Err(QuotaExceeded::Running { .. })),
            "a second sandbox got past a limit of one"
        );
    }

    const LIMITS: Quotas = Quotas {
        running: 2,
        paused: 1,
        disk_mib: 10_000,
    };

    fn usage(running: u32, paused: u32, disk_mib: u64) -> Usage {
        Usage {
            running,
            paused,
            disk_mib,
        }
    }

    #[test]
    fn each_limit_refuses_the_change_that_would_pass_it() {
        let create = Change::Create { disk_mib: 2000 };
        assert_eq!(LIMITS.check("t", usage(1, 0, 0), create), Ok(()));
        assert_eq!(
            LIMITS.check("t", usage(2, 0, 0), create),
            Err(QuotaExceeded::Running {
                team: "t".into(),
                limit: 2
            })
        );
        assert_eq!(
            LIMITS
                .check("t", usage(2, 0, 0), Change::Resume)
                .unwrap_err()
                .to_string(),
            "team t has 2 running sandboxes, the limit: kill or pause one first"
        );
        let pause = Change::Pause { snapshot_mib: 512 };
        assert_eq!(LIMITS.check("t", usage(2, 0, 0), pause), Ok(()));
        assert!(matches!(
            LIMITS.check("t", usage(1, 1, 0), pause),
            Err(QuotaExceeded::Paused { limit: 1, .. })
        ));
        // A pause does not need a running slot, nor a resume a paused one.
        assert_eq!(LIMITS.check("t", usage(5, 0, 0), pause), Ok(()));
        assert_eq!(LIMITS.check("t", usage(0, 9, 0), Change::Resume), Ok(()));
        let disk = LIMITS.check("t", usage(0, 0, 9000), create).unwrap_err();
        assert_eq!(
            disk.to_string(),
            "team t's sandboxes hold 9000 MiB of disk; 2000 MiB more would pass the limit of 10000 MiB"
        );
        assert_eq!(LIMITS.check("t", usage(0, 0, 8000), create), Ok(()));
        let unlimited = Quotas::default();
        assert_eq!(
            unlimited.check("t", usage(1000, 1000, u64::MAX), create),
            Ok(())
        );
    }

    #[tokio::test]
    async fn admissions_count_what_is_in_flight_until_it_is_dropped() {
        let admission = Arc::new(Admission::default());
        let create = Change::Create { disk_mib: 1 };
        let stored = || async { Ok::<_, QuotaExceeded>(usage(1, 0, 0)) };
        let first = admission
            .admit(&LIMITS, "a", "team a", create, stored())
            .await
            .unwrap();
        let refused = admission
            .admit(&LIMITS, "a", "team a", create, stored())
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("team a has 2 running"),
            "{refused}"
        );
        // Another team is counted apart.
        let other = admission
            .admit(&LIMITS, "b", "team b", create, stored())
            .await
            .unwrap();
        drop(first);
        let again = admission
            .admit(&LIMITS, "a", "team a", create, stored())
            .await
            .unwrap();
        drop((again, other));
        assert!(admission.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_admissions_cannot_share_the_last_slot() {
        let admission = Arc::new(Admission::default());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let admission = admission.clone();
            tasks.push(tokio::spawn(async move {
                let stored = async {
                    // The store read takes a while: others would read the same count.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    Ok::<_, QuotaExceeded>(usage(1, 0, 0))
                };
                admission
                    .admit(&LIMITS, "a", "a", Change::Create { disk_mib: 1 }, stored)
                    .await
            }));
        }
        let mut admitted = Vec::new();
        for task in tasks {
            if let Ok(reservation) = task.await.unwrap() {
                admitted.push(reservation);
            }
        }
        assert_eq!(admitted.len(), 1, "one slot was left");
    }
}
