//! `wrenn image build`: the stages in order (kernel, base rootfs, assembly), a no-op when every
//! input is unchanged, and an image directory that only ever holds a complete image: it is
//! assembled in a temporary directory beside it and renamed into place at the end.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{self, require_tool};
use crate::error::ImageError;
use crate::kernel::{self, KernelStage};
use crate::manifest::{
    EnvdInfo, INITRD_FILE, KERNEL_FILE, KernelInfo, MANIFEST_FORMAT, Manifest, ROOTFS_FILE,
    RootfsInfo, describe_file, hash_bytes,
};
use crate::progress::{Progress, format_bytes, format_duration};
use crate::rootfs;
use crate::{envd_version_in, recipe, stage};

/// The guest's fixed address, its gateway (the tap in its slot) and netmask.
pub const GUEST_IP_CMDLINE: &str = "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off";
/// Where envd listens in the guest.
pub use wrenn_proto::ENVD_PORT;
/// Where envd is inside the guest.
pub const ENVD_GUEST_PATH: &str = "/usr/bin/envd";
/// Where a root filesystem carries the static busybox wrenn's init runs its tools from.
pub const GUEST_BUSYBOX: &str = "/usr/lib/wrenn/busybox";
/// Where a root filesystem carries wrenn's init (the initramfs starts `/sbin/wrenn-init`, which
/// is this in Debian, whose `/sbin` is a link to `usr/sbin`).
pub const GUEST_INIT: &str = "/usr/sbin/wrenn-init";
/// Where a root filesystem carries `poweroff` (and `reboot`, a link to it).
pub const GUEST_POWEROFF: &str = "/usr/local/sbin/poweroff";
/// Debian's mirror unless `--mirror` says otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What to build and from what.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The finished image: `vmlinuz`, `initrd.img`, `rootfs.ext4`, `manifest.json`.
    pub image_dir: PathBuf,
    /// Where the cached stages and the build log live.
    pub cache_dir: PathBuf,
    /// The static envd to put in the image.
    pub envd_binary: PathBuf,
    /// The envd version this wrenn speaks; a binary with another is refused.
    pub expected_envd_version: String,
    pub mirror: String,
    /// Free space left in the root filesystem beyond its files.
    pub headroom_mib: u64,
    /// Rebuild the image even if its inputs are unchanged (cached stages are still used).
    pub force: bool,
}

/// What a build did.
#[derive(Debug, Clone)]
pub enum BuildOutcome {
    /// Every input was unchanged: nothing was written.
    UpToDate(Manifest),
    Built(Manifest),
}

impl BuildOutcome {
    pub fn manifest(&self) -> &Manifest {
        match self {
            BuildOutcome::UpToDate(manifest) | BuildOutcome::Built(manifest) => manifest,
        }
    }
}

/// `$WRENN_CACHE_DIR`, else `$XDG_CACHE_HOME/wrenn`, else `~/.cache/wrenn`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WRENN_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("wrenn");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/wrenn")
}

/// The base image's directory inside the cache directory.
pub fn default_image_dir() -> PathBuf {
    default_cache_dir().join("images/base")
}

