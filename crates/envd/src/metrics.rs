//! Resource use of the machine envd runs on, for `GET /metrics`: CPU (from `/proc/stat`, as a
//! percentage of all CPUs since the previous sample), memory (from `/proc/meminfo`, gopsutil's
//! formula) and the root filesystem (statvfs).

use serde::Serialize;

/// CPU time counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn read_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Measures CPU use between successive calls.
#[derive(Debug)]
pub struct CpuSampler {
    last: CpuTimes,
}

impl Default for CpuSampler {
    fn default() -> Self {
        let last = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| read_cpu_times(&s))
            .unwrap_or_default();
        CpuSampler { last }
    }
}

impl CpuSampler {
    /// Percent of all CPUs busy since the previous call (0..=100, two decimals).
    pub fn sample(&mut self) -> f64 {
        let Some(now) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| read_cpu_times(&s))
        else {
            return 0.0;
        };
        let pct = busy_percent(self.last, now);
        self.last = now;
        pct
    }
}

fn busy_percent(before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    let pct = 100.0 * busy as f64 / total as f64;
    (pct.clamp(0.0, 100.0) * 100.0).round() / 100.0
}

/// Memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub used: u64,
    pub cache: u64,
}

fn parse_meminfo(text: &str) -> Memory {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = field("MemTotal");
    let cache = field("Cached") + field("SReclaimable");
    let used = total
        .saturating_sub(field("MemFree"))
        .saturating_sub(field("Buffers"))
        .saturating_sub(cache);
    Memory { total, used, cache }
}

/// The body of `GET /metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct MachineMetrics {
    pub ts: i64,
    pub cpu_count: usize,
    pub cpu_used_pct: f64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
    /// Resource use of envd's user and terminal cgroups, when it has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroups: Option<crate::cgroups::CgroupUsage>,
}

/// Collects the machine's metrics now.
pub fn collect(cpu: &mut CpuSampler, cgroups: Option<&crate::cgroups::Cgroups>) -> MachineMetrics {
    let memory = parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(stats) => {
            let block = stats.fragment_size();
            let total = stats.blocks() * block;
            (
                total,
                total.saturating_sub(stats.blocks_available() * block),
            )
        }
        Err(_) => (0, 0),
    };
    MachineMetrics {
        ts: chrono::Utc::now().timestamp(),
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_used_pct: cpu.sample(),
        mem_total_mib: memory.total / (1024 * 1024),
        mem_used_mib: memory.used / (1024 * 1024),
        mem_total: memory.total,
        mem_used: memory.used,
        mem_cache: memory.cache,
        disk_used,
        disk_total,
        cgroups: cgroups.map(crate::cgroups::Cgroups::usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_between_samples() {
        let before = read_cpu_times("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4").unwrap();
        let after = read_cpu_times("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(busy_percent(before, after), 50.0);
        assert_eq!(busy_percent(after, after), 0.0);
        assert_eq!(read_cpu_times("nothing"), None);
    }

    #[test]
    fn memory_formula() {
        let meminfo = "MemTotal: 1000 kB\nMemFree: 200 kB\nBuffers: 100 kB\nCached: 300 kB\nSReclaimable: 50 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Memory {
                total: 1_024_000,
                used: 358_400,
                cache: 358_400
            }
        );
    }

    #[test]
    fn collects_real_values() {
        let metrics = collect(&mut CpuSampler::default(), None);
        assert!(metrics.mem_total > metrics.mem_used);
        assert!(metrics.disk_total >= metrics.disk_used);
        assert!(metrics.cpu_count >= 1);
        assert!((0.0..=100.0).contains(&metrics.cpu_used_pct));
    }
}
