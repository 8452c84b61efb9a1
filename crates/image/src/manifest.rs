//! `manifest.json`, written beside an image's files: what was built from what (kernel package,
//! envd version, Debian suite and packages), when, and each file's size and BLAKE3 hash.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// The manifest's format version; a reader refuses others.
pub const MANIFEST_FORMAT: u32 = 1;
/// The manifest's file name inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The QEMU kernel (bzImage) file name.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs file name.
pub const INITRD_FILE: &str = "initrd.img";
/// The root filesystem image file name.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// Everything known about a built image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// RFC 3339 time the build finished.
    pub built_at: String,
    pub build_seconds: f64,
    /// Hash of every input; an unchanged key means a rebuild is a no-op.
    pub inputs_key: String,
    pub kernel: KernelInfo,
    pub envd: EnvdInfo,
    pub rootfs: RootfsInfo,
    /// The image's files by name: vmlinuz, initrd.img, rootfs.ext4.
    pub files: BTreeMap<String, FileInfo>,
}

/// The guest kernel and how to boot it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Debian package the kernel came from, e.g. `linux-image-6.1.0-48-amd64`.
    pub package: String,
    pub package_version: String,
    /// `uname -r` inside the guest.
    pub release: String,
    /// Modules loaded by the initramfs, in load order (paths under `/lib/modules/<release>`).
    pub modules: Vec<String>,
    /// The kernel command line a VMM should use (network from `ip=`).
    pub cmdline: String,
}

/// The envd inside the root filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvdInfo {
    pub version: String,
    pub blake3: String,
    pub size: u64,
    /// Where it is in the guest.
    pub path: String,
    pub port: u16,
}

/// The base root filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    /// Bytes the files of the tree take before packing.
    pub tree_bytes: u64,
    pub filesystem: String,
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes allocated on disk (smaller than `size` for a sparse file).
    pub allocated: u64,
    pub blake3: String,
}

impl Manifest {
    /// Reads and validates `manifest.json` from an image directory.
    pub fn read(image_dir: &Path) -> Result<Self, ImageError> {
        let path = image_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|error| ImageError::Io {
            context: format!("reading {}", path.display()),
            source: error,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|error| {
            ImageError::Invalid(format!(
                "{} is not a valid manifest: {error}",
                path.display()
            ))
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ImageError::Invalid(format!(
                "{} has format {}, this wrenn reads format {MANIFEST_FORMAT}",
                path.display(),
                manifest.format
            )));
        }
        Ok(manifest)
    }

    /// Writes the manifest atomically (temporary file, then rename).
    pub fn write(&self, image_dir: &Path) -> Result<(), ImageError> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serialises");
        let temp = image_dir.join(".manifest.json.tmp");
        std::fs::write(&temp, text + "\n")
            .and_then(|()| std::fs::rename(&temp, image_dir.join(MANIFEST_FILE)))
            .map_err(|error| ImageError::io("writing the manifest", image_dir, error))
    }
}

/// Size, allocation and hash of a file.
pub fn describe_file(path: &Path) -> Result<FileInfo, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).map_err(|error| ImageError::Io {
        context: format!("reading {}", path.display()),
        source: error,
    })?;
    Ok(FileInfo {
        size: metadata.len(),
        allocated: metadata.blocks() * 512,
        blake3: hash_file(path)?,
    })
}

/// The BLAKE3 hash of a file's contents (holes read as zeros), in hex.
pub fn hash_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(|error| ImageError::Io {
        context: format!("opening {}", path.display()),
        source: error,
    })?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|error| ImageError::Io {
            context: format!("reading {}", path.display()),
            source: error,
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The BLAKE3 hash of some bytes, in hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
