//! `wrenn image check`: verifies an image directory against its manifest and says what is wrong
//! in plain words: missing files, sizes or hashes that differ, an envd of another version (read
//! from the binary's marker, never by running it), a kernel without the guest's modules.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::cpio;
use crate::error::ImageError;
use crate::manifest::{INITRD_FILE, KERNEL_FILE, Manifest, ROOTFS_FILE, hash_bytes, hash_file};
use crate::{envd_version_in, recipe};

/// One thing wrong with an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an image; an empty list means it is good. Errors are for when checking itself fails
/// (e.g. `debugfs` missing), not for what is wrong with the image.
pub fn check(image_dir: &Path, expected_envd_version: &str) -> Result<Vec<Problem>, ImageError> {
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(Problem(text));
    let manifest = match Manifest::read(image_dir) {
        Ok(manifest) => manifest,
        Err(error) => {
            problem(format!("no usable manifest: {error}"));
            return Ok(problems);
        }
    };
    let mut intact = std::collections::BTreeSet::new();
    for file in [KERNEL_FILE, INITRD_FILE, ROOTFS_FILE] {
        let path = image_dir.join(file);
        let Some(recorded) = manifest.files.get(file) else {
            problem(format!("the manifest does not list {file}"));
            continue;
        };
        let Ok(metadata) = std::fs::metadata(&path) else {
            problem(format!("{file} is missing"));
            continue;
        };
        if metadata.len() != recorded.size {
            problem(format!(
                "{file} is {} bytes, the manifest says {}: it was truncated or replaced",
                metadata.len(),
                recorded.size
            ));
            continue;
        }
        let hash = hash_file(&path)?;
        if hash != recorded.blake3 {
            problem(format!(
                "{file} is corrupted: its content hash is {}…, the manifest says {}…",
                &hash[..16],
                &recorded.blake3[..16.min(recorded.blake3.len())]
            ));
            continue;
        }
        intact.insert(file);
    }
    if manifest.envd.version != expected_envd_version {
        problem(format!(
            "the manifest records envd {}, this wrenn expects {expected_envd_version}: rebuild the image",
            manifest.envd.version
        ));
    }
    if intact.contains(KERNEL_FILE) {
        let mut header = [0u8; 0x206];
        let read = std::fs::File::open(image_dir.join(KERNEL_FILE))
            .and_then(|mut file| file.read_exact(&mut header));
        if read.is_err() || &header[0x202..0x206] != b"HdrS" {
            problem(format!(
                "{KERNEL_FILE} is not a bootable x86 kernel (no bzImage header)"
            ));
        }
    }
    if intact.contains(INITRD_FILE) {
        for text in check_initrd(&image_dir.join(INITRD_FILE), &manifest.kernel.release) {
            problem(text);
        }
    }
    if image_dir.join(ROOTFS_FILE).is_file() {
        for text in check_rootfs(
            &image_dir.join(ROOTFS_FILE),
            &manifest,
            expected_envd_version,
        )? {
            problem(text);
        }
    }
    Ok(problems)
}

