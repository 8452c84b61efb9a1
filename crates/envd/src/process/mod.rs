//! Processes: starting them (as a user, with pipes or a PTY), fanning their output out to
//! streams, feeding their input, signalling them, and reporting their end. Knows nothing of
//! Connect or HTTP; `rpc::process` maps it to the wire.

pub mod manager;
pub mod spawn;
pub mod status;

pub use manager::{
    ManagedProcess, ProcessConfig, ProcessError, ProcessEvent, ProcessManager, Selector,
    Subscription,
};
pub use spawn::{PtySize, SpawnSpec};
pub use status::ExitReport;
