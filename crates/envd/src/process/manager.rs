//! The registry of processes envd started: who they are, their output fan-out, their input, and
//! their end.
//!
//! Output is fanned out to every subscriber (the `Start` stream and any number of `Connect`
//! streams) without blocking the process: each subscriber has its own queue, and one that falls
//! more than [`SUBSCRIBER_BACKLOG_BYTES`] behind is cut off (its stream ends with an error)
//! rather than stalling the process or growing without bound. The end of a process is delivered
//! on the same queue, after all of its output. Finished processes stay visible to a late
//! `Connect` for [`FINISHED_RETENTION`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, watch};

use super::spawn::{self, ChildIo, PtyMaster, PtySize, SpawnError, SpawnSpec};
use super::status::ExitReport;

/// How long a finished process can still be found by `Connect`.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(30);
/// How far a subscriber may fall behind before it is cut off.
pub const SUBSCRIBER_BACKLOG_BYTES: usize = 64 * 1024 * 1024;
/// Size of one read from a process's output.
const READ_CHUNK: usize = 32 * 1024;
/// After the process exits, its output pipes are drained until they stay silent this long
/// (a background grandchild may keep them open forever).
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// Something that happened to a process, as its subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End(ExitReport),
    /// This subscriber fell too far behind and was dropped; nothing more will come.
    Overflowed,
}

/// How a caller names a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

/// What the process was started with, as `List` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: HashMap<String, String>,
    pub cwd: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process with pid {0} not found")]
    PidNotFound(u32),
    #[error("process with tag {0} not found")]
    TagNotFound(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("error writing to stdin: stdin not enabled or closed")]
    StdinClosed,
    #[error("tty not assigned to process: input should be written to the stdin, not the tty")]
    NotPty,
    #[error("error closing stdin: cannot close stdin for PTY process, send Ctrl+D (0x04) instead")]
    IsPty,
    #[error(
        "error writing to stdin: tty assigned to process, input should be written to the pty, not the stdin"
    )]
    InputToPty,
    #[error("writing to the process failed: {0}")]
    Write(#[source] std::io::Error),
    #[error("resizing the terminal failed: {0}")]
    Resize(#[source] std::io::Error),
    #[error("sending signal {signal} failed: {source}")]
    Signal {
        signal: i32,
        #[source]
        source: std::io::Error,
    },
}

/// A subscriber's queue.
#[derive(Debug)]
pub struct Subscription {
    receiver: mpsc::UnboundedReceiver<ProcessEvent>,
    backlog: Arc<AtomicUsize>,
}

impl Subscription {
    /// The next event; `None` once the process has ended (after `End`) or the subscription was
    /// dropped.
    pub async fn next(&mut self) -> Option<ProcessEvent> {
        let event = self.receiver.recv().await?;
        self.backlog.fetch_sub(event_len(&event), Ordering::Relaxed);
        Some(event)
    }
}

fn event_len(event: &ProcessEvent) -> usize {
    match event {
        ProcessEvent::Stdout(b) | ProcessEvent::Stderr(b) | ProcessEvent::Pty(b) => b.len(),
        ProcessEvent::End(_) | ProcessEvent::Overflowed => 0,
    }
}

#[derive(Debug)]
struct Subscriber {
    sender: mpsc::UnboundedSender<ProcessEvent>,
    backlog: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Fanout {
    subscribers: Vec<Subscriber>,
    end: Option<ExitReport>,
}

/// One process envd started.
#[derive(Debug)]
pub struct ManagedProcess {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    fanout: Mutex<Fanout>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pty: Option<Arc<PtyMaster>>,
    exited: watch::Sender<bool>,
}

impl ManagedProcess {
    /// Subscribes to the process's output from now on, and to its end. A finished process
    /// yields its `End` at once.
    pub fn subscribe(&self) -> Subscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let mut fanout = self.fanout.lock().expect("fanout lock");
        match &fanout.end {
            Some(report) => {
                let _ = sender.send(ProcessEvent::End(report.clone()));
            }
            None => fanout.subscribers.push(Subscriber {
                sender,
                backlog: backlog.clone(),
            }),
        }
        Subscription { receiver, backlog }
    }

    pub fn is_running(&self) -> bool {
        self.fanout.lock().expect("fanout lock").end.is_none()
    }

    pub fn has_pty(&self) -> bool {
        self.pty.is_some()
    }

    fn publish(&self, event: ProcessEvent) {
        let len = event_len(&event);
        let mut fanout = self.fanout.lock().expect("fanout lock");
        fanout.subscribers.retain(|subscriber| {
            if subscriber.backlog.fetch_add(len, Ordering::Relaxed) + len > SUBSCRIBER_BACKLOG_BYTES
            {
                let _ = subscriber.sender.send(ProcessEvent::Overflowed);
                return false;
            }
            subscriber.sender.send(event.clone()).is_ok()
        });
    }

    fn finish(&self, report: ExitReport) {
        let mut fanout = self.fanout.lock().expect("fanout lock");
        for subscriber in fanout.subscribers.drain(..) {
            let _ = subscriber.sender.send(ProcessEvent::End(report.clone()));
        }
        fanout.end = Some(report);
    }

    /// Writes to the process's stdin pipe.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ProcessError> {
        if self.pty.is_some() {
            return Err(ProcessError::InputToPty);
        }
        let mut stdin = self.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or(ProcessError::StdinClosed)?;
        pipe.write_all(data).await.map_err(ProcessError::Write)?;
        pipe.flush().await.map_err(ProcessError::Write)
    }

    /// Writes to the process's terminal.
    pub async fn write_pty(&self, data: &[u8]) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NotPty)?;
        pty.write_all(data).await.map_err(ProcessError::Write)
    }

    /// Closes stdin (end of input for the process).
    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        if self.pty.is_some() {
            return Err(ProcessError::IsPty);
        }
        self.stdin.lock().await.take();
        Ok(())
    }

    pub fn resize(&self, size: PtySize) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NotPty)?;
        pty.resize(size).map_err(ProcessError::Resize)
    }

    /// Sends a signal to the process's whole group (its session, for a PTY), so that the
    /// children of a shell go with it.
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        if !self.is_running() {
            return Ok(());
        }
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the group id is the process's own pid.
        let mut result = unsafe { libc::kill(-pid, signal) };
        if result < 0 {
            // The group may be gone while the leader lingers: signal the process itself.
            // SAFETY: as above.
            result = unsafe { libc::kill(pid, signal) };
        }
        if result < 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(ProcessError::Signal { signal, source });
        }
        Ok(())
    }
}

