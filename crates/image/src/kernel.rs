//! The kernel stage: Debian's kernel package unpacked (never installed), the guest's modules and
//! their dependencies picked out of it, and an initramfs (static busybox + those modules) that
//! mounts the root disk. Cached under `<cache>/kernel-<key>/`, keyed by the package versions and
//! the recipe.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::command;
use crate::cpio::CpioWriter;
use crate::error::ImageError;
use crate::manifest::hash_bytes;
use crate::progress::{Progress, format_bytes};
use crate::recipe;
use crate::stage;

/// The packages a kernel stage is built from, as apt resolves them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackages {
    pub kernel: String,
    pub kernel_version: String,
    pub busybox_version: String,
}

/// A finished kernel stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelStage {
    pub package: String,
    pub package_version: String,
    pub release: String,
    /// Module paths (relative to `/lib/modules/<release>`) in load order.
    pub modules: Vec<String>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl KernelStage {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    /// The static busybox, which root filesystems carry for wrenn's init (an image from a
    /// registry may have no shell tools of its own).
    pub fn busybox(&self) -> PathBuf {
        self.dir.join("busybox")
    }
    /// The `lib/modules/<release>` tree to copy into the root filesystem.
    pub fn modules_tree(&self) -> PathBuf {
        self.dir.join("modules").join(&self.release)
    }
}

/// Asks apt which kernel and busybox packages a build would use now.
pub fn resolve_packages() -> Result<KernelPackages, ImageError> {
    let depends = command::output(
        "apt-cache depends",
        apt_cache(&["depends", recipe::KERNEL_META_PACKAGE]),
    )?;
    let kernel = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt knows no kernel behind {}: run `apt-get update` (the package lists may be missing)",
                recipe::KERNEL_META_PACKAGE
            ))
        })?;
    Ok(KernelPackages {
        kernel_version: candidate_version(&kernel)?,
        busybox_version: candidate_version(recipe::BUSYBOX_PACKAGE)?,
        kernel,
    })
}

fn apt_cache(args: &[&str]) -> Command {
    let mut command = Command::new("apt-cache");
    command.args(args).env("LC_ALL", "C");
    command
}

fn candidate_version(package: &str) -> Result<String, ImageError> {
    let policy = command::output("apt-cache policy", apt_cache(&["policy", package]))?;
    policy
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Candidate: "))
        .find(|version| *version != "(none)")
        .map(str::to_string)
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "the Debian package `{package}` is not available: run `apt-get update`, and check that the `main` component is in the apt sources"
            ))
        })
}

/// The cache key of a kernel stage.
pub fn stage_key(packages: &KernelPackages) -> String {
    let mut inputs = String::from("kernel-stage-v2\n");
    for part in [
        packages.kernel.as_str(),
        &packages.kernel_version,
        &packages.busybox_version,
        recipe::INITRAMFS_INIT,
        &recipe::GUEST_MODULES.join(","),
    ] {
        inputs.push_str(part);
        inputs.push('\n');
    }
    hash_bytes(inputs.as_bytes())[..16].to_string()
}

