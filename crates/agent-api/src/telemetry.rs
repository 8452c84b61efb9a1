//! The buffer a host keeps its sandboxes' telemetry in until the control plane collects it
//! (`HostAgent::telemetry`, the agent's `CollectTelemetry`): resource samples and log lines in
//! one bounded queue, numbered in the order they were made within one run of the agent (its
//! `epoch`). A collection returns what follows the caller's cursor and says when something it
//! had not seen was dropped (the queue overflowed, or the agent restarted). The real agent fills
//! it from its sandboxes (`wrenn_agent::telemetry`), the fake agent from its tests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use wrenn_proto::agent as pb;

/// The most entries a host keeps (samples and lines alike, about 200 bytes each).
pub const BUFFER_ENTRIES: usize = 50_000;
/// The most bytes (encoded) the entries a host keeps may take: a guest's long lines cannot
/// make the buffer larger than this whatever their number.
pub const BUFFER_BYTES: usize = 32 << 20;
/// The most entries one collection returns.
pub const MAX_COLLECT: usize = 5_000;
/// The most bytes (encoded) one collection returns, well under a Connect message's 4 MiB: a
/// page of long lines is cut here and says `more`.
pub const MAX_COLLECT_BYTES: usize = 1 << 20;

/// One entry of the buffer.
#[derive(Debug, Clone)]
enum Entry {
    Sample(pb::SandboxSample),
    Log(pb::SandboxLogLine),
}

impl Entry {
    fn seq(&self) -> u64 {
        match self {
            Entry::Sample(sample) => sample.seq,
            Entry::Log(line) => line.seq,
        }
    }

    /// Its size in a collection's answer.
    fn bytes(&self) -> usize {
        match self {
            Entry::Sample(sample) => prost::Message::encoded_len(sample),
            Entry::Log(line) => prost::Message::encoded_len(line),
        }
    }
}

#[derive(Debug, Default)]
struct Buffer {
    entries: VecDeque<Entry>,
    /// The last seq given (the first entry is 1).
    last_seq: u64,
    /// The highest seq dropped to make room (0: none).
    dropped_through: u64,
    /// The entries' bytes ([`Entry::bytes`]).
    bytes: usize,
}

/// Samples and log lines waiting to be collected.
#[derive(Debug)]
pub struct TelemetryBuffer {
    epoch: String,
    interval: Duration,
    capacity: usize,
    buffer: Mutex<Buffer>,
}

impl TelemetryBuffer {
    /// An empty buffer of `capacity` entries, of a host that samples every `interval`.
    pub fn new(interval: Duration, capacity: usize) -> TelemetryBuffer {
        let epoch = wrenn_core::random::id("t", 15)
            // Unique enough when the OS cannot draw: this run's start.
            .unwrap_or_else(|_| format!("t{}", wrenn_core::now_ms()));
        TelemetryBuffer {
            epoch,
            interval,
            capacity: capacity.max(1),
            buffer: Mutex::new(Buffer::default()),
        }
    }

    /// How often the host samples its sandboxes.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many entries wait to be collected.
    pub fn len(&self) -> usize {
        self.buffer.lock().expect("telemetry lock").entries.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, make: impl FnOnce(u64) -> Entry) {
        let mut buffer = self.buffer.lock().expect("telemetry lock");
        buffer.last_seq += 1;
        let entry = make(buffer.last_seq);
        buffer.bytes += entry.bytes();
        buffer.entries.push_back(entry);
        while buffer.entries.len() > self.capacity || buffer.bytes > BUFFER_BYTES {
            let Some(dropped) = buffer.entries.pop_front() else {
                break;
            };
            buffer.bytes -= dropped.bytes();
            buffer.dropped_through = dropped.seq();
        }
    }

    /// Keeps a sample (its `seq` is given here).
    pub fn record_sample(&self, sample: pb::SandboxSample) {
        self.push(|seq| Entry::Sample(pb::SandboxSample { seq, ..sample }));
    }

    /// Keeps a log line (its `seq` is given here).
    pub fn record_log(&self, line: pb::SandboxLogLine) {
        self.push(|seq| Entry::Log(pb::SandboxLogLine { seq, ..line }));
    }

