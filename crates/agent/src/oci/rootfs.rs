//! An image's unpacked tree made into a wrenn root filesystem: wrenn's guest files (envd, its
//! init, the static busybox the init runs its tools from, `poweroff`, the kernel's modules)
//! taken from the host's base image, the mount points the init needs, a plain
//! `/etc/resolv.conf`, a `user` account as E2B's templates have (with sudo when the image has
//! it), then an ext4 file (`mkfs.ext4 -d`, no mounting). Every path is written through
//! [`resolve_in_root`]: the tree's links cannot send a write out of it.

use std::path::{Path, PathBuf};

use wrenn_image::{ENVD_GUEST_PATH, GUEST_BUSYBOX, GUEST_INIT, GUEST_POWEROFF};

use super::OciError;
use super::layers::{remove_any, resolve_dir, resolve_in_root};

/// Where the kernel's modules are in the base image.
const MODULES: &str = "/usr/lib/modules";
/// The room a template from an image has beyond its files, as the base image has.
const HEADROOM_MIB: u64 = 1024;
/// The sandbox user's name, home and preferred uid (E2B's templates have it).
pub const SANDBOX_USER: &str = "user";
const SANDBOX_HOME: &str = "/home/user";
const SANDBOX_UID: u32 = 1000;

/// Takes wrenn's guest files out of the base image's root filesystem (`debugfs`, read only)
/// into `kit`.
pub async fn extract_kit(base_rootfs: &Path, kit: &Path) -> Result<(), OciError> {
    std::fs::create_dir_all(kit)
        .map_err(|error| OciError::io("making the kit directory", error))?;
    let sources = [
        ENVD_GUEST_PATH,
        GUEST_INIT,
        GUEST_POWEROFF,
        GUEST_BUSYBOX,
        MODULES,
    ];
    let request = format!("rdump {} {}", sources.join(" "), kit.display());
    let output = tokio::process::Command::new("debugfs")
        .arg("-R")
        .arg(&request)
        .arg(base_rootfs)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| OciError::io("running debugfs (e2fsprogs)", error))?;
    for source in sources {
        let name = Path::new(source).file_name().expect("kit paths have names");
        if std::fs::symlink_metadata(kit.join(name)).is_err() {
            return Err(OciError::Invalid(format!(
                "the base image {} has no {source} ({}): rebuild it with `wrenn image build`",
                base_rootfs.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Puts the kit's files into `tree`, with the mount points and resolver file the init needs.
pub fn install_kit(tree: &Path, kit: &Path) -> Result<(), OciError> {
    for (from, to, mode) in [
        ("envd", ENVD_GUEST_PATH, 0o755),
        ("wrenn-init", GUEST_INIT, 0o755),
        ("busybox", GUEST_BUSYBOX, 0o755),
        ("poweroff", GUEST_POWEROFF, 0o755),
    ] {
        let bytes = std::fs::read(kit.join(from))
            .map_err(|error| OciError::io(format!("reading the kit's {from}"), error))?;
        write_file(tree, to, &bytes, mode, (0, 0))?;
    }
    let reboot = resolve_in_root(tree, Path::new("usr/local/sbin/reboot"))?;
    remove_any(&reboot)?;
    std::os::unix::fs::symlink("poweroff", &reboot)
        .map_err(|error| OciError::io("linking reboot", error))?;
    // The initramfs starts /sbin/wrenn-init (checking it from outside the tree, where an
    // absolute link would point into the initramfs): where /sbin is not usr/sbin, a copy.
    let init = resolve_in_root(tree, Path::new(GUEST_INIT))?;
    if resolve_in_root(tree, Path::new("sbin/wrenn-init"))? != init {
        let bytes = std::fs::read(kit.join("wrenn-init"))
            .map_err(|error| OciError::io("reading the kit's wrenn-init", error))?;
        write_file(tree, "/sbin/wrenn-init", &bytes, 0o755, (0, 0))?;
    }
    // The modules: where the guest's modprobe looks (/lib/modules, which is usr/lib/modules
    // where /lib is a link).
    let modules = kit.join("modules");
    let entries = std::fs::read_dir(&modules)
        .map_err(|error| OciError::io("listing the kit's modules", error))?;
    for entry in entries.flatten() {
        let target = resolve_in_root(tree, &Path::new("lib/modules").join(entry.file_name()))?;
        remove_any(&target)?;
        wrenn_image::copy_tree(&entry.path(), &target).map_err(|error| {
            OciError::io(
                "copying the modules",
                std::io::Error::other(error.to_string()),
            )
        })?;
    }
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("home", 0o755),
    ] {
        let path = resolve_in_root(tree, Path::new(dir))?;
        if !path.is_dir() {
            remove_any(&path)?;
            std::fs::create_dir(&path)
                .map_err(|error| OciError::io(format!("making /{dir}"), error))?;
            set_mode(&path, mode)?;
        }
    }
    // The init writes the resolver here; a link (to systemd's stub, say) would send it nowhere.
    write_file(tree, "/etc/resolv.conf", b"", 0o644, (0, 0))?;
    let hostname = resolve_in_root(tree, Path::new("etc/hostname"))?;
    if !hostname.exists() {
        write_file(tree, "/etc/hostname", b"sandbox\n", 0o644, (0, 0))?;
    }
    let hosts = resolve_in_root(tree, Path::new("etc/hosts"))?;
    if !hosts.exists() {
        write_file(
            tree,
            "/etc/hosts",
            b"127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
            (0, 0),
        )?;
    }
    Ok(())
}

/// What [`add_accounts`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounts {
    /// The sandbox user's uid, when it was added (None: the image has it).
    pub added_user: Option<u32>,
    /// Whether the user may sudo without a password (the image has sudo).
    pub sudo: bool,
}

/// Makes sure `tree` has `root` and the sandbox `user` (with a home), as wrenn's envd and the
/// SDKs expect.
pub fn add_accounts(tree: &Path) -> Result<Accounts, OciError> {
    let passwd_path = resolve_in_root(tree, Path::new("etc/passwd"))?;
    let group_path = resolve_in_root(tree, Path::new("etc/group"))?;
    let mut passwd = read_text(&passwd_path)?;
    let mut group = read_text(&group_path)?;
    let field = |line: &str, index: usize| line.split(':').nth(index).map(str::to_string);
    let has = |text: &str, name: &str| {
        text.lines()
            .any(|line| field(line, 0).as_deref() == Some(name))
    };
    let ids = |text: &str, index: usize| -> Vec<u32> {
        text.lines()
            .filter_map(|line| field(line, index)?.parse().ok())
            .collect()
    };
    let shell = if resolve_in_root(tree, Path::new("bin/bash"))?.exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    if !has(&passwd, "root") {
        passwd.insert_str(0, &format!("root:x:0:0:root:/root:{shell}\n"));
    }
    if !has(&group, "root") {
        group.insert_str(0, "root:x:0:\n");
    }
    let mut added_user = None;
    if !has(&passwd, SANDBOX_USER) {
        let taken_uids = ids(&passwd, 2);
        let taken_gids = ids(&group, 2);
        let uid = (SANDBOX_UID..)
            .find(|id| !taken_uids.contains(id) && !taken_gids.contains(id))
            .expect("a free id");
        if !passwd.is_empty() && !passwd.ends_with('\n') {
            passwd.push('\n');
        }
        passwd.push_str(&format!(
            "{SANDBOX_USER}:x:{uid}:{uid}::{SANDBOX_HOME}:{shell}\n"
        ));
        if !has(&group, SANDBOX_USER) {
            if !group.is_empty() && !group.ends_with('\n') {
                group.push('\n');
            }
            group.push_str(&format!("{SANDBOX_USER}:x:{uid}:\n"));
        }
        let shadow_path = resolve_in_root(tree, Path::new("etc/shadow"))?;
        if shadow_path.is_file() {
            let mut shadow = read_text(&shadow_path)?;
            if !shadow.is_empty() && !shadow.ends_with('\n') {
                shadow.push('\n');
            }
            shadow.push_str(&format!("{SANDBOX_USER}:*:19000:0:99999:7:::\n"));
            write_file(
                tree,
                "/etc/shadow",
                shadow.as_bytes(),
                0o640,
                owner_of(&shadow_path),
            )?;
        }
        let home = resolve_in_root(tree, Path::new(SANDBOX_HOME))?;
        if !home.is_dir() {
            remove_any(&home)?;
            std::fs::create_dir(&home).map_err(|error| OciError::io("making /home/user", error))?;
        }
        std::os::unix::fs::lchown(&home, Some(uid), Some(uid))
            .map_err(|error| OciError::io("owning /home/user", error))?;
        set_mode(&home, 0o755)?;
        added_user = Some(uid);
    }
    write_file(tree, "/etc/passwd", passwd.as_bytes(), 0o644, (0, 0))?;
    write_file(tree, "/etc/group", group.as_bytes(), 0o644, (0, 0))?;
    let sudoers = resolve_dir(tree, Path::new("etc/sudoers.d"), false)?;
    let sudo = match sudoers {
        Some(_) => {
            write_file(
                tree,
                "/etc/sudoers.d/wrenn-user",
                format!("{SANDBOX_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n").as_bytes(),
                0o440,
                (0, 0),
            )?;
            true
        }
        None => false,
    };
    Ok(Accounts { added_user, sudo })
}

/// Makes `image` an ext4 file system of `tree`: as large as its files need plus headroom, and
/// no smaller than `at_least_mib` (the base image's size, so sandboxes have its room). The
/// size in MiB.
pub async fn make_filesystem(
    tree: &Path,
    image: &Path,
    at_least_mib: u64,
) -> Result<u64, OciError> {
    let tree_bytes = {
        let tree = tree.to_path_buf();
        tokio::task::spawn_blocking(move || wrenn_image::tree_bytes(&tree))
            .await
            .map_err(|error| OciError::io("sizing the tree", std::io::Error::other(error)))?
    };
    let size_mib = wrenn_image::filesystem_size_mib(tree_bytes, HEADROOM_MIB).max(at_least_mib);
    let file = std::fs::File::create(image)
        .map_err(|error| OciError::io("making the root filesystem", error))?;
    file.set_len(size_mib << 20)
        .map_err(|error| OciError::io("sizing the root filesystem", error))?;
    drop(file);
    let output = tokio::process::Command::from(wrenn_image::mkfs_ext4_command(tree, image))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| OciError::io("running mkfs.ext4 (e2fsprogs)", error))?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let context = format!("mkfs.ext4 -d failed ({})", output.status);
        let kind = if said.contains("No space left") {
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        } else {
            std::io::Error::other(said.trim().to_string())
        };
        return Err(OciError::io(context, kind));
    }
    Ok(size_mib)
}

fn read_text(path: &Path) -> Result<String, OciError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_file() => std::fs::read_to_string(path)
            .map_err(|error| OciError::io(format!("reading {}", path.display()), error)),
        // A link or anything else is replaced by the file written after.
        _ => Ok(String::new()),
    }
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .map(|metadata| (metadata.uid(), metadata.gid()))
        .unwrap_or((0, 0))
}