/// Returns the cached kernel stage for these packages, building it if missing.
pub fn ensure(
    cache_dir: &Path,
    packages: &KernelPackages,
    log: &Path,
    progress: &mut Progress,
) -> Result<KernelStage, ImageError> {
    let key = stage_key(packages);
    let final_dir = cache_dir.join(format!("kernel-{key}"));
    if let Ok(stage) = load(&final_dir) {
        progress.note(&format!(
            "kernel: cached ({} {}, {} modules)",
            stage.package,
            stage.package_version,
            stage.modules.len()
        ));
        return Ok(stage);
    }
    progress.stage("kernel");
    let work = stage::TempDir::create(cache_dir, &format!("kernel-{key}"))?;
    let debs = work.path().join("debs");
    mkdir(&debs)?;
    let mut download = Command::new("apt-get");
    download
        .args(["-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{}={}", packages.kernel, packages.kernel_version))
        .arg(format!(
            "{}={}",
            recipe::BUSYBOX_PACKAGE,
            packages.busybox_version
        ))
        .current_dir(&debs);
    command::run(
        "downloading the kernel and busybox packages",
        download,
        log,
        progress,
    )?;
    let kernel_tree = work.path().join("kernel-tree");
    let busybox_tree = work.path().join("busybox-tree");
    for entry in read_dir(&debs)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let target = if name.starts_with("busybox") {
            &busybox_tree
        } else {
            &kernel_tree
        };
        progress.update(&format!("unpacking {name}"));
        let mut unpack = Command::new("dpkg-deb");
        unpack.arg("-x").arg(entry.path()).arg(target);
        command::run(&format!("unpacking {name}"), unpack, log, progress)?;
    }
    let release = single_release(&kernel_tree.join("lib/modules"))?;
    let mut depmod = Command::new("depmod");
    depmod.arg("-b").arg(&kernel_tree).arg(&release);
    command::run("depmod over the unpacked kernel", depmod, log, progress)?;
    let modules_root = kernel_tree.join("lib/modules").join(&release);
    let dependencies = parse_modules_dep(&read_string(&modules_root.join("modules.dep"))?);
    let modules = load_order(&dependencies, recipe::GUEST_MODULES)?;

    // The modules (and depmod's index of them) for the root filesystem.
    let kept = work.path().join("stage");
    let kept_modules = kept.join("modules").join(&release);
    for module in &modules {
        let target = kept_modules.join(module);
        mkdir(target.parent().expect("module paths have a parent"))?;
        copy(&modules_root.join(module), &target)?;
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if modules_root.join(index).exists() {
            copy(&modules_root.join(index), &kept_modules.join(index))?;
        }
    }
    let modules_base = work.path().join("modules-base");
    mkdir(&modules_base.join("lib/modules"))?;
    std::os::unix::fs::symlink(
        &kept_modules,
        modules_base.join("lib/modules").join(&release),
    )
    .map_err(|error| ImageError::io("linking the module tree", cache_dir, error))?;
    let mut depmod = Command::new("depmod");
    depmod.arg("-b").arg(&modules_base).arg(&release);
    command::run("depmod over the guest's modules", depmod, log, progress)?;

    progress.update("writing the initramfs");
    let busybox = std::fs::read(busybox_tree.join("bin/busybox"))
        .map_err(|error| ImageError::io("reading busybox from its package", cache_dir, error))?;
    let initrd = build_initramfs(&busybox, &release, &modules, &modules_root)
        .map_err(|error| ImageError::io("writing the initramfs", cache_dir, error))?;
    std::fs::write(kept.join("initrd.img"), &initrd)
        .map_err(|error| ImageError::io("writing the initramfs", cache_dir, error))?;
    std::fs::write(kept.join("busybox"), &busybox)
        .map_err(|error| ImageError::io("keeping busybox", cache_dir, error))?;
    copy(
        &kernel_tree.join("boot").join(format!("vmlinuz-{release}")),
        &kept.join("vmlinuz"),
    )?;
    let stage = KernelStage {
        package: packages.kernel.clone(),
        package_version: packages.kernel_version.clone(),
        release,
        modules,
        dir: final_dir.clone(),
    };
    let description = serde_json::to_string_pretty(&stage).expect("a kernel stage serialises");
    std::fs::write(kept.join("kernel.json"), description)
        .map_err(|error| ImageError::io("writing kernel.json", cache_dir, error))?;
    let size = stage::tree_bytes(&kept);
    work.promote("stage", &final_dir)?;
    progress.finish_stage(&format!(
        "{} {} with {} modules, {}",
        stage.package,
        stage.package_version,
        stage.modules.len(),
        format_bytes(size)
    ));
    Ok(stage)
}

fn load(dir: &Path) -> Result<KernelStage, ImageError> {
    let text = read_string(&dir.join("kernel.json"))?;
    let mut stage: KernelStage = serde_json::from_str(&text)
        .map_err(|error| ImageError::Invalid(format!("{}: {error}", dir.display())))?;
    stage.dir = dir.to_path_buf();
    for file in [stage.vmlinuz(), stage.initrd(), stage.busybox()] {
        if !file.is_file() {
            return Err(ImageError::Invalid(format!(
                "{} is missing",
                file.display()
            )));
        }
    }
    Ok(stage)
}

