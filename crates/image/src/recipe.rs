//! The image recipe files of `images/`, embedded so the `wrenn` binary builds images anywhere.
//! Their contents are part of every stage's cache key.

/// The initramfs's `/init` (busybox sh): loads modules, mounts the root disk, switches root.
pub const INITRAMFS_INIT: &str = include_str!("../../../images/initramfs/init");
/// The guest's `/sbin/wrenn-init`: kernel filesystems, network from `ip=`, then `exec envd`.
pub const WRENN_INIT: &str = include_str!("../../../images/rootfs/wrenn-init");
/// `/usr/local/sbin/poweroff` (and `reboot`): signal envd, the guest's PID 1.
pub const POWEROFF: &str = include_str!("../../../images/rootfs/poweroff");
/// Debian packages of the base root filesystem.
pub const PACKAGES: &str = include_str!("../../../images/rootfs/packages.txt");
/// Runs in the base tree after the packages: user, sudo, host name, clean-up.
pub const CONFIGURE: &str = include_str!("../../../images/rootfs/configure.sh");
/// The Firecracker guest kernel recipe (explicit, long: not part of CI).
pub const FIRECRACKER_KERNEL_BUILD: &str =
    include_str!("../../../images/firecracker-kernel/build.sh");
/// Kernel configuration fragment applied by the Firecracker kernel recipe.
pub const FIRECRACKER_KERNEL_CONFIG: &str =
    include_str!("../../../images/firecracker-kernel/microvm.config");

/// The Debian release the base image is built from.
pub const SUITE: &str = "bookworm";
/// Debian's meta-package that names the current kernel image.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// The static busybox the initramfs runs.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Kernel modules the guest needs loaded before the root filesystem (their dependencies join).
pub const GUEST_MODULES: &[&str] = &[
    "crc32c_generic",
    "libcrc32c",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "ext4",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// Modules that must be present for the image to be usable (what `wrenn image check` demands).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "ext4",
    "vsock",
    "vmw_vsock_virtio_transport",
];

/// The packages of `packages.txt`, comments and blank lines left out.
pub fn packages() -> Vec<&'static str> {
    PACKAGES
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn package_list_has_what_the_sdk_assumes() {
        let packages = super::packages();
        for needed in [
            "python3",
            "python-is-python3",
            "python3-pip",
            "sudo",
            "bash",
            "nodejs",
            "npm",
            "git",
            "curl",
            "wget",
            "iproute2",
        ] {
            assert!(packages.contains(&needed), "{needed} missing");
        }
        assert!(packages.iter().all(|package| !package.contains(' ')));
    }
}
