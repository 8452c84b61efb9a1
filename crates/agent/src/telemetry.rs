//! What the host sees of its sandboxes, kept for the control plane to collect
//! (`CollectTelemetry`): a resource sample of each running sandbox every interval, and the lines
//! of its log (the guest's serial console, where envd, the guest's PID 1, writes its own log as
//! JSON lines). Entries go into one bounded buffer in the order they are made, numbered within
//! this run of the agent (its `epoch`); the control plane asks for those after its cursor, and is
//! told when some were dropped before it asked (a full buffer, a restart).
//!
//! A guest decides what its console says and how fast: each tail reads at most
//! [`MAX_READ_PER_TICK`] bytes and keeps at most [`MAX_LINES_PER_TICK`] lines a tick, a line is
//! cut at [`MAX_LINE_BYTES`], and what is skipped is said in one line, so one noisy sandbox cannot
//! push the others' entries out of the buffer.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
pub use wrenn_agent_api::telemetry::{BUFFER_ENTRIES, MAX_COLLECT, TelemetryBuffer};
use wrenn_proto::agent as pb;

/// How often each running sandbox is sampled, by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The longest log line kept, in bytes; the rest of a longer one is cut.
pub const MAX_LINE_BYTES: usize = 4096;
/// The most lines kept of one sandbox's console in one tick.
pub const MAX_LINES_PER_TICK: usize = 500;
/// The most of one sandbox's console read in one tick.
pub const MAX_READ_PER_TICK: u64 = 256 * 1024;

/// Where a sandbox's console log has been read to.
#[derive(Debug, Clone)]
struct ConsoleTail {
    path: PathBuf,
    offset: u64,
    /// The start of a line not ended yet.
    partial: Vec<u8>,
}

/// The buffer and the consoles' tails.
#[derive(Debug)]
pub struct Telemetry {
    buffer: TelemetryBuffer,
    tails: Mutex<HashMap<String, ConsoleTail>>,
}

impl Telemetry {
    /// An empty buffer of `capacity` entries for a host that samples every `interval`.
    pub fn new(interval: Duration, capacity: usize) -> Telemetry {
        Telemetry {
            buffer: TelemetryBuffer::new(interval, capacity),
            tails: Mutex::new(HashMap::new()),
        }
    }

    /// How often the host samples its sandboxes.
    pub fn interval(&self) -> Duration {
        self.buffer.interval()
    }

    /// Keeps a sample.
    pub fn record_sample(&self, sample: pb::SandboxSample) {
        self.buffer.record_sample(sample);
    }

    /// Keeps a log line.
    pub fn record_log(&self, line: pb::SandboxLogLine) {
        self.buffer.record_log(line);
    }

    /// How many entries wait to be collected.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The entries after the request's cursor ([`TelemetryBuffer::collect`]).
    pub fn collect(&self, request: &pb::CollectTelemetryRequest) -> pb::CollectTelemetryResponse {
        self.buffer.collect(request)
    }

    /// Follows a sandbox's console log from its start (a VM this run started), or from where
    /// an earlier tail of the same file left it.
    pub fn follow_console(&self, sandbox_id: &str, path: &Path) {
        let mut tails = self.tails.lock().expect("tails lock");
        match tails.get(sandbox_id) {
            Some(tail) if tail.path == path => {}
            _ => {
                tails.insert(
                    sandbox_id.to_string(),
                    ConsoleTail {
                        path: path.to_owned(),
                        offset: 0,
                        partial: Vec::new(),
                    },
                );
            }
        }
    }

    /// Follows a sandbox's console log from its present end (a VM adopted after a restart:
    /// what it wrote before was collected by the previous run, or is lost with it).
    pub fn follow_console_from_end(&self, sandbox_id: &str, path: &Path) {
        let offset = std::fs::metadata(path).map_or(0, |meta| meta.len());
        self.tails.lock().expect("tails lock").insert(
            sandbox_id.to_string(),
            ConsoleTail {
                path: path.to_owned(),
                offset,
                partial: Vec::new(),
            },
        );
    }