/// Every process envd started, running or recently finished.
#[derive(Debug, Default)]
pub struct ProcessManager {
    processes: Arc<Mutex<HashMap<u32, Arc<ManagedProcess>>>>,
}

impl ProcessManager {
    /// Starts a process and returns it with a subscription that sees all of its output.
    pub fn start(
        &self,
        spec: &SpawnSpec,
        tag: Option<String>,
        config: ProcessConfig,
    ) -> Result<(Arc<ManagedProcess>, Subscription), ProcessError> {
        let (mut child, io) = spawn::spawn(spec)?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let (stdin, stdout, stderr, pty) = match io {
            ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => (stdin, Some(stdout), Some(stderr), None),
            ChildIo::Pty(master) => (None, None, None, Some(Arc::new(master))),
        };
        let (exited, _) = watch::channel(false);
        let process = Arc::new(ManagedProcess {
            pid,
            tag,
            config,
            fanout: Mutex::default(),
            stdin: tokio::sync::Mutex::new(stdin),
            pty,
            exited,
        });
        let subscription = process.subscribe();
        self.processes
            .lock()
            .expect("process table lock")
            .insert(pid, process.clone());

        let registry = self.processes.clone();
        let watched = process.clone();
        tokio::spawn(async move {
            let mut readers = Vec::new();
            if let Some(stdout) = stdout {
                readers.push(tokio::spawn(pump(
                    watched.clone(),
                    stdout,
                    ProcessEvent::Stdout,
                )));
            }
            if let Some(stderr) = stderr {
                readers.push(tokio::spawn(pump(
                    watched.clone(),
                    stderr,
                    ProcessEvent::Stderr,
                )));
            }
            if let Some(pty) = &watched.pty {
                readers.push(tokio::spawn(pump(
                    watched.clone(),
                    pty.reader(),
                    ProcessEvent::Pty,
                )));
            }
            let report = match child.wait().await {
                Ok(status) => ExitReport::from_status(status),
                Err(error) => ExitReport::wait_failed(&error),
            };
            watched.exited.send_replace(true);
            for reader in readers {
                let _ = reader.await;
            }
            watched.stdin.lock().await.take();
            watched.finish(report);
            tokio::time::sleep(FINISHED_RETENTION).await;
            let mut table = registry.lock().expect("process table lock");
            if table.get(&pid).is_some_and(|p| Arc::ptr_eq(p, &watched)) {
                table.remove(&pid);
            }
        });
        Ok((process, subscription))
    }

    /// Finds a running or recently finished process.
    pub fn find(&self, selector: &Selector) -> Result<Arc<ManagedProcess>, ProcessError> {
        let table = self.processes.lock().expect("process table lock");
        match selector {
            Selector::Pid(pid) => table
                .get(pid)
                .cloned()
                .ok_or(ProcessError::PidNotFound(*pid)),
            Selector::Tag(tag) => table
                .values()
                .filter(|p| p.tag.as_deref() == Some(tag.as_str()))
                // Prefer a running process over a finished one with the same tag.
                .max_by_key(|p| p.is_running())
                .cloned()
                .ok_or_else(|| ProcessError::TagNotFound(tag.clone())),
        }
    }

    /// Finds a process that is still running.
    pub fn find_running(&self, selector: &Selector) -> Result<Arc<ManagedProcess>, ProcessError> {
        let process = self.find(selector)?;
        if process.is_running() {
            Ok(process)
        } else {
            Err(match selector {
                Selector::Pid(pid) => ProcessError::PidNotFound(*pid),
                Selector::Tag(tag) => ProcessError::TagNotFound(tag.clone()),
            })
        }
    }

    /// Whether envd still waits for this pid (started by it and not yet reaped).
    pub fn is_waiting_for(&self, pid: u32) -> bool {
        self.processes
            .lock()
            .expect("process table lock")
            .get(&pid)
            .is_some_and(|p| p.is_running())
    }

    /// The running processes, ordered by pid.
    pub fn list(&self) -> Vec<Arc<ManagedProcess>> {
        let table = self.processes.lock().expect("process table lock");
        let mut running: Vec<_> = table.values().filter(|p| p.is_running()).cloned().collect();
        running.sort_by_key(|p| p.pid);
        running
    }
}

async fn pump<R: AsyncRead + Unpin>(
    process: Arc<ManagedProcess>,
    mut reader: R,
    wrap: fn(Bytes) -> ProcessEvent,
) {
    let mut exited = process.exited.subscribe();
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut draining = false;
    loop {
        let read = if draining {
            match tokio::time::timeout(DRAIN_QUIET, reader.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_quiet) => return,
            }
        } else {
            tokio::select! {
                read = reader.read(&mut buffer) => read,
                _ = exited.wait_for(|done| *done) => { draining = true; continue; }
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => process.publish(wrap(Bytes::copy_from_slice(&buffer[..n]))),
        }
    }
}