/// The initramfs must unpack and hold every required module, listed for loading.
fn check_initrd(path: &Path, release: &str) -> Vec<String> {
    let mut bytes = Vec::new();
    let unpacked = std::fs::File::open(path)
        .and_then(|file| flate2::read::GzDecoder::new(file).read_to_end(&mut bytes));
    if let Err(error) = unpacked {
        return vec![format!("{INITRD_FILE} does not decompress: {error}")];
    }
    let entries = match cpio::read_archive(&bytes) {
        Ok(entries) => entries,
        Err(error) => return vec![format!("{INITRD_FILE} is not a cpio archive: {error}")],
    };
    let mut problems = Vec::new();
    if !entries.iter().any(|entry| entry.path == "init") {
        problems.push(format!("{INITRD_FILE} has no /init"));
    }
    let load_list = entries
        .iter()
        .find(|entry| entry.path == "etc/wrenn-modules.load")
        .map(|entry| String::from_utf8_lossy(&entry.data).into_owned())
        .unwrap_or_default();
    let prefix = format!("lib/modules/{release}/");
    for module in recipe::REQUIRED_MODULES {
        let present = entries.iter().any(|entry| {
            entry.path.starts_with(&prefix)
                && crate::kernel::module_name(&entry.path) == *module
                && !entry.data.is_empty()
        });
        let listed = load_list
            .lines()
            .any(|line| crate::kernel::module_name(line) == *module);
        if !present || !listed {
            problems.push(format!(
                "the kernel's module {module} is missing from {INITRD_FILE}: the guest cannot {}",
                match *module {
                    "ext4" => "mount its root filesystem",
                    "virtio_blk" => "see its disk",
                    "virtio_net" => "reach the network",
                    "virtio_pci" => "find its devices",
                    _ => "use vsock",
                }
            ));
        }
    }
    problems
}

/// envd and the init inside the ext4 image, read with `debugfs` (no mounting).
fn check_rootfs(
    path: &Path,
    manifest: &Manifest,
    expected_envd_version: &str,
) -> Result<Vec<String>, ImageError> {
    crate::command::require_tool("debugfs", "e2fsprogs")?;
    let mut problems = Vec::new();
    let scratch = tempfile_dir()?;
    let envd_copy = scratch.join("envd");
    match dump_file(path, &manifest.envd.path, &envd_copy) {
        Err(text) => problems.push(text),
        Ok(()) => {
            let bytes = std::fs::read(&envd_copy).unwrap_or_default();
            match envd_version_in(&bytes) {
                None => problems.push(format!(
                    "{} in {ROOTFS_FILE} is not envd (no version marker)",
                    manifest.envd.path
                )),
                Some(version) if version != expected_envd_version => problems.push(format!(
                    "the image's envd is version {version}, this wrenn expects {expected_envd_version}: rebuild the image"
                )),
                Some(_) => {}
            }
            if hash_bytes(&bytes) != manifest.envd.blake3 {
                problems.push(format!(
                    "{} in {ROOTFS_FILE} is not the envd the manifest records",
                    manifest.envd.path
                ));
            }
        }
    }
    for required in [
        "/usr/sbin/wrenn-init",
        "/usr/bin/python3",
        "/usr/bin/sudo",
        "/home/user",
    ] {
        if !exists_in(path, required) {
            problems.push(format!("{required} is missing from {ROOTFS_FILE}"));
        }
    }
    let modules_dep = format!("/usr/lib/modules/{}/modules.dep", manifest.kernel.release);
    if !exists_in(path, &modules_dep) {
        problems.push(format!(
            "{ROOTFS_FILE} has no kernel modules ({modules_dep} is missing)"
        ));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(problems)
}

fn tempfile_dir() -> Result<std::path::PathBuf, ImageError> {
    let dir = std::env::temp_dir().join(format!(
        "wrenn-image-check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).map_err(|error| ImageError::Io {
        context: format!("creating {}", dir.display()),
        source: error,
    })?;
    Ok(dir)
}

fn debugfs(image: &Path, request: &str) -> Option<std::process::Output> {
    Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .ok()
}

fn dump_file(image: &Path, inside: &str, to: &Path) -> Result<(), String> {
    let output = debugfs(image, &format!("dump {inside} {}", to.display()))
        .ok_or_else(|| "debugfs could not run".to_string())?;
    if !to.is_file() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr
            .lines()
            .filter(|line| !line.starts_with("debugfs "))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(format!(
            "{inside} cannot be read from {ROOTFS_FILE}: {}",
            reason.trim()
        ));
    }
    Ok(())
}

fn exists_in(image: &Path, inside: &str) -> bool {
    debugfs(image, &format!("stat {inside}")).is_some_and(|output| {
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("Inode:")
    })
}
