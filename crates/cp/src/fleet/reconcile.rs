//! The reconcile pass: the store made to agree with what a host's agent really runs.

use super::*;
use crate::store::BuildStatus;

/// What one reconcile pass of a host did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Rows whose sandbox the agent no longer has (or had failed), removed.
    pub removed: Vec<String>,
    /// Rows whose state was corrected to the agent's.
    pub corrected: Vec<String>,
    /// Sandboxes the agent ran that the store did not know, destroyed.
    pub orphans: Vec<String>,
    /// Build templates the host had whose build the store no longer keeps (deleted, or ended
    /// in error while the host finished it), deleted from the host (and its template store).
    pub orphan_templates: Vec<String>,
}

/// Makes the store agree with what `host`'s agent runs. The store is read first and states are
/// changed only if unchanged since, so a pause or resume racing the pass wins.
pub async fn reconcile_host(
    store: &Store,
    fleet: &Fleet,
    host: &Host,
) -> Result<Reconciled, Error> {
    let name = host.row().name;
    let host_id = host.id();
    let rows = store.sandboxes_on_host(&host_id).await?;
    let agent: HashMap<String, SandboxSummary> = host
        .list()
        .await?
        .into_iter()
        .map(|sandbox| (sandbox.sandbox_id.clone(), sandbox))
        .collect();
    let mut done = Reconciled::default();
    let known: HashSet<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    for row in &rows {
        match agent.get(&row.id).map(|s| s.state) {
            None => {
                tracing::warn!(sandbox = %row.id, host = %name, "drift: the host no longer has the sandbox: removing it");
                store.delete_sandbox(&row.id).await?;
                fleet.forget(&row.id);
                done.removed.push(row.id.clone());
            }
            Some(SandboxState::Failed) => {
                tracing::warn!(sandbox = %row.id, host = %name, "drift: the sandbox's VM failed: removing it");
                host.destroy(&row.id).await?;
                store.delete_sandbox(&row.id).await?;
                fleet.forget(&row.id);
                done.removed.push(row.id.clone());
            }
            Some(on_host @ (SandboxState::Running | SandboxState::Paused)) => {
                let state = match on_host {
                    SandboxState::Running => RowState::Running,
                    _ => RowState::Paused,
                };
                if state == row.state {
                    continue;
                }
                let changed = store.set_state_if(&row.id, row.state, state).await?;
                if changed {
                    tracing::warn!(sandbox = %row.id, host = %name, from = %row.state, to = %state, "drift: state corrected");
                    fleet.forget(&row.id);
                    done.corrected.push(row.id.clone());
                }
            }
            _ => {}
        }
    }
    let grace = fleet.config.orphan_grace.as_millis() as i64;
    for sandbox in agent.values() {
        if known.contains(sandbox.sandbox_id.as_str())
            || fleet.creating.contains(&sandbox.sandbox_id)
            || now_ms() - sandbox.created_at_ms < grace
        {
            continue;
        }
        // Written since the rows were read? Being created or changed by another replica (it
        // holds the sandbox's turn)?
        // (The turn first: a create writes its row before it gives its turn up.)
        if (store.shared()
            && store
                .lease_held(&crate::replica::turn_lease_name(&sandbox.sandbox_id))
                .await?)
            || store.sandbox(&sandbox.sandbox_id).await?.is_some()
        {
            continue;
        }
        tracing::warn!(sandbox = %sandbox.sandbox_id, host = %name, "drift: the store does not know this sandbox: destroying it");
        host.destroy(&sandbox.sandbox_id).await?;
        done.orphans.push(sandbox.sandbox_id.clone());
    }
    // This process's own agent: its templates are read now, not at the last tick.
    let templates = match host.agent.report_in_process() {
        Some(report) => report.templates,
        None => host.row().report.templates,
    };
    for template in templates {
        let Some(build_id) = build_of_host_template(&template.template_id) else {
            continue;
        };
        if now_ms() - template.created_at_ms < grace {
            continue;
        }
        let kept = store.build(&build_id).await?.is_some_and(|build| {
            matches!(
                build.status,
                BuildStatus::Ready | BuildStatus::Building | BuildStatus::Waiting
            )
        });
        if kept {
            continue;
        }
        // One a sandbox still stands on (a deleted template's) stays until a later pass.
        match host.delete_template(&template.template_id).await {
            Ok(()) => {
                tracing::info!(template = %template.template_id, host = %name, "no build keeps this template: deleted it");
                done.orphan_templates.push(template.template_id.clone())
            }
            Err(Error::Host {
                source: HostAgentError::Conflict(why),
                ..
            }) => {
                tracing::debug!(template = %template.template_id, host = %name, %why, "the deleted template stays while sandboxes use it")
            }
            Err(error) => {
                tracing::warn!(template = %template.template_id, host = %name, %error, "the orphan template stays for now")
            }
        }
    }
    Ok(done)
}

/// The build (its UUID) a host template is made by: `b` and the UUID's 32 hex digits.
fn build_of_host_template(host_template: &str) -> Option<String> {
    if !crate::service::templates::is_build_template(host_template) {
        return None;
    }
    let hex = &host_template[1..];
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}
