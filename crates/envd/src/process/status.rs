//! How a finished process is described in its `EndEvent`, matching E2B's envd (which reports Go's
//! `ProcessState`): `exit status 3`, or `signal: killed` with exit code -1.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The fields of an `EndEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    pub exit_code: i32,
    pub exited: bool,
    pub status: String,
    pub error: Option<String>,
}

impl ExitReport {
    pub fn from_status(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            let text = format!("exit status {code}");
            ExitReport {
                exit_code: code,
                exited: true,
                // Go's Wait returns an *ExitError for a non-zero status, and envd reports it.
                error: (code != 0).then(|| text.clone()),
                status: text,
            }
        } else {
            let signal = status.signal().unwrap_or(0);
            let mut text = format!("signal: {}", signal_name(signal));
            if status.core_dumped() {
                text.push_str(" (core dumped)");
            }
            ExitReport {
                exit_code: -1,
                exited: false,
                error: Some(text.clone()),
                status: text,
            }
        }
    }

    /// A process whose fate is unknown (waiting on it failed).
    pub fn wait_failed(error: &std::io::Error) -> Self {
        ExitReport {
            exit_code: -1,
            exited: false,
            status: "unknown".to_owned(),
            error: Some(format!("waiting for the process failed: {error}")),
        }
    }
}

/// Go's names of the Linux signals (`syscall.Signal.String()`).
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let ok = ExitReport::from_status(ExitStatus::from_raw(0));
        assert_eq!(
            ok,
            ExitReport {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None
            }
        );
        let failed = ExitReport::from_status(ExitStatus::from_raw(3 << 8));
        assert_eq!(failed.exit_code, 3);
        assert_eq!(failed.status, "exit status 3");
        assert_eq!(failed.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn signals() {
        let killed = ExitReport::from_status(ExitStatus::from_raw(9));
        assert_eq!(killed.exit_code, -1);
        assert!(!killed.exited);
        assert_eq!(killed.status, "signal: killed");
        let core = ExitReport::from_status(ExitStatus::from_raw(11 | 0x80));
        assert_eq!(core.status, "signal: segmentation fault (core dumped)");
        assert_eq!(signal_name(64), "signal 64");
    }
}
