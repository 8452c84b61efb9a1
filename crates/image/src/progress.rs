//! Progress of a long build: on a terminal one status line redrawn in place (stage, elapsed,
//! bytes or the latest output line); elsewhere (CI, logs) plain lines, at most one per ten
//! seconds while a stage runs.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a plain (non-terminal) progress line repeats while a stage runs.
const PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Reports the stages of a build to standard error.
#[derive(Debug)]
pub struct Progress {
    terminal: bool,
    quiet: bool,
    started: Instant,
    stage: String,
    stage_started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress on standard error, redrawn in place if it is a terminal.
    pub fn stderr() -> Self {
        Self::new(std::io::stderr().is_terminal(), false)
    }

    /// No output at all (tests, library callers that report on their own).
    pub fn quiet() -> Self {
        Self::new(false, true)
    }

    fn new(terminal: bool, quiet: bool) -> Self {
        let now = Instant::now();
        Self {
            terminal,
            quiet,
            started: now,
            stage: String::new(),
            stage_started: now,
            last_line: now,
        }
    }

    /// A new stage begins.
    pub fn stage(&mut self, name: &str) {
        self.stage = name.to_string();
        self.stage_started = Instant::now();
        self.last_line = Instant::now();
        self.emit(&format!("{name} ..."), true);
    }

    /// What the current stage is doing now (a line of output, a byte count).
    pub fn update(&mut self, detail: &str) {
        if self.terminal {
            let detail: String = detail.chars().take(90).collect();
            let line = format!(
                "{} [{}] {}",
                self.stage,
                elapsed(self.stage_started),
                detail
            );
            self.redraw(&line);
        } else if self.last_line.elapsed() >= PLAIN_INTERVAL {
            self.last_line = Instant::now();
            let line = format!(
                "{} [{}] {}",
                self.stage,
                elapsed(self.stage_started),
                detail
            );
            self.emit(&line, true);
        }
    }

    /// The current stage ended well.
    pub fn finish_stage(&mut self, summary: &str) {
        let line = format!(
            "{}: {} ({})",
            self.stage,
            summary,
            elapsed(self.stage_started)
        );
        self.emit(&line, true);
    }

    /// A note outside any stage.
    pub fn note(&mut self, line: &str) {
        self.emit(line, true);
    }

    /// Time since the build started.
    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }

    fn redraw(&mut self, line: &str) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
    }

    fn emit(&mut self, line: &str, newline: bool) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = if newline {
            writeln!(err, "image: {line}")
        } else {
            write!(err, "image: {line}")
        };
    }
}

/// A duration as people read it: `4.2s`, `3m05s`.
pub fn elapsed(since: Instant) -> String {
    format_duration(since.elapsed())
}

/// Formats a duration for progress lines.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// A byte count as people read it: `812.4 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(format_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
    }
}
