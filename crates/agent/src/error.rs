//! The agent's errors, each with the Connect code its API answers with.

use wrenn_connect::{Code, ConnectError};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
    /// The caller went away, or asked it to stop.
    #[error("{0}")]
    Cancelled(String),
    #[error(transparent)]
    Vmm(#[from] wrenn_vmm::VmmError),
}

impl AgentError {
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        AgentError::Internal(format!("{context}: {error}"))
    }

    /// The Connect code the API answers with.
    pub fn code(&self) -> Code {
        match self {
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::ResourceExhausted(_) => Code::ResourceExhausted,
            AgentError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            AgentError::Cancelled(_) => Code::Canceled,
            AgentError::Internal(_) | AgentError::Vmm(_) => Code::Internal,
        }
    }
}

impl From<AgentError> for ConnectError {
    fn from(error: AgentError) -> Self {
        ConnectError::new(error.code(), error.to_string())
    }
}

impl From<AgentError> for wrenn_agent_api::HostAgentError {
    fn from(error: AgentError) -> Self {
        use wrenn_agent_api::HostAgentError as E;
        let message = error.to_string();
        match error {
            AgentError::NotFound(_) => E::NotFound(message),
            AgentError::InvalidArgument(_) => E::InvalidArgument(message),
            AgentError::FailedPrecondition(_) | AgentError::AlreadyExists(_) => {
                E::Conflict(message)
            }
            AgentError::ResourceExhausted(_) => E::NoCapacity(message),
            AgentError::DeadlineExceeded(_) => E::TimedOut(message),
            AgentError::Cancelled(_) | AgentError::Internal(_) | AgentError::Vmm(_) => {
                E::Failed(message)
            }
        }
    }
}
