//! Build stages' working directories: each stage is built in `.tmp-<name>-<pid>` beside its
//! final place and renamed there only when complete, so an interrupted build never leaves a
//! half-written stage that a later run could take for a good one. Leftovers of interrupted runs
//! (including a `/proc` still mounted inside a root tree) are cleaned before a new build.

use std::path::{Path, PathBuf};

use crate::error::ImageError;

/// A stage's temporary directory, removed on drop unless promoted.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<parent>/.tmp-<name>-<pid>`.
    pub fn create(parent: &Path, name: &str) -> Result<Self, ImageError> {
        let path = parent.join(format!(".tmp-{name}-{}", std::process::id()));
        remove_tree(&path)?;
        std::fs::create_dir_all(&path).map_err(|error| {
            ImageError::io(format!("creating {}", path.display()), parent, error)
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames `<temp>/<inner>` to `target` (replacing an older one), then removes the rest.
    pub fn promote(self, inner: &str, target: &Path) -> Result<(), ImageError> {
        replace_dir(&self.path.join(inner), target)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(error) = remove_tree(&self.path) {
            eprintln!("image: could not remove {}: {error}", self.path.display());
        }
    }
}

/// Puts `new` at `target`: an existing `target` is moved aside first and removed after, so
/// `target` is never a mix of the two.
pub fn replace_dir(new: &Path, target: &Path) -> Result<(), ImageError> {
    let parent = target.parent().unwrap_or(Path::new("/"));
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    if target.exists() {
        remove_tree(&old)?;
        std::fs::rename(target, &old).map_err(|error| {
            ImageError::io(format!("moving {} aside", target.display()), parent, error)
        })?;
    }
    std::fs::rename(new, target).map_err(|error| {
        ImageError::io(
            format!("putting {} in place", target.display()),
            parent,
            error,
        )
    })?;
    remove_tree(&old)
}

/// Removes the leftovers of interrupted builds in `dir` (`.tmp-*` and `.old-*` entries).
pub fn clean_leftovers(dir: &Path) -> Result<(), ImageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

/// Unmounts anything mounted under `path`, then removes it. Refuses to remove a tree that still
/// has a mount inside (it could reach the host's files).
pub fn remove_tree(path: &Path) -> Result<(), ImageError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    unmount_under(path);
    let remaining = mounts_under(path);
    if !remaining.is_empty() {
        return Err(ImageError::Invalid(format!(
            "cannot remove {}: still mounted inside: {}",
            path.display(),
            remaining
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    std::fs::remove_dir_all(path).map_err(|error| ImageError::Io {
        context: format!("removing {}", path.display()),
        source: error,
    })
}

/// Detaches every mount under `path`, deepest first.
pub fn unmount_under(path: &Path) {
    let mut mounts = mounts_under(path);
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.components().count()));
    for mount in mounts {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mount points at or below `path`, from `/proc/self/mountinfo`.
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(canonical) = path.canonicalize() else {
        return Vec::new();
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|mount| mount.starts_with(&canonical))
        .collect()
}

/// Mount paths in mountinfo escape space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && index + 3 < bytes.len()
            && bytes[index + 1..index + 4].iter().all(u8::is_ascii_digit)
        {
            let octal = std::str::from_utf8(&bytes[index + 1..index + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(octal, 8).unwrap_or(b'?'));
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Bytes taken by the regular files of a tree (apparent sizes; hard links counted once).
pub fn tree_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.is_file() && seen.insert((metadata.dev(), metadata.ino())) {
                total += metadata.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn a_dropped_stage_leaves_nothing_and_a_promoted_one_replaces_the_old() {
        let parent = tempfile::tempdir().unwrap();
        {
            let temp = TempDir::create(parent.path(), "x").unwrap();
            std::fs::write(temp.path().join("half"), b"written").unwrap();
        }
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
        let target = parent.path().join("final");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"1").unwrap();
        let temp = TempDir::create(parent.path(), "x").unwrap();
        std::fs::create_dir(temp.path().join("out")).unwrap();
        std::fs::write(temp.path().join("out/new"), b"2").unwrap();
        temp.promote("out", &target).unwrap();
        assert!(target.join("new").exists());
        assert!(!target.join("old").exists());
        let names: Vec<_> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("final")]);
    }

    #[test]
    fn leftovers_are_cleaned_and_hard_links_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".tmp-kernel-1")).unwrap();
        std::fs::create_dir(dir.path().join("kernel-abc")).unwrap();
        std::fs::write(dir.path().join("kernel-abc/a"), vec![0u8; 100]).unwrap();
        std::fs::hard_link(
            dir.path().join("kernel-abc/a"),
            dir.path().join("kernel-abc/b"),
        )
        .unwrap();
        clean_leftovers(dir.path()).unwrap();
        assert!(!dir.path().join(".tmp-kernel-1").exists());
        assert_eq!(tree_bytes(&dir.path().join("kernel-abc")), 100);
    }
}
