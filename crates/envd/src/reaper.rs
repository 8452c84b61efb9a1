//! Reaping orphans. When envd is PID 1 in a guest (or a child subreaper, `--subreaper`), every
//! process whose parent dies is re-parented to it and must be waited for, or it stays a zombie
//! forever. tokio waits for the processes envd started itself; this reaps the rest, and never
//! touches a process the process manager still waits for (which would steal its exit status).

use std::sync::Arc;
use std::time::Duration;

use crate::state::Envd;

/// Makes envd the reaper of its descendants' orphans (implied when it is PID 1).
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches no memory.
    let result = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The zombie children of `parent`, from `/proc`.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            fields.next() == Some("Z")
                && fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// Reaps the zombie children that are not envd's own processes; returns how many.
pub fn reap_orphans(envd: &Envd) -> usize {
    let mut reaped = 0;
    for pid in zombie_children(std::process::id()) {
        if envd.processes.is_waiting_for(pid) {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_ok() {
            reaped += 1;
        }
    }
    reaped
}

/// Reaps orphans whenever a child exits (SIGCHLD), and every few seconds in case a signal was
/// coalesced.
pub fn spawn(envd: Arc<Envd>) {
    tokio::spawn(async move {
        let mut child_exits = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::child(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGCHLD: orphans are reaped every 5 s only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = child_exits.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let envd = envd.clone();
            let reaped = tokio::task::spawn_blocking(move || reap_orphans(&envd))
                .await
                .unwrap_or(0);
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphaned processes");
            }
        }
    });
}
