//! [`FakeAgent`]: an in-memory [`HostAgent`] for the control plane's fast tests, which run
//! without root, QEMU or a guest. Its semantics are the real agent's: sandboxes move through
//! the same states, an operation in the wrong state is refused as the agent refuses it
//! ([`HostAgentError::Conflict`]), a host with no free slot says so
//! ([`HostAgentError::NoCapacity`]), an unknown template or sandbox is
//! [`HostAgentError::NotFound`]. A test can inject what a real host does on a bad day: an error
//! for the next call of an operation, a delay, a VM that dies, a sandbox the agent lost, one the
//! control plane never knew; and read back every call the control plane made.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::join::{HostReport, TemplateReport};
use crate::{CreateOptions, GuestRoute, HostAgent, HostAgentError, SandboxState, SandboxSummary};

/// An operation of the [`HostAgent`] trait, to inject a failure or a delay into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Create,
    Pause,
    Resume,
    Destroy,
    List,
    Report,
}

/// A sandbox the fake holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSandbox {
    pub template_id: String,
    pub state: SandboxState,
    pub created_at_ms: i64,
    pub options: CreateOptions,
}

#[derive(Debug, Default)]
struct State {
    templates: Vec<TemplateReport>,
    slots_total: u32,
    memory_bytes: u64,
    disk_bytes: u64,
    sandboxes: BTreeMap<String, FakeSandbox>,
    failures: BTreeMap<Operation, Vec<HostAgentError>>,
    delays: BTreeMap<Operation, Duration>,
    calls: Vec<(Operation, String)>,
    next_id: u64,
}

/// An in-memory host agent.
#[derive(Debug)]
pub struct FakeAgent {
    state: Mutex<State>,
}

/// A template as the fake's hosts report it: `memory_mib` of memory, a 2 GiB disk.
pub fn template(template_id: &str, memory_mib: u32) -> TemplateReport {
    TemplateReport {
        template_id: template_id.into(),
        memory_mib,
        vcpus: 1,
        envd_version: "0.0.0-fake".into(),
        image_key: "fake".into(),
        created_at_ms: 0,
        disk_size_mb: 2048,
    }
}

use wrenn_core::now_ms;

