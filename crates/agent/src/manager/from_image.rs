//! The first part of a build from a registry's image: the image pulled (layers the host has
//! are not fetched again), unpacked into a tree, given wrenn's guest files and the sandbox user,
//! and made an ext4 root filesystem, in a staging directory that goes whatever happens. The
//! build then boots it ([`TemplateSource::Rootfs`]) and runs its steps like any other.

use std::sync::atomic::AtomicBool;

use wrenn_agent_api::build::{ImageSource, LogLevel};

use super::build::{BuildLogger, DEFAULT_USER, DEFAULT_WORKDIR};
use super::templates::TemplateSource;
use super::*;
use crate::oci::{Credentials, ImageReference, OciError, PulledImage, layers, rootfs};

/// The most an image's files may weigh unpacked.
const MAX_UNPACKED_BYTES: u64 = 64 << 30;
/// Disk left free for everything else when an image is unpacked.
const UNPACK_RESERVE_BYTES: u64 = 1 << 30;

/// A root filesystem made from an image, and what the image's config sets.
pub(super) struct ImageRootfs {
    pub source: TemplateSource,
    pub user: String,
    pub workdir: String,
    pub envs: std::collections::BTreeMap<String, String>,
    /// Removed when dropped: kept until the template has taken the root filesystem.
    pub staging: StagingDir,
}

/// A directory removed when dropped.
pub(super) struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where builds from images stage their trees.
pub(super) fn staging_root(data_dir: &Path) -> PathBuf {
    data_dir.join("oci").join("staging")
}

impl Manager {
    /// Pulls `image` into the host's blob cache (layers it has are not fetched again); `stop`
    /// cancels.
    pub(super) async fn pull_image(
        &self,
        image: &ImageSource,
        logger: &BuildLogger,
        stop: &CancellationToken,
    ) -> Result<PulledImage, AgentError> {
        let step = || Some("base".to_string());
        let reference = ImageReference::parse(&image.reference).map_err(|why| {
            AgentError::InvalidArgument(format!("fromImage {:?}: {why}", image.reference))
        })?;
        let credentials = match (&image.username, &image.password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(AgentError::InvalidArgument(
                    "a registry login needs both a username and a password".into(),
                ));
            }
        };
        logger.log(LogLevel::Info, step(), format!("pulling {reference}"));
        let progress = |line: String| logger.log(LogLevel::Info, step(), line);
        cancellable(
            stop,
            self.registries
                .pull(&reference, credentials.as_ref(), &self.blobs, &progress),
        )
        .await
    }

    /// Makes the root filesystem of `template_id` from the pulled image, the guest's files
    /// taken from `kit` (a template of this host made from an image, `base`); `stop` cancels.
    pub(super) async fn rootfs_from_image(
        &self,
        template_id: &str,
        pulled: PulledImage,
        kit: &TemplateRecord,
        logger: &BuildLogger,
        stop: &CancellationToken,
    ) -> Result<ImageRootfs, AgentError> {
        let step = || Some("base".to_string());
        let kit_rootfs = self
            .store
            .template_dir(&kit.template_id)
            .join("rootfs.ext4");
        let kit_size_mib = std::fs::metadata(&kit_rootfs)
            .map_err(|_| {
                AgentError::FailedPrecondition(format!(
                    "template {} has no root filesystem of its own to take envd and the init from",
                    kit.template_id
                ))
            })?
            .len()
            >> 20;
        let staging = StagingDir(staging_root(&self.config.data_dir).join(template_id));
        let _ = std::fs::remove_dir_all(&staging.0);
        crate::store::private_dir(&staging.0)?;

        let tree = staging.0.join("tree");
        std::fs::create_dir(&tree)
            .map_err(|error| AgentError::internal("making the image's tree", error))?;
        let started = Instant::now();
        let stopped = Arc::new(AtomicBool::new(false));
        // The tree and the filesystem made of it take about as much again: half the free disk
        // (less a reserve), and never past the largest image pulled.
        let free = nix::sys::statvfs::statvfs(&staging.0)
            .map(|stats| stats.blocks_available() * stats.fragment_size())
            .map_err(|error| AgentError::internal("reading the free disk", error))?;
        let max_bytes = (free.saturating_sub(UNPACK_RESERVE_BYTES) / 2).min(MAX_UNPACKED_BYTES);
        let unpacked = {
            let layers = pulled.layers.clone();
            let tree = tree.clone();
            let stopped_flag = stopped.clone();
            let work = tokio::task::spawn_blocking(move || {
                layers::unpack_layers(&layers, &tree, &stopped_flag, max_bytes)
            });
            let stop_watch = {
                let stop = stop.clone();
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                })
            };
            let result = work.await;
            stop_watch.abort();
            result
                .map_err(|error| AgentError::internal("unpacking the layers", error))?
                .map_err(AgentError::from)?
        };
        let in_use: Vec<PathBuf> = pulled
            .layers
            .iter()
            .map(|layer| layer.path.clone())
            .collect();
        self.blobs.trim(&in_use);
        logger.log(
            LogLevel::Info,
            step(),
            format!(
                "unpacked {} layers: {} files, {:.1} MiB, {} whiteouts ({} ms)",
                pulled.layers.len(),
                unpacked.entries,
                unpacked.bytes as f64 / 1048576.0,
                unpacked.whiteouts,
                started.elapsed().as_millis()
            ),
        );

        let kit_dir = staging.0.join("kit");
        cancellable(stop, async {
            rootfs::extract_kit(&kit_rootfs, &kit_dir).await
        })
        .await?;
        let accounts = {
            let tree = tree.clone();
            tokio::task::spawn_blocking(move || {
                rootfs::install_kit(&tree, &kit_dir)?;
                rootfs::add_accounts(&tree)
            })
            .await
            .map_err(|error| AgentError::internal("adding wrenn's guest files", error))?
            .map_err(AgentError::from)?
        };
        if let Some(uid) = accounts.added_user {
            logger.log(
                LogLevel::Info,
                step(),
                format!(
                    "added the user {DEFAULT_USER} (uid {uid}){}",
                    if accounts.sudo { ", with sudo" } else { "" }
                ),
            );
        }
        let image_file = staging.0.join("rootfs.ext4");
        let size_mib = cancellable(
            stop,
            rootfs::make_filesystem(&tree, &image_file, kit_size_mib),
        )
        .await?;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tree)).await;
        logger.log(
            LogLevel::Info,
            step(),
            format!("root filesystem ready ({size_mib} MiB)"),
        );

        let config = pulled.config;
        let envs = config
            .env
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let user = config.user.unwrap_or_else(|| DEFAULT_USER.to_string());
        // A USER of uid[:gid] names the account by number: envd takes names.
        let user = user.split(':').next().unwrap_or(&user).to_string();
        let workdir = config
            .working_dir
            .unwrap_or_else(|| DEFAULT_WORKDIR.to_string());
        Ok(ImageRootfs {
            source: TemplateSource::Rootfs {
                rootfs: image_file,
                kernel_from: Box::new(kit.clone()),
            },
            user,
            workdir,
            envs,
            staging,
        })
    }
}

/// Runs `work` until it ends or `stop` is cancelled.
async fn cancellable<T>(
    stop: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, OciError>>,
) -> Result<T, AgentError> {
    tokio::select! {
        result = work => result.map_err(AgentError::from),
        () = stop.cancelled() => Err(AgentError::Cancelled("the build was stopped".into())),
    }
}
