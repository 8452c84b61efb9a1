//! Templates from registries' images: a reference parsed (`wrenn_agent_api::image_reference`), the image pulled over
//! the distribution API into the host's blob cache ([`registry`], [`cache`]), its layers
//! unpacked into a tree ([`layers`]), and the tree made a wrenn root filesystem with the guest's
//! own files and a `user` account ([`rootfs`]). The template build then boots it like the base
//! image (`manager::build`).

pub mod cache;
pub mod layers;
pub mod registry;
pub mod rootfs;

pub use cache::BlobCache;
pub use registry::{Credentials, ImageConfig, PulledImage, Registries};
pub use wrenn_agent_api::image_reference::{self as reference, ImageReference};

/// Why an image could not be made a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A bad reference, manifest or config.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The registry wants credentials, or refused the ones given.
    #[error("{0}")]
    Unauthorized(String),
    /// The registry answered with an error, or the agent would not go where it pointed.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    TooLarge(String),
    /// Bytes that do not hash to the digest that names them.
    #[error("{0}")]
    DigestMismatch(String),
    #[error("{0}")]
    Network(String),
    /// A layer that could not be unpacked (which, and why).
    #[error("{0}")]
    Layer(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> OciError {
        OciError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<OciError> for crate::AgentError {
    fn from(error: OciError) -> Self {
        use crate::AgentError;
        match error {
            OciError::Invalid(_) | OciError::Unsupported(_) | OciError::TooLarge(_) => {
                AgentError::InvalidArgument(error.to_string())
            }
            OciError::NotFound(_) => AgentError::NotFound(error.to_string()),
            OciError::Cancelled(_) => AgentError::Cancelled(error.to_string()),
            OciError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                AgentError::ResourceExhausted(format!("the host's disk is full: {error}"))
            }
            OciError::Io { .. } => AgentError::Internal(error.to_string()),
            OciError::Unauthorized(_)
            | OciError::Refused(_)
            | OciError::DigestMismatch(_)
            | OciError::Network(_)
            | OciError::Layer(_) => AgentError::FailedPrecondition(error.to_string()),
        }
    }
}
