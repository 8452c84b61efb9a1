//! Copy-on-write disks: each sandbox's disk is a qcow2 overlay over its template's frozen disk
//! (itself an overlay over the template's copy of the image's root filesystem), so a sandbox
//! writes only its own changes and its size is the base's.
//!
//! Firecracker opens one raw file: a template's chain is flattened into `disk.raw` once
//! ([`flatten_to_raw`]), and each sandbox's disk is a clone of it ([`create_sandbox_disk`]): a
//! reflink where the filesystem shares blocks (XFS, Btrfs: instant, and only what the sandbox
//! writes takes space), a sparse copy elsewhere (ext4: the template's used blocks are copied,
//! so a create costs a read and write of them, and each sandbox takes their size).

use std::path::Path;

use crate::error::AgentError;

/// Creates `target`, a qcow2 overlay backed by `backing` (of format `backing_format`).
pub async fn create_overlay(
    backing: &Path,
    backing_format: &str,
    target: &Path,
) -> Result<(), AgentError> {
    if !backing.is_file() {
        return Err(AgentError::Internal(format!(
            "the base disk {} is missing",
            backing.display()
        )));
    }
    qemu_img(
        "create",
        &["-q", "-f", "qcow2", "-F", backing_format, "-b"],
        backing,
        target,
    )
    .await?;
    // The disk holds what the sandbox writes: root's alone.
    crate::store::private_file(target)
}

/// Creates `target`, a qcow2 overlay of `size` bytes backed by `backing` (of format
/// `backing_format`) without opening `backing` (`qemu-img create -u`): for the top of a disk a
/// running VMM holds, whose locks refuse a reader.
pub async fn create_overlay_unopened(
    backing: &Path,
    backing_format: &str,
    target: &Path,
    size: u64,
) -> Result<(), AgentError> {
    let output = tokio::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            backing_format,
            "-b",
        ])
        .arg(backing)
        .arg(target)
        .arg(size.to_string())
        .output()
        .await
        .map_err(|error| {
            AgentError::internal("running qemu-img (Debian package qemu-utils)", error)
        })?;
    if !output.status.success() {
        return Err(AgentError::Internal(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    crate::store::private_file(target)
}

/// Makes the disk of a sandbox of a template whose disk is `template_disk`: a qcow2 overlay,
/// or (`raw`, for Firecracker) a clone of the template's raw file.
pub async fn create_sandbox_disk(
    raw: bool,
    template_disk: &Path,
    target: &Path,
) -> Result<(), AgentError> {
    if !raw {
        return create_overlay(template_disk, "qcow2", target).await;
    }
    if !template_disk.is_file() {
        return Err(AgentError::Internal(format!(
            "the base disk {} is missing",
            template_disk.display()
        )));
    }
    copy_file(template_disk, target).await
}

/// Writes the disk whose top is `disk` (a qcow2 chain or a raw file) as one sparse raw file at
/// `raw` (`qemu-img convert`), through a temporary file renamed into place.
pub async fn flatten_to_raw(disk: &Path, raw: &Path) -> Result<(), AgentError> {
    let partial = raw.with_extension("raw.partial");
    if let Err(error) = qemu_img("convert", &["-q", "-O", "raw", "-S", "4k"], disk, &partial).await
    {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, raw)
        .map_err(|error| AgentError::internal("putting the raw disk in place", error))?;
    crate::store::private_file(raw)
}

/// Copies `from` to `to` (sparse, and shared on filesystems that can).
pub async fn copy_file(from: &Path, to: &Path) -> Result<(), AgentError> {
    let status = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=auto")
        .arg(from)
        .arg(to)
        .status()
        .await
        .map_err(|error| AgentError::internal("copying a disk file", error))?;
    if !status.success() {
        return Err(AgentError::Internal(format!(
            "copying {} failed",
            from.display()
        )));
    }
    crate::store::private_file(to)
}

/// Points the qcow2 file `disk` at `backing` (of `backing_format`) without touching its data
/// (`qemu-img rebase -u`): for a layer moved beside a copy of what it stood on.
pub async fn rebase(disk: &Path, backing: &Path, backing_format: &str) -> Result<(), AgentError> {
    qemu_img(
        "rebase",
        &["-q", "-u", "-f", "qcow2", "-F", backing_format, "-b"],
        backing,
        disk,
    )
    .await
}

/// Runs `qemu-img <command> <options> <backing> <disk>`: an error with its words if it fails.
async fn qemu_img(
    command: &str,
    options: &[&str],
    backing: &Path,
    disk: &Path,
) -> Result<(), AgentError> {
    let output = tokio::process::Command::new("qemu-img")
        .arg(command)
        .args(options)
        .arg(backing)
        .arg(disk)
        .output()
        .await
        .map_err(|error| {
            AgentError::internal("running qemu-img (Debian package qemu-utils)", error)
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AgentError::Internal(format!(
            "qemu-img {command} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    /// A raw base with data at 1 MiB, a qcow2 overlay over it that writes at 3 MiB: the chain's
    /// flattened raw file reads as both, keeps its holes, and a sandbox's clone of it is the
    /// same bytes (a reflink or a sparse copy), a file of its own.
    #[tokio::test]
    async fn chains_flatten_into_sparse_raw_disks_that_sandboxes_clone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("rootfs.ext4");
        let file = std::fs::File::create(&base).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        drop(file);
        let overlay = dir.path().join("disk.qcow2");
        create_overlay(&base, "raw", &overlay).await.unwrap();
        let status = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 9 3M 4k"])
            .arg(&overlay)
            .status()
            .expect("running qemu-io (Debian package qemu-utils)");
        assert!(status.success(), "qemu-io wrote nothing");

        let raw = dir.path().join("disk.raw");
        flatten_to_raw(&overlay, &raw).await.unwrap();
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 7));
        assert!(bytes[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 9));
        assert!(bytes[5 << 20..6 << 20].iter().all(|&b| b == 0));
        let metadata = std::fs::metadata(&raw).unwrap();
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "the raw disk is sparse: {} bytes allocated",
            metadata.blocks() * 512
        );

        let sandbox = dir.path().join("sandbox.raw");
        create_sandbox_disk(true, &raw, &sandbox).await.unwrap();
        assert_eq!(std::fs::read(&sandbox).unwrap(), bytes);
        // The clone is the sandbox's own: its writes do not reach the template's disk.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&sandbox)
            .unwrap()
            .write_all_at(&[1u8; 4096], 0)
            .unwrap();
        assert_eq!(std::fs::read(&raw).unwrap(), bytes);

        let missing = create_sandbox_disk(true, &dir.path().join("gone.raw"), &sandbox)
            .await
            .unwrap_err()
            .to_string();
        assert!(missing.contains("gone.raw"), "{missing}");
    }
}