/// Builds the image (or finds it up to date).
pub fn build(options: &BuildOptions, progress: &mut Progress) -> Result<BuildOutcome, ImageError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(ImageError::NotRoot);
    }
    for (program, package) in [
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
        ("debootstrap", "debootstrap"),
        ("chroot", "coreutils"),
        ("cp", "coreutils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
    ] {
        require_tool(program, package)?;
    }
    let envd = read_envd(&options.envd_binary, &options.expected_envd_version)?;
    let packages = kernel::resolve_packages()?;
    let inputs_key = inputs_key(options, &packages, &envd.blake3);
    let image_dir = &options.image_dir;
    if !options.force
        && let Ok(manifest) = Manifest::read(image_dir)
        && manifest.inputs_key == inputs_key
        && files_look_whole(image_dir, &manifest)
    {
        progress.note(&format!("{} is up to date", image_dir.display()));
        return Ok(BuildOutcome::UpToDate(manifest));
    }

    let cache_dir = &options.cache_dir;
    let image_parent = image_dir
        .parent()
        .ok_or_else(|| ImageError::Invalid("the image directory has no parent".into()))?
        .to_path_buf();
    for dir in [cache_dir, &image_parent] {
        std::fs::create_dir_all(dir)
            .map_err(|error| ImageError::io(format!("creating {}", dir.display()), dir, error))?;
    }
    let _lock = BuildLock::take(cache_dir)?;
    stage::clean_leftovers(cache_dir)?;
    stage::clean_leftovers(&image_parent)?;
    let base_cached = rootfs::cached(cache_dir, &options.mirror).is_some();
    let need_gib = if base_cached { 2.0 } else { 4.0 };
    ensure_space(cache_dir, need_gib)?;
    let log = cache_dir.join("image-build.log");
    let _ = std::fs::write(
        &log,
        format!("wrenn image build, {}\n", chrono::Utc::now().to_rfc3339()),
    );

    let kernel = kernel::ensure(cache_dir, &packages, &log, progress)?;
    let base = rootfs::ensure(cache_dir, &options.mirror, &log, progress)?;

    progress.stage("assemble");
    let name = image_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "base".into());
    let work = stage::TempDir::create(&image_parent, &name)?;
    let staging = work.path().join("image");
    std::fs::create_dir_all(&staging)
        .map_err(|error| ImageError::io("creating the staging directory", &image_parent, error))?;
    let farm = work.path().join("tree");
    progress.update("linking the base tree");
    let mut link = Command::new("cp");
    link.arg("-a").arg("--link").arg(base.tree()).arg(&farm);
    command::run("linking the base tree", link, &log, progress)?;
    inject(&farm, &kernel, &options.envd_binary, &inputs_key, &name)?;

    let tree_bytes = stage::tree_bytes(&farm);
    let size_mib = filesystem_size_mib(tree_bytes, options.headroom_mib);
    let rootfs_path = staging.join(ROOTFS_FILE);
    progress.update(&format!(
        "mkfs.ext4 -d ({size_mib} MiB, {} of files)",
        format_bytes(tree_bytes)
    ));
    let file = std::fs::File::create(&rootfs_path)
        .map_err(|error| ImageError::io("creating the rootfs image", &image_parent, error))?;
    file.set_len(size_mib * 1024 * 1024)
        .map_err(|error| ImageError::io("sizing the rootfs image", &image_parent, error))?;
    drop(file);
    let mkfs = mkfs_ext4_command(&farm, &rootfs_path);
    command::run("mkfs.ext4 -d", mkfs, &log, progress)?;
    stage::remove_tree(&farm)?;
    for (from, to) in [
        (kernel.vmlinuz(), KERNEL_FILE),
        (kernel.initrd(), INITRD_FILE),
    ] {
        std::fs::copy(&from, staging.join(to))
            .map_err(|error| ImageError::io(format!("copying {to}"), &image_parent, error))?;
    }

    progress.update("hashing");
    let mut files = BTreeMap::new();
    for file in [KERNEL_FILE, INITRD_FILE, ROOTFS_FILE] {
        files.insert(file.to_string(), describe_file(&staging.join(file))?);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name,
        built_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        build_seconds: (progress.total().as_secs_f64() * 10.0).round() / 10.0,
        inputs_key,
        kernel: KernelInfo {
            package: kernel.package.clone(),
            package_version: kernel.package_version.clone(),
            release: kernel.release.clone(),
            modules: kernel.modules.clone(),
            cmdline: default_cmdline(),
        },
        envd,
        rootfs: RootfsInfo {
            suite: base.suite.clone(),
            mirror: base.mirror.clone(),
            packages: base.packages.clone(),
            tree_bytes,
            filesystem: "ext4".into(),
        },
        files,
    };
    manifest.write(&staging)?;
    work.promote("image", image_dir)?;
    let rootfs = &manifest.files[ROOTFS_FILE];
    progress.finish_stage(&format!(
        "{} ({} apparent, {} on disk)",
        image_dir.display(),
        format_bytes(rootfs.size),
        format_bytes(rootfs.allocated)
    ));
    progress.note(&format!("built in {}", format_duration(progress.total())));
    Ok(BuildOutcome::Built(manifest))
}

