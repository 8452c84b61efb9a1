//! Why the control plane's work fails, named by cause ([`Error`]). The lifecycle, the fleet and
//! the quotas return it; only the HTTP edge (`api.rs`) turns a cause into a status code.

use std::time::Duration;

use wrenn_agent_api::HostAgentError;

use crate::auth::NoRandomness;
use crate::quota::QuotaExceeded;
use crate::store::StoreError;
use crate::unsupported::Unsupported;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sandbox \"{0}\" not found")]
    SandboxNotFound(String),
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    #[error("API key \"{0}\" not found")]
    KeyNotFound(String),
    #[error("team \"{0}\" not found")]
    TeamNotFound(String),
    #[error("token \"{0}\" not found")]
    TokenNotFound(String),
    #[error("member \"{0}\" not found")]
    MemberNotFound(String),
    /// Too many calls of one kind: try again after the time given.
    #[error("too many {what}: try again in {} s", .retry_after.as_secs().max(1))]
    RateLimited { what: String, retry_after: Duration },
    #[error("channel \"{0}\" not found")]
    ChannelNotFound(String),
    /// A host name or id the fleet does not know.
    #[error("{0}")]
    HostNotFound(String),
    /// A request that cannot be carried out as asked (a bad name, a missing field).
    #[error("{0}")]
    InvalidRequest(String),
    /// A credential that is missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// Something this control plane does not allow at all.
    #[error("{0}")]
    Forbidden(String),
    /// A hook refused the work (an extension's rule: see `hooks`), for this reason.
    #[error("{0}")]
    Refused(String),
    /// A request that contradicts the present state (a name taken, a host still up).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    QuotaExceeded(#[from] QuotaExceeded),
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// No host can take the work now.
    #[error("{0}")]
    NoCapacity(String),
    /// The sandbox's host is down or unknown.
    #[error("{0}")]
    HostDown(String),
    /// A host's agent refused or failed the work.
    #[error("host {host}: {source}")]
    Host {
        host: String,
        #[source]
        source: HostAgentError,
    },
    #[error("host {host}: {what} got no answer within {} s", .deadline.as_secs())]
    HostTimedOut {
        host: String,
        what: &'static str,
        deadline: Duration,
    },
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// The control plane's own failure (its disk), said as it is.
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    NoRandomness(#[from] NoRandomness),
}