/// Writes `bytes` at `path` in `tree` (whatever was there, a link too, replaced), owned and
/// moded.
fn write_file(
    tree: &Path,
    path: &str,
    bytes: &[u8],
    mode: u32,
    (uid, gid): (u32, u32),
) -> Result<PathBuf, OciError> {
    let target = resolve_in_root(tree, Path::new(path))?;
    remove_any(&target)?;
    std::fs::write(&target, bytes)
        .map_err(|error| OciError::io(format!("writing {path}"), error))?;
    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
        .map_err(|error| OciError::io(format!("owning {path}"), error))?;
    set_mode(&target, mode)?;
    Ok(target)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), OciError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|error| OciError::io(format!("moding {}", path.display()), error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_added_once_beside_the_images_own() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        std::fs::create_dir_all(tree.join("etc/sudoers.d")).unwrap();
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/bash"), "").unwrap();
        std::fs::write(
            tree.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/app:/bin/sh",
        )
        .unwrap();
        std::fs::write(tree.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        if !nix::unistd::geteuid().is_root() {
            wrenn_testkit::missing_prerequisite("accounts", "owning files as root needs root");
            return;
        }
        let accounts = add_accounts(tree).unwrap();
        assert_eq!(
            accounts,
            Accounts {
                added_user: Some(1001),
                sudo: true
            }
        );
        let passwd = std::fs::read_to_string(tree.join("etc/passwd")).unwrap();
        assert!(
            passwd.ends_with(
                "app:x:1000:1000::/app:/bin/sh\nuser:x:1001:1001::/home/user:/bin/bash\n"
            ),
            "{passwd}"
        );
        assert!(
            std::fs::read_to_string(tree.join("etc/group"))
                .unwrap()
                .contains("user:x:1001:\n")
        );
        assert!(tree.join("home/user").is_dir());
        assert!(
            std::fs::read_to_string(tree.join("etc/sudoers.d/wrenn-user"))
                .unwrap()
                .starts_with("user ALL=")
        );
        let again = add_accounts(tree).unwrap();
        assert_eq!(again.added_user, None);
        assert_eq!(
            std::fs::read_to_string(tree.join("etc/passwd")).unwrap(),
            passwd
        );
    }

    #[test]
    fn an_image_without_accounts_gets_root_and_user() {
        let dir = tempfile::tempdir().unwrap();
        if !nix::unistd::geteuid().is_root() {
            wrenn_testkit::missing_prerequisite("accounts", "owning files as root needs root");
            return;
        }
        let accounts = add_accounts(dir.path()).unwrap();
        assert_eq!(
            accounts,
            Accounts {
                added_user: Some(1000),
                sudo: false
            }
        );
        let passwd = std::fs::read_to_string(dir.path().join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
        );
    }
}