/// The kernel command line for booting the image under QEMU (serial console, root on the
/// first virtio disk, the guest's fixed address).
pub fn default_cmdline() -> String {
    format!("console=ttyS0 root=/dev/vda rw panic=-1 quiet {GUEST_IP_CMDLINE}")
}

fn inputs_key(
    options: &BuildOptions,
    packages: &kernel::KernelPackages,
    envd_hash: &str,
) -> String {
    let inputs = format!(
        "image-v1\n{}\n{}\n{envd_hash}\n{}\n{}\n{}\n",
        kernel::stage_key(packages),
        rootfs::stage_key(&options.mirror),
        recipe::WRENN_INIT,
        recipe::POWEROFF,
        options.headroom_mib
    );
    hash_bytes(inputs.as_bytes())
}

fn files_look_whole(image_dir: &Path, manifest: &Manifest) -> bool {
    [KERNEL_FILE, INITRD_FILE, ROOTFS_FILE].iter().all(|file| {
        let recorded = manifest.files.get(*file).map(|info| info.size);
        std::fs::metadata(image_dir.join(file))
            .map(|m| m.len())
            .ok()
            == recorded
            && recorded.is_some()
    })
}

/// Reads the envd binary and checks that it is static and speaks the expected version.
fn read_envd(path: &Path, expected: &str) -> Result<EnvdInfo, ImageError> {
    let bytes = std::fs::read(path).map_err(|error| ImageError::Io {
        context: format!(
            "reading envd at {} (build it with scripts/build-envd.sh)",
            path.display()
        ),
        source: error,
    })?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(ImageError::Invalid(format!(
            "{} is not an ELF binary",
            path.display()
        )));
    }
    if has_interpreter(&bytes) {
        return Err(ImageError::Invalid(format!(
            "{} is dynamically linked; the guest needs a static envd (scripts/build-envd.sh)",
            path.display()
        )));
    }
    let version = envd_version_in(&bytes).ok_or_else(|| {
        ImageError::Invalid(format!(
            "{} carries no envd version marker: is it envd?",
            path.display()
        ))
    })?;
    if version != expected {
        return Err(ImageError::Invalid(format!(
            "{} is envd {version}, this wrenn expects {expected}: rebuild it (scripts/build-envd.sh)",
            path.display()
        )));
    }
    Ok(EnvdInfo {
        version,
        blake3: hash_bytes(&bytes),
        size: bytes.len() as u64,
        path: ENVD_GUEST_PATH.into(),
        port: ENVD_PORT,
    })
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header (a dynamic loader).
fn has_interpreter(elf: &[u8]) -> bool {
    let read_u16 = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let read_u64 = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")) as usize)
    };
    let (Some(table), Some(entry_size), Some(count)) =
        (read_u64(0x20), read_u16(0x36), read_u16(0x38))
    else {
        return false;
    };
    (0..count).any(|index| {
        let at = table + index * entry_size;
        elf.get(at..at + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

/// Adds what is wrenn's own to the hard-linked tree: envd, the init, poweroff, the kernel's
/// modules, and a note of the image. Every path is unlinked before it is written, so no file of
/// the cached base tree is ever modified through a hard link.
fn inject(
    farm: &Path,
    kernel: &KernelStage,
    envd_binary: &Path,
    inputs_key: &str,
    name: &str,
) -> Result<(), ImageError> {
    let envd = std::fs::read(envd_binary).map_err(|error| ImageError::Io {
        context: format!("reading {}", envd_binary.display()),
        source: error,
    })?;
    write_new(
        &farm.join(ENVD_GUEST_PATH.trim_start_matches('/')),
        &envd,
        0o755,
    )?;
    let busybox = std::fs::read(kernel.busybox()).map_err(|error| ImageError::Io {
        context: format!("reading {}", kernel.busybox().display()),
        source: error,
    })?;
    write_new(
        &farm.join(GUEST_BUSYBOX.trim_start_matches('/')),
        &busybox,
        0o755,
    )?;
    write_new(
        &farm.join(GUEST_INIT.trim_start_matches('/')),
        recipe::WRENN_INIT.as_bytes(),
        0o755,
    )?;
    write_new(
        &farm.join(GUEST_POWEROFF.trim_start_matches('/')),
        recipe::POWEROFF.as_bytes(),
        0o755,
    )?;
    let reboot = farm.join("usr/local/sbin/reboot");
    let _ = std::fs::remove_file(&reboot);
    std::os::unix::fs::symlink("poweroff", &reboot)
        .map_err(|error| ImageError::io("linking reboot", farm, error))?;
    let note = serde_json::json!({ "name": name, "inputs_key": inputs_key });
    write_new(
        &farm.join("etc/wrenn/image.json"),
        note.to_string().as_bytes(),
        0o644,
    )?;
    // /lib is a link to /usr/lib in Debian; the modules go where it points.
    let modules_target = farm.join("usr/lib/modules").join(&kernel.release);
    if modules_target.exists() {
        stage::remove_tree(&modules_target)?;
    }
    copy_tree(&kernel.modules_tree(), &modules_target)
}

/// Writes a file that did not exist in the hard-linked tree (removing any link first).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), ImageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| {
            ImageError::io(format!("creating {}", parent.display()), parent, error)
        })?;
    }
    let _ = std::fs::remove_file(path);
    std::fs::write(path, contents)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|error| ImageError::io(format!("writing {}", path.display()), path, error))
}