    /// The entries after the request's cursor, oldest first, at most its `limit` (and
    /// [`MAX_COLLECT`]) and [`MAX_COLLECT_BYTES`] (one at least), with `more` when others
    /// follow. A cursor of another run (or none) starts from the oldest kept.
    pub fn collect(&self, request: &pb::CollectTelemetryRequest) -> pb::CollectTelemetryResponse {
        let limit = match request.limit as usize {
            0 => MAX_COLLECT,
            limit => limit.min(MAX_COLLECT),
        };
        let buffer = self.buffer.lock().expect("telemetry lock");
        let this_run = request.epoch == self.epoch;
        let after = if this_run { request.after } else { 0 };
        // Something the caller has not seen is gone: dropped after its cursor, or of a run it
        // followed before this one.
        let gap = (this_run && buffer.dropped_through > after)
            || (!request.epoch.is_empty() && !this_run);
        let mut response = pb::CollectTelemetryResponse {
            epoch: self.epoch.clone(),
            next: after,
            gap,
            interval_ms: u32::try_from(self.interval.as_millis()).unwrap_or(u32::MAX),
            ..pb::CollectTelemetryResponse::default()
        };
        // Entries are in seq order: skip to the first after the cursor.
        let start = buffer.entries.partition_point(|entry| entry.seq() <= after);
        let mut bytes = 0;
        for (taken, entry) in buffer.entries.iter().skip(start).enumerate() {
            if taken == limit || (taken > 0 && bytes + entry.bytes() > MAX_COLLECT_BYTES) {
                response.more = true;
                break;
            }
            bytes += entry.bytes();
            response.next = entry.seq();
            match entry {
                Entry::Sample(sample) => response.samples.push(sample.clone()),
                Entry::Log(line) => response.logs.push(line.clone()),
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> pb::SandboxSample {
        pb::SandboxSample {
            sandbox_id: id.into(),
            ..pb::SandboxSample::default()
        }
    }

    fn ask(epoch: &str, after: u64) -> pb::CollectTelemetryRequest {
        pb::CollectTelemetryRequest {
            epoch: epoch.into(),
            after,
            limit: 0,
        }
    }

    #[test]
    fn collections_follow_the_cursor_and_say_when_entries_were_dropped() {
        let telemetry = TelemetryBuffer::new(Duration::from_secs(5), 3);
        let first = telemetry.collect(&ask("", 0));
        assert!(first.samples.is_empty() && !first.gap);
        for id in ["a", "b"] {
            telemetry.record_sample(sample(id));
        }
        let got = telemetry.collect(&ask(&first.epoch, 0));
        assert_eq!(got.samples.len(), 2);
        assert_eq!(got.next, 2);
        assert!(!got.gap);
        // Nothing new: the cursor stays.
        let again = telemetry.collect(&ask(&got.epoch, got.next));
        assert!(again.samples.is_empty());
        assert_eq!(again.next, 2);
        // Four more into a buffer of three: "c", after the cursor, is dropped unseen.
        for id in ["c", "d", "e", "f"] {
            telemetry.record_sample(sample(id));
        }
        let later = telemetry.collect(&ask(&got.epoch, got.next));
        assert!(later.gap, "the dropped entry is reported");
        let ids: Vec<&str> = later
            .samples
            .iter()
            .map(|s| s.sandbox_id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["d", "e", "f"][..],
            "a buffer of three keeps the newest three"
        );
        // A cursor of another run starts from the oldest kept, and says there may be a gap.
        let other = telemetry.collect(&ask("t-other", 99));
        assert_eq!(other.samples.len(), 3);
        assert!(other.gap);
    }

    #[test]
    fn pages_and_the_buffer_are_bounded_in_bytes_too() {
        let telemetry = TelemetryBuffer::new(Duration::from_secs(5), 1_000_000);
        let long = "x".repeat(100_000);
        for _ in 0..40 {
            telemetry.record_log(pb::SandboxLogLine {
                sandbox_id: "s".into(),
                message: long.clone(),
                ..pb::SandboxLogLine::default()
            });
        }
        let first = telemetry.collect(&ask("", 0));
        assert!(first.more, "4 MB of lines is more than a page");
        let page: usize = first.logs.iter().map(|line| line.message.len()).sum();
        assert!(page <= MAX_COLLECT_BYTES, "{page}");
        let second = telemetry.collect(&ask(&first.epoch, first.next));
        assert_eq!(second.logs.len(), first.logs.len());
        // 400 lines of 100 kB: the buffer keeps what fits in its bytes, the newest.
        for _ in 0..400 {
            telemetry.record_log(pb::SandboxLogLine {
                message: long.clone(),
                ..pb::SandboxLogLine::default()
            });
        }
        assert!(
            telemetry.len() * 100_000 <= BUFFER_BYTES,
            "{}",
            telemetry.len()
        );
        assert!(telemetry.collect(&ask(&first.epoch, first.next)).gap);
    }
}