    /// Reads what a sandbox's console has written since the last read into the buffer. The
    /// tails stay locked meanwhile (a read is at most [`MAX_READ_PER_TICK`]), so a pause's or
    /// destroy's last read and the sampler's never read the same lines.
    pub fn read_console(&self, sandbox_id: &str) {
        let mut tails = self.tails.lock().expect("tails lock");
        let Some(tail) = tails.get_mut(sandbox_id) else {
            return;
        };
        let (lines, skipped) = read_new_lines(tail);
        drop(tails);
        self.record_console_lines(sandbox_id, lines, skipped);
    }

    /// Reads the rest of a sandbox's console at `path`, an unended last line included: its VM
    /// stopped. A console no sampler's tick followed yet (a sandbox gone within its first
    /// interval) is read from its start. The tail stays where it is, so a VM that resumes on
    /// the same log goes on after it.
    pub fn finish_console(&self, sandbox_id: &str, path: &Path) {
        self.follow_console(sandbox_id, path);
        self.read_console(sandbox_id);
        let partial = self
            .tails
            .lock()
            .expect("tails lock")
            .get_mut(sandbox_id)
            .map(|tail| std::mem::take(&mut tail.partial))
            .unwrap_or_default();
        if !partial.is_empty() {
            self.record_console_lines(sandbox_id, vec![partial], 0);
        }
    }

    /// Stops following a sandbox's console (it is gone).
    pub fn forget_console(&self, sandbox_id: &str) {
        self.tails.lock().expect("tails lock").remove(sandbox_id);
    }

    fn record_console_lines(&self, sandbox_id: &str, lines: Vec<Vec<u8>>, skipped: usize) {
        let now = wrenn_core::now_ms();
        let total = lines.len();
        let kept = total.min(MAX_LINES_PER_TICK);
        for raw in lines.into_iter().skip(total - kept) {
            let line = log_line(&raw, now);
            self.record_log(pb::SandboxLogLine {
                sandbox_id: sandbox_id.to_string(),
                ..line
            });
        }
        let dropped = skipped + (total - kept);
        if dropped > 0 {
            self.record_log(pb::SandboxLogLine {
                sandbox_id: sandbox_id.to_string(),
                at_ms: now,
                level: "warn".into(),
                message: format!(
                    "{dropped} console lines were not kept: the sandbox wrote faster than its log keeps"
                ),
                fields_json: r#"{"source":"wrenn"}"#.into(),
                ..pb::SandboxLogLine::default()
            });
        }
    }
}

/// The whole lines a console log has gained since `tail`, and how many lines' worth were skipped
/// (more than a tick reads; counted as one per skip). Follows the log's rotation
/// (`wrenn_vmm::console`: `console.log` moved to `console.log.1` at half its cap).
fn read_new_lines(tail: &mut ConsoleTail) -> (Vec<Vec<u8>>, usize) {
    let mut bytes = Vec::new();
    let mut skipped = 0;
    let Ok(mut file) = std::fs::File::open(&tail.path) else {
        return (Vec::new(), 0);
    };
    let length = file.metadata().map_or(0, |meta| meta.len());
    if length < tail.offset {
        // Rotated: the rest of the older half first.
        let previous = wrenn_vmm::console::previous_log(&tail.path);
        if let Ok(mut older) = std::fs::File::open(previous) {
            let older_length = older.metadata().map_or(0, |meta| meta.len());
            if older_length > tail.offset {
                skipped += read_range(&mut older, tail.offset, older_length, &mut bytes);
            }
        }
        tail.offset = 0;
    }
    let mut end = length;
    if end - tail.offset > MAX_READ_PER_TICK {
        // Too far behind: keep the newest part.
        skipped += 1;
        tail.partial.clear();
        tail.offset = end - MAX_READ_PER_TICK;
    }
    if end > tail.offset {
        skipped += read_range(&mut file, tail.offset, end, &mut bytes);
        end = end.min(tail.offset + MAX_READ_PER_TICK);
        tail.offset = end;
    }
    let mut pending = std::mem::take(&mut tail.partial);
    pending.extend_from_slice(&bytes);
    let mut lines = Vec::new();
    let mut rest: &[u8] = &pending;
    while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
        lines.push(rest[..newline].to_vec());
        rest = &rest[newline + 1..];
    }
    if rest.len() >= MAX_LINE_BYTES {
        // A line that never ends is kept in pieces.
        lines.push(rest.to_vec());
        rest = &[];
    }
    tail.partial = rest.to_vec();
    (lines, skipped)
}