/// The initramfs: busybox, `/init`, the modules and the order to load them in, gzip-compressed.
fn build_initramfs(
    busybox: &[u8],
    release: &str,
    modules: &[String],
    modules_root: &Path,
) -> std::io::Result<Vec<u8>> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut archive = CpioWriter::new(encoder);
    for dir in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "newroot",
    ] {
        archive.directory(dir, 0o755)?;
    }
    archive.file("bin/busybox", 0o755, busybox)?;
    archive.symlink("bin/sh", "busybox")?;
    archive.file("init", 0o755, recipe::INITRAMFS_INIT.as_bytes())?;
    let module_base = format!("lib/modules/{release}");
    archive.directory(&module_base, 0o755)?;
    let mut directories = std::collections::BTreeSet::new();
    for module in modules {
        let mut ancestor = Path::new(module).parent();
        while let Some(dir) = ancestor.filter(|dir| !dir.as_os_str().is_empty()) {
            directories.insert(dir.to_string_lossy().into_owned());
            ancestor = dir.parent();
        }
    }
    // Sorted, so every directory comes after its parent.
    for dir in &directories {
        archive.directory(&format!("{module_base}/{dir}"), 0o755)?;
    }
    for module in modules {
        let contents = std::fs::read(modules_root.join(module))?;
        archive.file(&format!("{module_base}/{module}"), 0o644, &contents)?;
    }
    let load_list: String = modules
        .iter()
        .map(|module| format!("{release}/{module}\n"))
        .collect();
    archive.file("etc/wrenn-modules.load", 0o644, load_list.as_bytes())?;
    let mut encoder = archive.finish()?;
    encoder.flush()?;
    encoder.finish()
}

/// `modules.dep`: each module's path and the paths it depends on.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The module name of a path (`kernel/fs/ext4/ext4.ko` → `ext4`), dashes read as underscores.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The wanted modules and everything they need, each after its dependencies.
pub fn load_order(
    dependencies: &BTreeMap<String, Vec<String>>,
    wanted: &[&str],
) -> Result<Vec<String>, ImageError> {
    let by_name: BTreeMap<String, &String> = dependencies
        .keys()
        .map(|path| (module_name(path), path))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        path: &str,
        dependencies: &BTreeMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path.to_string()) {
            return;
        }
        for dependency in dependencies.get(path).into_iter().flatten() {
            visit(dependency, dependencies, seen, order);
        }
        order.push(path.to_string());
    }
    for name in wanted {
        let path = by_name.get(&name.replace('-', "_")).ok_or_else(|| {
            ImageError::Invalid(format!(
                "the kernel package has no module `{name}` (is it built in, or renamed?)"
            ))
        })?;
        visit(path, dependencies, &mut seen, &mut order);
    }
    Ok(order)
}

fn single_release(modules_dir: &Path) -> Result<String, ImageError> {
    let releases: Vec<String> = read_dir(modules_dir)?
        .into_iter()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.as_slice() {
        [release] => Ok(release.clone()),
        _ => Err(ImageError::Invalid(format!(
            "expected one kernel release in {}, found {releases:?}",
            modules_dir.display()
        ))),
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, ImageError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .and_then(|entries| entries.collect::<Result<Vec<_>, _>>())
        .map_err(|error| ImageError::Io {
            context: format!("listing {}", dir.display()),
            source: error,
        })?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    Ok(entries)
}

fn read_string(path: &Path) -> Result<String, ImageError> {
    std::fs::read_to_string(path).map_err(|error| ImageError::Io {
        context: format!("reading {}", path.display()),
        source: error,
    })
}

fn mkdir(path: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(path)
        .map_err(|error| ImageError::io(format!("creating {}", path.display()), path, error))
}

fn copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::copy(from, to).map(drop).map_err(|error| {
        ImageError::io(
            format!("copying {} to {}", from.display(), to.display()),
            to,
            error,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/crypto/crc32c-generic.ko:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let deps = parse_modules_dep(DEP);
        let order = load_order(&deps, &["virtio_net", "ext4", "crc32c_generic"]).unwrap();
        let position = |name: &str| {
            order
                .iter()
                .position(|path| module_name(path) == name)
                .unwrap()
        };
        assert!(position("virtio") < position("virtio_ring"));
        assert!(position("failover") < position("net_failover"));
        assert!(position("net_failover") < position("virtio_net"));
        assert!(position("jbd2") < position("ext4"));
        assert_eq!(order.len(), 10);
        let unique: HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
    }

    #[test]
    fn a_missing_module_is_named() {
        let error = load_order(&parse_modules_dep(DEP), &["vsock"]).unwrap_err();
        assert!(error.to_string().contains("`vsock`"), "{error}");
    }
}
