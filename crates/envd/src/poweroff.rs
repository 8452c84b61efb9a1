//! The guest's clean shutdown, owned by envd when it is PID 1: on SIGTERM (power off) or SIGINT
//! (reboot) it ends every other process, syncs, remounts the root filesystem read-only and asks
//! the kernel to power off or restart. Outside PID 1 none of this runs.

use std::time::{Duration, Instant};

use nix::sys::reboot::RebootMode;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What the guest does once envd has stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalAction {
    PowerOff,
    Restart,
}

/// How long processes get after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(3);

/// Ends every process but PID 1, flushes and remounts `/` read-only, then powers off or restarts.
/// Only returns if the kernel refuses (it never does for PID 1 with CAP_SYS_BOOT).
pub fn shut_down(action: FinalAction) -> std::io::Error {
    // kill(-1, …) reaches every process the caller may signal except itself and PID 1.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline && !user_processes().is_empty() {
        reap_all();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && !user_processes().is_empty() {
        reap_all();
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::unistd::sync();
    if let Err(error) = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        eprintln!("envd: remounting / read-only failed: {error}");
    }
    nix::unistd::sync();
    let mode = match action {
        FinalAction::PowerOff => RebootMode::RB_POWER_OFF,
        FinalAction::Restart => RebootMode::RB_AUTOBOOT,
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(errno) => std::io::Error::from(errno),
    }
}

fn reap_all() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Processes other than PID 1 and the kernel's threads (children of kthreadd, PID 2).
fn user_processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 2 && pid != std::process::id())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                .is_some_and(|parent| parent != 2)
        })
        .collect()
}

/// The parent PID from a `/proc/<pid>/stat` line (the field after the `)` closing the name).
fn parent_of(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_is_read_past_a_name_with_spaces_and_parentheses() {
        assert_eq!(parent_of("42 (a (b) c) S 7 42 42 0"), Some(7));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn user_processes_are_listed_and_this_one_and_kernel_threads_are_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let listed = user_processes();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            listed.contains(&child.id()),
            "a child of this process is a user process"
        );
        assert!(
            !listed.contains(&std::process::id()),
            "the caller is never listed"
        );
        // kthreadd (PID 2) and its children, the kernel's threads, are not user processes.
        assert!(!listed.contains(&2));
        let kernel_threads: Vec<u32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| parent_of(&stat))
                    == Some(2)
            })
            .collect();
        for thread in kernel_threads {
            assert!(!listed.contains(&thread), "kernel thread {thread} listed");
        }
    }
}