/// Appends `file`'s bytes from `start` to `end` (at most [`MAX_READ_PER_TICK`]) to `into`: 1 when
/// some could not be read, else 0.
fn read_range(file: &mut std::fs::File, start: u64, end: u64, into: &mut Vec<u8>) -> usize {
    let want = end.saturating_sub(start).min(MAX_READ_PER_TICK);
    let read = file
        .seek(SeekFrom::Start(start))
        .and_then(|_| file.take(want).read_to_end(into));
    usize::from(read.is_err())
}

/// A console line as a log line (without its sandbox): one of envd's JSON lines with its level,
/// message and fields, or any other text as `info` from the console. `now` is when it was read.
pub fn log_line(raw: &[u8], now: i64) -> pb::SandboxLogLine {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    text.retain(|c| c != '\r');
    if let Some(line) = envd_line(&text, now) {
        return line;
    }
    pb::SandboxLogLine {
        at_ms: now,
        level: "info".into(),
        message: cut(text.trim_end().to_string()),
        fields_json: r#"{"source":"console"}"#.into(),
        ..pb::SandboxLogLine::default()
    }
}

/// One of envd's log lines (`tracing`'s JSON: `timestamp`, `level`, `fields` with `message`,
/// `target`), if `text` is one. Its time is the guest's when that is no later than `now` and
/// no more than a minute before (the guest's clock is its own), else `now`.
fn envd_line(text: &str, now: i64) -> Option<pb::SandboxLogLine> {
    let trimmed = text.trim();
    if !trimmed.starts_with('{') {
        return None;
    }
    let document: serde_json::Map<String, Value> = serde_json::from_str(trimmed).ok()?;
    let level = document.get("level")?.as_str()?;
    let mut fields = document.get("fields")?.as_object()?.clone();
    let message = match fields.remove("message") {
        Some(Value::String(message)) => message,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let mut kept = serde_json::Map::new();
    kept.insert("source".into(), Value::String("envd".into()));
    if let Some(target) = document.get("target").and_then(Value::as_str) {
        kept.insert("target".into(), Value::String(target.to_string()));
    }
    // The fields together are at most a line long: the guest chooses how many there are.
    let mut room = MAX_LINE_BYTES;
    for (name, value) in fields {
        let value = match value {
            Value::String(text) => text,
            other => other.to_string(),
        };
        let name = cut_to(name, 128);
        let value = cut_to(value, room.saturating_sub(name.len()));
        let used = name.len() + value.len();
        if used >= room {
            kept.insert("truncated".into(), Value::String("true".into()));
            break;
        }
        room -= used;
        kept.insert(name, Value::String(value));
    }
    let at_ms = document
        .get("timestamp")
        .and_then(Value::as_str)
        .and_then(|stamp| chrono::DateTime::parse_from_rfc3339(stamp).ok())
        .map(|stamp| stamp.timestamp_millis())
        .filter(|at| *at <= now && now - *at <= 60_000)
        .unwrap_or(now);
    Some(pb::SandboxLogLine {
        at_ms,
        level: level_name(level).into(),
        message: cut(message),
        fields_json: Value::Object(kept).to_string(),
        ..pb::SandboxLogLine::default()
    })
}

/// A `tracing` level as E2B's log levels name them.
fn level_name(level: &str) -> &'static str {
    match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warn" | "warning" => "warn",
        "debug" | "trace" => "debug",
        _ => "info",
    }
}

/// `text` cut to [`MAX_LINE_BYTES`] at a character's boundary.
fn cut(text: String) -> String {
    cut_to(text, MAX_LINE_BYTES)
}

