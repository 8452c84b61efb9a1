//! Guest images for wrenn sandboxes, built from Debian's packages with the project's own recipe
//! (`images/` at the workspace root, embedded here):
//! - the **kernel** for QEMU: Debian's `linux-image-amd64`, unpacked (never installed), plus an
//!   initramfs (busybox) that loads the virtio, ext4 and vsock modules and mounts the root disk;
//! - the **base root filesystem**: debootstrap (bookworm, minbase) with the packages of
//!   `images/rootfs/packages.txt`, the `user` account, envd as PID 1 through `wrenn-init`, turned
//!   into a sparse ext4 image by `mkfs.ext4 -d` (no mounting);
//! - a `manifest.json` that records versions, sizes and content hashes.
//!
//! Stages are cached separately (kernel, base tree), so a changed envd only re-packs the image.
//! Every stage is built in a temporary directory and renamed into place when complete.

mod build;
pub mod check;
mod command;
pub mod cpio;
mod error;
mod kernel;
pub mod manifest;
pub mod progress;
pub mod recipe;
mod rootfs;
mod stage;

pub use build::{
    BuildOptions, BuildOutcome, DEFAULT_MIRROR, ENVD_GUEST_PATH, ENVD_PORT, GUEST_BUSYBOX,
    GUEST_INIT, GUEST_IP_CMDLINE, GUEST_POWEROFF, build, copy_tree, default_cache_dir,
    default_cmdline, default_image_dir, filesystem_size_mib, mkfs_ext4_command,
};
pub use check::{Problem, check};
pub use error::ImageError;
pub use manifest::Manifest;
pub use stage::tree_bytes;

/// The marker envd carries in its binary, followed by its version and a NUL: how the image tools
/// learn envd's version without running a binary taken from an image.
pub const ENVD_VERSION_MARKER: &[u8] = b"wrenn-envd-protocol-version=";

/// Finds the envd version recorded in a binary's bytes, if the marker is there.
pub fn envd_version_in(binary: &[u8]) -> Option<String> {
    let start = binary
        .windows(ENVD_VERSION_MARKER.len())
        .position(|window| window == ENVD_VERSION_MARKER)?
        + ENVD_VERSION_MARKER.len();
    let rest = &binary[start..];
    let end = rest.iter().take(64).position(|&byte| byte == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_envds_own() {
        assert_eq!(ENVD_VERSION_MARKER, wrenn_envd::VERSION_MARKER_PREFIX);
    }

    #[test]
    fn version_is_found_between_marker_and_nul() {
        let mut bytes = b"\x7fELF junk".to_vec();
        bytes.extend_from_slice(ENVD_VERSION_MARKER);
        bytes.extend_from_slice(b"0.6.4\0more");
        assert_eq!(envd_version_in(&bytes).as_deref(), Some("0.6.4"));
        assert_eq!(envd_version_in(b"no marker here"), None);
        let mut unterminated = ENVD_VERSION_MARKER.to_vec();
        unterminated.extend_from_slice(b"0.6.4");
        assert_eq!(envd_version_in(&unterminated), None);
    }
}
