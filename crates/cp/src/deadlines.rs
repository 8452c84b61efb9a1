//! Every deadline of the control plane's calls to host agents, in one place, and the bound on
//! how much lifecycle work runs at once for one host. An agent that accepts connections and
//! never answers must cost a caller a bounded wait, and must not hold up the work of other
//! hosts: the loops in [`crate::ControlPlane`] give each host its own tasks.

use std::time::Duration;

/// Opening a connection to an agent's API.
pub const CONNECT: Duration = Duration::from_secs(5);
/// A control call's answer: list, destroy, host information.
pub const CONTROL_CALL: Duration = Duration::from_secs(30);
/// A VM operation's answer: create, pause, resume. Generous, because under software emulation
/// (TCG) a restore and a snapshot take tens of seconds, but finite.
pub const VM_OPERATION: Duration = Duration::from_secs(5 * 60);
/// The edge proxy's wait for the response head from an agent's sandbox proxy (its connection
/// has the agent proxy's own 5 s connect deadline). Bodies, streams and upgraded connections
/// are not limited.
pub const PROXY_RESPONSE: Duration = Duration::from_secs(5 * 60);
/// Lifecycle actions (kill or pause on timeout) running at once against one host; more wait
/// for the next tick.
pub const ACTIONS_PER_HOST: usize = 4;