/// `text` cut to `most` bytes at a character's boundary.
fn cut_to(mut text: String, most: usize) -> String {
    if text.len() > most {
        let mut end = most;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The bytes the guest received and sent, as the host's end of its network (its `tap` in the
/// sandbox's namespace) counts them, read from the VMM's `/proc/<pid>/net/dev` (the VMM runs in
/// that namespace): the tap's transmitted bytes are the guest's received ones.
pub fn guest_traffic(vmm_pid: u32, tap: &str) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string(format!("/proc/{vmm_pid}/net/dev")).ok()?;
    tap_traffic(&table, tap)
}

/// `(guest received, guest sent)` from a `/proc/net/dev` table's row of `interface`.
fn tap_traffic(table: &str, interface: &str) -> Option<(u64, u64)> {
    table.lines().find_map(|row| {
        let (name, counters) = row.split_once(':')?;
        if name.trim() != interface {
            return None;
        }
        let counters: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|value| value.parse().ok())
            .collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        let host_received = *counters.first()?;
        let host_sent = *counters.get(8)?;
        Some((host_sent, host_received))
    })
}

/// A sample from envd's `/metrics` answer and the host's traffic counters.
pub fn sample_of(
    sandbox_id: &str,
    at_ms: i64,
    metrics: &serde_json::Map<String, Value>,
    default_cpus: u32,
    traffic: Option<(u64, u64)>,
) -> pb::SandboxSample {
    let count = |key: &str| metrics.get(key).and_then(Value::as_u64).unwrap_or(0);
    let (net_rx_bytes, net_tx_bytes) = traffic.unwrap_or((0, 0));
    pb::SandboxSample {
        sandbox_id: sandbox_id.to_string(),
        at_ms,
        cpu_count: metrics
            .get("cpu_count")
            .and_then(Value::as_u64)
            .and_then(|cpus| u32::try_from(cpus).ok())
            .unwrap_or(default_cpus),
        cpu_used_pct: metrics
            .get("cpu_used_pct")
            .and_then(Value::as_f64)
            .filter(|pct| pct.is_finite())
            .unwrap_or(0.0)
            .clamp(0.0, 100.0),
        mem_used: count("mem_used"),
        mem_total: count("mem_total"),
        mem_cache: count("mem_cache"),
        disk_used: count("disk_used"),
        disk_total: count("disk_total"),
        net_rx_bytes,
        net_tx_bytes,
        ..pb::SandboxSample::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(epoch: &str, after: u64) -> pb::CollectTelemetryRequest {
        pb::CollectTelemetryRequest {
            epoch: epoch.into(),
            after,
            limit: 0,
        }
    }

    #[test]
    fn envd_json_lines_keep_their_level_message_and_fields_and_other_text_is_console() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .timestamp_millis();
        let line = log_line(
            br#"{"timestamp":"2026-12-03T09:59:59.500Z","level":"WARN","fields":{"message":"process started","pid":42},"target":"wrenn_envd::rpc::process"}"#,
            now,
        );
        assert_eq!(line.level, "warn");
        assert_eq!(line.message, "process started");
        assert_eq!(line.at_ms, now - 500);
        let fields: serde_json::Map<String, Value> =
            serde_json::from_str(&line.fields_json).unwrap();
        assert_eq!(fields["pid"], "42");
        assert_eq!(fields["source"], "envd");
        assert_eq!(fields["target"], "wrenn_envd::rpc::process");

        // A guest's clock far off is not believed.
        let future = log_line(
            br#"{"timestamp":"2030-01-01T00:00:00Z","level":"INFO","fields":{"message":"x"}}"#,
            now,
        );
        assert_eq!(future.at_ms, now);

        let console = log_line(b"hello from the console\r", now);
        assert_eq!(console.level, "info");
        assert_eq!(console.message, "hello from the console");
        assert_eq!(console.fields_json, r#"{"source":"console"}"#);

        let long = log_line("é".repeat(MAX_LINE_BYTES).as_bytes(), now);
        assert!(long.message.len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn console_tails_read_new_lines_across_rotation_and_keep_unended_ones() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "one\ntwo\nthr").unwrap();
        let telemetry = Telemetry::new(DEFAULT_INTERVAL, 100);
        telemetry.follow_console("s", &log);
        telemetry.read_console("s");
        let messages = |telemetry: &Telemetry| -> Vec<String> {
            telemetry
                .collect(&ask("", 0))
                .logs
                .into_iter()
                .map(|line| line.message)
                .collect()
        };
        assert_eq!(messages(&telemetry), ["one", "two"]);
        // The rest of "three", then a rotation: the older half's rest, then the new file.
        let mut older = std::fs::read(&log).unwrap();
        older.extend_from_slice(b"ee\nfour\n");
        std::fs::write(wrenn_vmm::console::previous_log(&log), &older).unwrap();
        std::fs::write(&log, "five\n").unwrap();
        telemetry.read_console("s");
        assert_eq!(
            messages(&telemetry),
            ["one", "two", "three", "four", "five"]
        );
        // A line not ended when the VM stops is kept.
        std::fs::write(&log, "five\nsix").unwrap();
        telemetry.finish_console("s", &log);
        assert_eq!(
            messages(&telemetry),
            ["one", "two", "three", "four", "five", "six"]
        );
        // An adopted VM's console is followed from its end.
        std::fs::write(&log, "old\n").unwrap();
        telemetry.follow_console_from_end("s", &log);
        std::fs::write(&log, "old\nnew\n").unwrap();
        telemetry.read_console("s");
        assert_eq!(messages(&telemetry).last().unwrap(), "new");
    }

    #[test]
    fn a_console_never_followed_is_read_whole_when_its_vm_stops() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "booted\nlast words").unwrap();
        let telemetry = Telemetry::new(DEFAULT_INTERVAL, 100);
        telemetry.finish_console("quick", &log);
        let messages: Vec<String> = telemetry
            .collect(&ask("", 0))
            .logs
            .into_iter()
            .map(|line| line.message)
            .collect();
        assert_eq!(messages, ["booted", "last words"]);
    }

    #[test]
    fn a_flooding_console_keeps_its_newest_lines_and_says_how_many_went() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let flood: String = (0..2_000).map(|n| format!("line {n}\n")).collect();
        std::fs::write(&log, flood).unwrap();
        let telemetry = Telemetry::new(DEFAULT_INTERVAL, 10_000);
        telemetry.follow_console("s", &log);
        telemetry.read_console("s");
        let logs = telemetry.collect(&ask("", 0)).logs;
        assert_eq!(logs.len(), MAX_LINES_PER_TICK + 1);
        assert_eq!(logs[MAX_LINES_PER_TICK - 1].message, "line 1999");
        assert!(
            logs.last()
                .unwrap()
                .message
                .starts_with("1500 console lines")
        );
    }

    #[test]
    fn traffic_is_read_from_the_taps_row_from_the_guests_side() {
        let table = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  tap0:    1500      10    0    0    0     0          0         0     9000      20    0    0    0     0       0          0
";
        assert_eq!(tap_traffic(table, "tap0"), Some((9000, 1500)));
        assert_eq!(tap_traffic(table, "eth0"), None);
    }

    #[test]
    fn samples_take_envds_figures_and_refuse_nonsense() {
        let metrics: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"cpu_count":2,"cpu_used_pct":250.0,"mem_used":5,"mem_total":10,"disk_used":1,"disk_total":2}"#,
        )
        .unwrap();
        let sample = sample_of("s", 7, &metrics, 1, Some((3, 4)));
        assert_eq!(sample.cpu_count, 2);
        assert_eq!(sample.cpu_used_pct, 100.0);
        assert_eq!(
            (sample.mem_used, sample.mem_total, sample.mem_cache),
            (5, 10, 0)
        );
        assert_eq!((sample.net_rx_bytes, sample.net_tx_bytes), (3, 4));
    }

    #[test]
    fn a_guests_many_fields_are_cut_to_a_lines_length() {
        let fields: serde_json::Map<String, Value> = (0..60)
            .map(|n| (format!("f{n}"), Value::String("x".repeat(4000))))
            .collect();
        let raw = serde_json::json!({"level": "INFO", "fields": fields}).to_string();
        let line = log_line(raw.as_bytes(), 0);
        assert!(
            line.fields_json.len() <= MAX_LINE_BYTES + 200,
            "{}",
            line.fields_json.len()
        );
        assert!(line.fields_json.contains("truncated"));
    }
}
