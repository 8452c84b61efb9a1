//! The `wrenn` command's groups, one module each: `up` (wrenn on one machine), `server` (the
//! control plane alone), `agent` (the host agent, and calls to one), `key` (API keys), `image`
//! (guest images), and the CLI over a control plane: `sandbox`, `snapshot`, `template`, `host`, `audit` (with `events`). `plane`
//! holds what `up` and `server` share.

pub mod agent;
pub mod audit;
pub mod host;
pub mod image;
pub mod key;
mod plane;
pub mod sandbox;
pub mod server;
pub mod snapshot;
pub mod template;
pub mod up;
pub mod user;
