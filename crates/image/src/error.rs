//! The image builder's errors: each says what failed in plain words and where the full log is.

use std::path::PathBuf;

/// Why an image build or check could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the disk is full while {context} (in {dir}): free some space and run the build again")]
    DiskFull { context: String, dir: PathBuf },
    #[error(
        "not enough free space in {dir}: the build needs about {need_gib:.1} GiB and {have_gib:.1} GiB is free"
    )]
    NotEnoughSpace {
        dir: PathBuf,
        need_gib: f64,
        have_gib: f64,
    },
    #[error("`{program}` is not installed: install the Debian package `{package}`")]
    MissingTool {
        program: &'static str,
        package: &'static str,
    },
    #[error("{step} failed ({status}): {summary}\n  full log: {log}")]
    Command {
        step: String,
        status: String,
        summary: String,
        log: PathBuf,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("the image build must run as root (debootstrap, chroot and device files need it)")]
    NotRoot,
}

impl ImageError {
    /// Wraps an I/O error, turning "no space left" into the plain disk-full error.
    pub(crate) fn io(
        context: impl Into<String>,
        dir: &std::path::Path,
        source: std::io::Error,
    ) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            ImageError::DiskFull {
                context: context.into(),
                dir: dir.to_path_buf(),
            }
        } else {
            ImageError::Io {
                context: context.into(),
                source,
            }
        }
    }
}