/// Copies a directory tree of regular files (the module tree; the agent copies the kernel's
/// modules into roots made from registries' images with it too).
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(to)
        .map_err(|error| ImageError::io(format!("creating {}", to.display()), to, error))?;
    let entries = std::fs::read_dir(from).map_err(|error| ImageError::Io {
        context: format!("listing {}", from.display()),
        source: error,
    })?;
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|error| {
                ImageError::io(format!("copying {}", target.display()), to, error)
            })?;
        }
    }
    Ok(())
}

/// `mkfs.ext4 -d`: an ext4 file system in `image` (a file already sized) holding the tree at
/// `tree`, owned by root at its top, reproducible (no clock in it). Image builds and the agent's
/// templates from registries' images make their root filesystems with it.
pub fn mkfs_ext4_command(tree: &Path, image: &Path) -> Command {
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args([
        "-q",
        "-F",
        "-L",
        "wrenn-root",
        "-b",
        "4096",
        "-m",
        "1",
        "-E",
        "root_owner=0:0",
        "-d",
    ])
    .arg(tree)
    .arg(image)
    .env("E2FSPROGS_FAKE_TIME", "0");
    mkfs
}

/// Root filesystem size: the files plus an eighth for metadata, plus headroom, rounded up to
/// 256 MiB.
pub fn filesystem_size_mib(tree_bytes: u64, headroom_mib: u64) -> u64 {
    let files_mib = tree_bytes.div_ceil(1024 * 1024);
    let wanted = files_mib + files_mib / 8 + 64 + headroom_mib;
    wanted.div_ceil(256) * 256
}

fn ensure_space(dir: &Path, need_gib: f64) -> Result<(), ImageError> {
    let Ok(stats) = nix::sys::statvfs::statvfs(dir) else {
        return Ok(());
    };
    let have_gib =
        stats.blocks_available() as f64 * stats.fragment_size() as f64 / f64::from(1u32 << 30);
    if have_gib < need_gib {
        return Err(ImageError::NotEnoughSpace {
            dir: dir.to_path_buf(),
            need_gib,
            have_gib,
        });
    }
    Ok(())
}

/// One build at a time per cache directory (an exclusive `flock` held for the build).
struct BuildLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl BuildLock {
    fn take(cache_dir: &Path) -> Result<Self, ImageError> {
        let path = cache_dir.join(".image-build.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| ImageError::io("opening the build lock", cache_dir, error))?;
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| {
                ImageError::Invalid(format!(
                    "another image build is running (it holds {})",
                    path.display()
                ))
            })?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_with_headroom() {
        assert_eq!(filesystem_size_mib(0, 0), 256);
        let size = filesystem_size_mib(900 * 1024 * 1024, 1024);
        assert_eq!(size % 256, 0);
        assert!(size >= 900 + 112 + 1024);
    }

    #[test]
    fn a_dynamic_binary_is_told_from_a_static_one() {
        let dynamic = std::fs::read("/bin/sh").unwrap();
        assert!(has_interpreter(&dynamic));
        assert!(!has_interpreter(b"\x7fELF short"));
    }
}
