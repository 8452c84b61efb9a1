//! VMM processes seen through `/proc`: whether a recorded process still runs (PID and start time
//! both match, zombies count as gone), and what it uses.

use crate::ResourceUse;

/// Fields of `/proc/<pid>/stat` after the command name, which may hold spaces and parentheses.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of a process, in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    // Field 22 of stat; index 19 after the name (state is field 3, index 0).
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` runs and is the process that started at `start_time` (not a zombie).
pub fn is_running(pid: u32, start_time: u64) -> bool {
    stat_fields(pid).is_some_and(|fields| {
        fields
            .first()
            .is_some_and(|state| state != "Z" && state != "X")
            && fields.get(19).and_then(|t| t.parse::<u64>().ok()) == Some(start_time)
    })
}

/// Resident memory and CPU time of a process.
pub fn usage(pid: u32) -> Option<ResourceUse> {
    let fields = stat_fields(pid)?;
    let ticks_per_second = clock_ticks();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    Some(ResourceUse {
        rss_bytes: rss_pages * page_size(),
        cpu_millis: (user + system) * 1000 / ticks_per_second.max(1),
    })
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_wrong_start_time_does_not() {
        let pid = std::process::id();
        let started = start_time(pid).unwrap();
        assert!(is_running(pid, started));
        assert!(!is_running(pid, started + 1));
        assert!(usage(pid).unwrap().rss_bytes > 0);
    }

    #[test]
    fn a_reaped_child_is_gone_and_a_zombie_counts_as_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = start_time(pid).unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !is_running(pid, started),
            "an exited, unreaped child is a zombie"
        );
        child.wait().unwrap();
        assert!(!is_running(pid, started));
    }
}
