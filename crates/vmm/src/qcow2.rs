//! The backing chain of a qcow2 disk, read from the images' headers: a confined VMM is handed
//! every layer as an open descriptor (it can open no path of ours), so the agent must know
//! the layers. Only what that needs is read: the magic, and the backing file's name.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::VmmError;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Chains deeper than this are refused (a loop, or not ours).
pub const MAX_LAYERS: usize = 40;

/// One image of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
}

fn format_of(file: &mut std::fs::File) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW2_MAGIC => Ok("qcow2"),
        Ok(()) => Ok("raw"),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok("raw"),
        Err(error) => Err(error),
    }
}

/// The backing file a qcow2 image names, if any (relative names are taken from its directory).
fn backing_of(path: &Path, file: &mut std::fs::File) -> std::io::Result<Option<PathBuf>> {
    let mut header = [0u8; 20];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut header)?;
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a backing file name longer than 4096 bytes",
        ));
    }
    let mut name = vec![0u8; size as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut name)?;
    let name = PathBuf::from(std::ffi::OsString::from(String::from_utf8(name).map_err(
        |_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a backing name not in UTF-8",
            )
        },
    )?));
    Ok(Some(if name.is_absolute() {
        name
    } else {
        path.parent().unwrap_or(Path::new("/")).join(name)
    }))
}

/// The size of the disk a qcow2 image holds (its header's), read without opening its chain.
pub fn virtual_size(path: &Path) -> Result<u64, VmmError> {
    let context = || format!("reading the disk image {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|error| VmmError::io(context(), error))?;
    if format_of(&mut file).map_err(|error| VmmError::io(context(), error))? != "qcow2" {
        return file
            .metadata()
            .map(|metadata| metadata.len())
            .map_err(|error| VmmError::io(context(), error));
    }
    let mut size = [0u8; 8];
    file.seek(SeekFrom::Start(24))
        .and_then(|_| file.read_exact(&mut size))
        .map_err(|error| VmmError::io(context(), error))?;
    Ok(u64::from_be_bytes(size))
}

/// The chain from `top` down to its base, top first.
pub fn chain(top: &Path) -> Result<Vec<Layer>, VmmError> {
    let mut layers = Vec::new();
    let mut next = Some(top.to_path_buf());
    while let Some(path) = next.take() {
        if layers.len() == MAX_LAYERS {
            return Err(VmmError::Invalid(format!(
                "the disk {} has more than {MAX_LAYERS} layers",
                top.display()
            )));
        }
        let context = || format!("reading the disk image {}", path.display());
        let mut file =
            std::fs::File::open(&path).map_err(|error| VmmError::io(context(), error))?;
        let format = format_of(&mut file).map_err(|error| VmmError::io(context(), error))?;
        if format == "qcow2" {
            next = backing_of(&path, &mut file).map_err(|error| VmmError::io(context(), error))?;
        }
        layers.push(Layer { path, format });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal qcow2 header naming `backing` (what the chain reader looks at).
    fn qcow2_naming(backing: Option<&str>) -> Vec<u8> {
        let mut image = vec![0u8; 512];
        image[..4].copy_from_slice(QCOW2_MAGIC);
        image[4..8].copy_from_slice(&3u32.to_be_bytes());
        if let Some(name) = backing {
            image[8..16].copy_from_slice(&200u64.to_be_bytes());
            image[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            image[200..200 + name.len()].copy_from_slice(name.as_bytes());
        }
        image
    }

    #[test]
    fn chains_are_followed_to_the_raw_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("rootfs.ext4");
        std::fs::write(&base, vec![0u8; 4096]).unwrap();
        let middle = dir.path().join("template.qcow2");
        std::fs::write(&middle, qcow2_naming(Some(base.to_str().unwrap()))).unwrap();
        let top = dir.path().join("disk.qcow2");
        // A relative name is taken from the image's own directory.
        std::fs::write(&top, qcow2_naming(Some("template.qcow2"))).unwrap();
        let layers = chain(&top).unwrap();
        assert_eq!(
            layers,
            vec![
                Layer {
                    path: top.clone(),
                    format: "qcow2"
                },
                Layer {
                    path: middle,
                    format: "qcow2"
                },
                Layer {
                    path: base,
                    format: "raw"
                },
            ]
        );
        let alone = dir.path().join("alone.qcow2");
        std::fs::write(&alone, qcow2_naming(None)).unwrap();
        assert_eq!(chain(&alone).unwrap().len(), 1);
    }

    #[test]
    fn sizes_are_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = qcow2_naming(None);
        image[24..32].copy_from_slice(&(3u64 << 30).to_be_bytes());
        let top = dir.path().join("disk.qcow2");
        std::fs::write(&top, image).unwrap();
        assert_eq!(virtual_size(&top).unwrap(), 3 << 30);
        let raw = dir.path().join("rootfs.ext4");
        std::fs::write(&raw, vec![0u8; 8192]).unwrap();
        assert_eq!(virtual_size(&raw).unwrap(), 8192);
    }

    #[test]
    fn loops_and_missing_layers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let looped = dir.path().join("loop.qcow2");
        std::fs::write(&looped, qcow2_naming(Some("loop.qcow2"))).unwrap();
        assert!(chain(&looped).unwrap_err().to_string().contains("layers"));
        let orphan = dir.path().join("orphan.qcow2");
        std::fs::write(&orphan, qcow2_naming(Some("gone.ext4"))).unwrap();
        assert!(
            chain(&orphan)
                .unwrap_err()
                .to_string()
                .contains("gone.ext4")
        );
    }
}
