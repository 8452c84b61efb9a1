//! The base root filesystem stage: `debootstrap --variant=minbase`, then the recipe's packages
//! installed with apt-get inside the tree (with `/proc` mounted for the time of it), then
//! `configure.sh` (user, sudo, clean-up). Cached as a directory tree under
//! `<cache>/rootfs-<key>/tree`, keyed by suite, mirror and recipe, so changing envd never
//! repeats it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::command;
use crate::error::ImageError;
use crate::manifest::hash_bytes;
use crate::progress::{Progress, format_bytes};
use crate::recipe;
use crate::stage;

/// Debian's security archive, added to the guest's apt sources.
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// A finished base tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseTree {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    pub tree_bytes: u64,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl BaseTree {
    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }
}

/// The cache key of a base tree.
pub fn stage_key(mirror: &str) -> String {
    let inputs = format!(
        "rootfs-stage-v1\n{}\n{mirror}\n{}\n{}\n",
        recipe::SUITE,
        recipe::PACKAGES,
        recipe::CONFIGURE
    );
    hash_bytes(inputs.as_bytes())[..16].to_string()
}

/// The cached base tree, if one exists for this mirror and recipe.
pub fn cached(cache_dir: &Path, mirror: &str) -> Option<BaseTree> {
    load(&cache_dir.join(format!("rootfs-{}", stage_key(mirror)))).ok()
}

/// Returns the cached base tree, building it if missing.
pub fn ensure(
    cache_dir: &Path,
    mirror: &str,
    log: &Path,
    progress: &mut Progress,
) -> Result<BaseTree, ImageError> {
    let final_dir = cache_dir.join(format!("rootfs-{}", stage_key(mirror)));
    if let Ok(base) = load(&final_dir) {
        progress.note(&format!(
            "base rootfs: cached (Debian {}, {} packages, {})",
            base.suite,
            base.packages.len(),
            format_bytes(base.tree_bytes)
        ));
        return Ok(base);
    }
    progress.stage("base rootfs");
    let work = stage::TempDir::create(cache_dir, &format!("rootfs-{}", stage_key(mirror)))?;
    let stage_dir = work.path().join("stage");
    let tree = stage_dir.join("tree");
    std::fs::create_dir_all(&tree)
        .map_err(|error| ImageError::io("creating the rootfs tree", cache_dir, error))?;

    let mut debootstrap = Command::new("debootstrap");
    debootstrap
        .args(["--variant=minbase", recipe::SUITE])
        .arg(&tree)
        .arg(mirror)
        .env("LC_ALL", "C");
    command::run("debootstrap", debootstrap, log, progress)?;

    write(&tree.join("etc/apt/sources.list"), &sources_list(mirror))?;
    // No service starts inside the build, and apt resolves names like the host does.
    write(&tree.join("usr/sbin/policy-rc.d"), "#!/bin/sh\nexit 101\n")?;
    set_mode(&tree.join("usr/sbin/policy-rc.d"), 0o755)?;
    let _ = std::fs::remove_file(tree.join("etc/resolv.conf"));
    if let Ok(resolv) = std::fs::read_to_string("/etc/resolv.conf") {
        write(&tree.join("etc/resolv.conf"), &resolv)?;
    }
    let packages = recipe::packages();
    {
        let _proc = ProcMount::mount(&tree)?;
        command::run(
            "apt-get update (in the rootfs)",
            chroot(&tree, &["apt-get", "update"]),
            log,
            progress,
        )?;
        let mut install = vec!["apt-get", "install", "-y", "--no-install-recommends"];
        install.extend(packages.iter().copied());
        command::run(
            "apt-get install (in the rootfs)",
            chroot(&tree, &install),
            log,
            progress,
        )?;
        write(&tree.join("tmp/wrenn-configure.sh"), recipe::CONFIGURE)?;
        command::run(
            "configuring the rootfs",
            chroot(&tree, &["/bin/sh", "/tmp/wrenn-configure.sh"]),
            log,
            progress,
        )?;
    }
    for leftover in ["tmp/wrenn-configure.sh", "usr/sbin/policy-rc.d"] {
        let _ = std::fs::remove_file(tree.join(leftover));
    }
    // The guest writes its own at boot (wrenn-init); the host's never goes into an image.
    write(&tree.join("etc/resolv.conf"), "nameserver 8.8.8.8\n")?;

    let base = BaseTree {
        suite: recipe::SUITE.to_string(),
        mirror: mirror.to_string(),
        packages: packages.iter().map(|package| package.to_string()).collect(),
        tree_bytes: stage::tree_bytes(&tree),
        dir: final_dir.clone(),
    };
    write(
        &stage_dir.join("base.json"),
        &serde_json::to_string_pretty(&base).expect("a base tree serialises"),
    )?;
    work.promote("stage", &final_dir)?;
    progress.finish_stage(&format!(
        "Debian {} with {} packages, {}",
        base.suite,
        base.packages.len(),
        format_bytes(base.tree_bytes)
    ));
    Ok(base)
}

fn load(dir: &Path) -> Result<BaseTree, ImageError> {
    let path = dir.join("base.json");
    let text = std::fs::read_to_string(&path).map_err(|error| ImageError::Io {
        context: format!("reading {}", path.display()),
        source: error,
    })?;
    let mut base: BaseTree = serde_json::from_str(&text)
        .map_err(|error| ImageError::Invalid(format!("{}: {error}", path.display())))?;
    base.dir = dir.to_path_buf();
    if !base.tree().join("usr/bin/python3").exists() {
        return Err(ImageError::Invalid(format!(
            "{} is incomplete",
            dir.display()
        )));
    }
    Ok(base)
}

fn sources_list(mirror: &str) -> String {
    let suite = recipe::SUITE;
    format!(
        "deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\ndeb {SECURITY_MIRROR} {suite}-security main\n"
    )
}

fn chroot(tree: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("chroot");
    command
        .arg(tree)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("HOME", "/root");
    command
}

fn write(path: &Path, contents: &str) -> Result<(), ImageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| {
            ImageError::io(format!("creating {}", parent.display()), parent, error)
        })?;
    }
    std::fs::write(path, contents)
        .map_err(|error| ImageError::io(format!("writing {}", path.display()), path, error))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|error| {
        ImageError::io(
            format!("setting the mode of {}", path.display()),
            path,
            error,
        )
    })
}

/// `/proc` mounted inside a tree for as long as this lives.
struct ProcMount {
    target: PathBuf,
}

impl ProcMount {
    fn mount(tree: &Path) -> Result<Self, ImageError> {
        let target = tree.join("proc");
        std::fs::create_dir_all(&target)
            .map_err(|error| ImageError::io("creating the tree's /proc", tree, error))?;
        nix::mount::mount(
            Some("proc"),
            &target,
            Some("proc"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|errno| ImageError::Io {
            context: format!("mounting /proc in {}", tree.display()),
            source: errno.into(),
        })?;
        Ok(Self { target })
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_key_follows_the_mirror_and_sources_name_all_three_archives() {
        assert_ne!(
            super::stage_key("http://a/debian"),
            super::stage_key("http://b/debian")
        );
        let sources = super::sources_list("http://m/debian");
        assert_eq!(sources.lines().count(), 3);
        assert!(sources.contains("bookworm-security"));
    }
}