impl FakeAgent {
    /// A host with `slots_total` network slots, 64 GiB of memory, 1 TiB of disk, and
    /// `templates`.
    pub fn new(slots_total: u32, templates: Vec<TemplateReport>) -> FakeAgent {
        FakeAgent {
            state: Mutex::new(State {
                templates,
                slots_total,
                memory_bytes: 64 << 30,
                disk_bytes: 1 << 40,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake agent lock")
    }

    /// The next call of `operation` fails with `error` (errors queue up, first in first out).
    pub fn fail_next(&self, operation: Operation, error: HostAgentError) {
        self.lock()
            .failures
            .entry(operation)
            .or_default()
            .push(error);
    }

    /// Every later call of `operation` takes `delay` before it does anything.
    pub fn delay(&self, operation: Operation, delay: Duration) {
        self.lock().delays.insert(operation, delay);
    }

    /// Sets the free memory and disk the host reports.
    pub fn set_free(&self, memory_bytes: u64, disk_bytes: u64) {
        let mut state = self.lock();
        state.memory_bytes = memory_bytes;
        state.disk_bytes = disk_bytes;
    }

    /// The sandbox's VM dies: the agent reports it failed.
    pub fn kill_vm(&self, sandbox_id: &str) -> bool {
        match self.lock().sandboxes.get_mut(sandbox_id) {
            Some(sandbox) => {
                sandbox.state = SandboxState::Failed;
                true
            }
            None => false,
        }
    }

    /// The agent loses the sandbox (its records are gone, as after a disk was wiped).
    pub fn lose(&self, sandbox_id: &str) -> bool {
        self.lock().sandboxes.remove(sandbox_id).is_some()
    }

    /// A running sandbox the control plane never asked for, created `age` ago.
    pub fn add_orphan(&self, sandbox_id: &str, template_id: &str, age: Duration) {
        let created_at_ms = now_ms() - age.as_millis() as i64;
        self.lock().sandboxes.insert(
            sandbox_id.into(),
            FakeSandbox {
                template_id: template_id.into(),
                state: SandboxState::Running,
                created_at_ms,
                options: CreateOptions {
                    template_id: template_id.into(),
                    sandbox_id: Some(sandbox_id.into()),
                    ..CreateOptions::default()
                },
            },
        );
    }

    /// The sandbox as the agent holds it.
    pub fn sandbox(&self, sandbox_id: &str) -> Option<FakeSandbox> {
        self.lock().sandboxes.get(sandbox_id).cloned()
    }

    /// Every sandbox's id and state.
    pub fn states(&self) -> BTreeMap<String, SandboxState> {
        self.lock()
            .sandboxes
            .iter()
            .map(|(id, sandbox)| (id.clone(), sandbox.state))
            .collect()
    }

    /// Every call the control plane made, in order, with the sandbox (or template) it named.
    pub fn calls(&self) -> Vec<(Operation, String)> {
        self.lock().calls.clone()
    }

    /// Records the call, waits its delay, and returns its injected failure if there is one.
    async fn begin(&self, operation: Operation, subject: &str) -> Result<(), HostAgentError> {
        let delay = {
            let mut state = self.lock();
            state.calls.push((operation, subject.to_string()));
            state.delays.get(&operation).copied()
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.lock();
        match state.failures.get_mut(&operation) {
            Some(queue) if !queue.is_empty() => Err(queue.remove(0)),
            _ => Ok(()),
        }
    }

    /// Moves a sandbox from `from` to `to`, or says why it cannot.
    fn transition(
        &self,
        sandbox_id: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> Result<(), HostAgentError> {
        let mut state = self.lock();
        let running = state
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .count() as u32;
        let slots_total = state.slots_total;
        let sandbox = state
            .sandboxes
            .get_mut(sandbox_id)
            .ok_or_else(|| HostAgentError::NotFound(format!("no sandbox {sandbox_id}")))?;
        if sandbox.state != from {
            return Err(HostAgentError::Conflict(format!(
                "sandbox {sandbox_id} is {}, not {from}",
                sandbox.state
            )));
        }
        if to == SandboxState::Running && running >= slots_total {
            return Err(HostAgentError::NoCapacity(
                "no free network slot on this host".into(),
            ));
        }
        sandbox.state = to;
        Ok(())
    }
}

#[async_trait::async_trait]
impl HostAgent for FakeAgent {
    async fn create(&self, options: CreateOptions) -> Result<(), HostAgentError> {
        self.begin(
            Operation::Create,
            options.sandbox_id.as_deref().unwrap_or(""),
        )
        .await?;
        let mut state = self.lock();
        if !state
            .templates
            .iter()
            .any(|t| t.template_id == options.template_id)
        {
            return Err(HostAgentError::NotFound(format!(
                "no template {}",
                options.template_id
            )));
        }
        let id = match &options.sandbox_id {
            Some(id) => id.clone(),
            None => {
                state.next_id += 1;
                format!("fake{}", state.next_id)
            }
        };
        if state.sandboxes.contains_key(&id) {
            return Err(HostAgentError::Conflict(format!(
                "sandbox {id} already exists"
            )));
        }
        let running = state
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .count() as u32;
        if running >= state.slots_total {
            return Err(HostAgentError::NoCapacity(
                "no free network slot on this host".into(),
            ));
        }
        state.sandboxes.insert(
            id,
            FakeSandbox {
                template_id: options.template_id.clone(),
                state: SandboxState::Running,
                created_at_ms: now_ms(),
                options,
            },
        );
        Ok(())
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        self.begin(Operation::Pause, sandbox_id).await?;
        self.transition(sandbox_id, SandboxState::Running, SandboxState::Paused)
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        self.begin(Operation::Resume, sandbox_id).await?;
        self.transition(sandbox_id, SandboxState::Paused, SandboxState::Running)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        self.begin(Operation::Destroy, sandbox_id).await?;
        match self.lock().sandboxes.remove(sandbox_id) {
            Some(_) => Ok(()),
            None => Err(HostAgentError::NotFound(format!("no sandbox {sandbox_id}"))),
        }
    }

    async fn list(&self) -> Result<Vec<SandboxSummary>, HostAgentError> {
        self.begin(Operation::List, "").await?;
        Ok(self
            .lock()
            .sandboxes
            .iter()
            .map(|(id, sandbox)| SandboxSummary {
                sandbox_id: id.clone(),
                state: sandbox.state,
                created_at_ms: sandbox.created_at_ms,
            })
            .collect())
    }

    async fn report(&self) -> Result<HostReport, HostAgentError> {
        self.begin(Operation::Report, "").await?;
        Ok(self.report_now())
    }

    fn report_in_process(&self) -> Option<HostReport> {
        Some(self.report_now())
    }

    /// The fake runs no guest: there is no port to reach.
    fn route(&self, _sandbox_id: &str, _port: u16) -> Option<GuestRoute> {
        None
    }
}

impl FakeAgent {
    fn report_now(&self) -> HostReport {
        let state = self.lock();
        let count = |wanted: SandboxState| {
            state
                .sandboxes
                .values()
                .filter(|s| s.state == wanted)
                .count() as u32
        };
        let running = count(SandboxState::Running);
        let committed_mib: u64 = state
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .filter_map(|s| {
                state
                    .templates
                    .iter()
                    .find(|t| t.template_id == s.template_id)
            })
            .map(|t| u64::from(t.memory_mib))
            .sum();
        HostReport {
            agent_version: "fake".into(),
            vmm: "fake".into(),
            accel: "none".into(),
            cpus: 2,
            memory_bytes: state.memory_bytes,
            memory_available_bytes: state.memory_bytes.saturating_sub(committed_mib << 20),
            sandboxes_running: running,
            sandboxes_paused: count(SandboxState::Paused),
            memory_committed_mib: committed_mib,
            slots_total: state.slots_total,
            slots_in_use: running,
            disk_available_bytes: state.disk_bytes,
            agent_rss_bytes: 0,
            templates: state.templates.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(id: &str) -> CreateOptions {
        CreateOptions {
            template_id: "base".into(),
            sandbox_id: Some(id.into()),
            ..CreateOptions::default()
        }
    }

    #[tokio::test]
    async fn states_move_as_the_agents_do_and_wrong_moves_are_refused() {
        let agent = FakeAgent::new(1, vec![template("base", 512)]);
        agent.create(options("a")).await.unwrap();
        assert!(matches!(
            agent.create(options("b")).await,
            Err(HostAgentError::NoCapacity(_))
        ));
        assert!(matches!(
            agent.resume("a").await,
            Err(HostAgentError::Conflict(_))
        ));
        agent.pause("a").await.unwrap();
        assert_eq!(agent.report_now().sandboxes_paused, 1);
        agent.create(options("b")).await.unwrap();
        assert!(
            matches!(agent.resume("a").await, Err(HostAgentError::NoCapacity(_))),
            "b holds the only slot"
        );
        agent.destroy("b").await.unwrap();
        agent.resume("a").await.unwrap();
        assert!(matches!(
            agent.destroy("b").await,
            Err(HostAgentError::NotFound(_))
        ));
        let unknown = CreateOptions {
            template_id: "nope".into(),
            ..options("c")
        };
        assert!(matches!(
            agent.create(unknown).await,
            Err(HostAgentError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn injected_failures_come_once_each_in_order() {
        let agent = FakeAgent::new(4, vec![template("base", 512)]);
        agent.fail_next(Operation::Create, HostAgentError::Failed("one".into()));
        agent.fail_next(Operation::Create, HostAgentError::TimedOut("two".into()));
        assert_eq!(
            agent.create(options("a")).await,
            Err(HostAgentError::Failed("one".into()))
        );
        assert_eq!(
            agent.create(options("a")).await,
            Err(HostAgentError::TimedOut("two".into()))
        );
        agent.create(options("a")).await.unwrap();
        assert_eq!(agent.calls().len(), 3);
        assert!(agent.kill_vm("a"));
        assert_eq!(agent.states()["a"], SandboxState::Failed);
    }
}
