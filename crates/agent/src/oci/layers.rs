//! Image layers unpacked into a directory tree, bottom layer first, as the OCI image spec
//! lays them over each other: a `.wh.NAME` entry removes `NAME` from the layers below, a
//! `.wh..wh..opq` entry empties its directory of them; files keep their owner (numeric), mode
//! (set-id bits too), modification time, extended attributes and type (links, hard links,
//! devices, FIFOs).
//!
//! The layers are the user's, the tree is on the host: every path is resolved inside the tree
//! ([`resolve_dir`]) the way the guest will see it, an absolute link pointing at the tree's own
//! root, so no entry, link or `..` ever reaches a file outside it.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::OciError;
use super::registry::PulledLayer;

/// How many links a path may go through before it is taken as a loop.
const MAX_LINK_HOPS: usize = 40;

/// What unpacking did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Unpacks `layers` into `root` (an existing, empty directory) in order. `stop` set makes it
/// return [`OciError::Cancelled`] at the next entry; files' bytes past `max_bytes` in all (a
/// layer that decompresses to more than the disk holds) are [`OciError::TooLarge`].
pub fn unpack_layers(
    layers: &[PulledLayer],
    root: &Path,
    stop: &AtomicBool,
    max_bytes: u64,
) -> Result<UnpackStats, OciError> {
    let mut stats = UnpackStats::default();
    for (index, layer) in layers.iter().enumerate() {
        let file = std::fs::File::open(&layer.path)
            .map_err(|error| OciError::io("opening a cached layer", error))?;
        let mut reader = BufReader::new(file);
        // The bytes decide, not the media type: some registries label plain tars as gzip.
        let gzip = {
            use std::io::BufRead;
            let head = reader
                .fill_buf()
                .map_err(|error| OciError::io("reading a cached layer", error))?;
            head.starts_with(&[0x1f, 0x8b])
        };
        let stream: Box<dyn Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(reader))
        } else {
            Box::new(reader)
        };
        unpack_layer(stream, root, stop, &mut stats, max_bytes).map_err(|error| match error {
            OciError::Cancelled(_) | OciError::TooLarge(_) => error,
            error => OciError::Layer(format!("layer {} ({}): {error}", index + 1, layer.digest)),
        })?;
    }
    Ok(stats)
}

/// Unpacks one layer's tar stream over `root`, its files' bytes counted in `stats` up to
/// `max_bytes`.
pub fn unpack_layer(
    stream: impl Read,
    root: &Path,
    stop: &AtomicBool,
    stats: &mut UnpackStats,
    max_bytes: u64,
) -> Result<(), OciError> {
    let mut archive = tar::Archive::new(stream);
    // Paths written by this layer: an opaque directory keeps them.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|error| OciError::io("reading the layer", error))?;
    for entry in entries {
        if stop.load(Ordering::Relaxed) {
            return Err(OciError::Cancelled("the build was stopped".into()));
        }
        let mut entry = entry.map_err(|error| OciError::io("reading the layer", error))?;
        let raw_path = entry.path_bytes().into_owned();
        let relative = clean(Path::new(OsStr::from_bytes(&raw_path)));
        let Some(name) = relative.file_name().map(OsStr::to_os_string) else {
            continue; // the root itself
        };
        let parent = relative.parent().unwrap_or(Path::new("")).to_path_buf();
        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            stats.whiteouts += 1;
            if let Some(dir) = resolve_dir(root, &parent, false)? {
                let children = std::fs::read_dir(&dir)
                    .map_err(|error| OciError::io("listing an opaque directory", error))?;
                for child in children.flatten() {
                    if !written.contains(&parent.join(child.file_name())) {
                        remove_any(&child.path())?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            stats.whiteouts += 1;
            if let Some(dir) = resolve_dir(root, &parent, false)? {
                remove_any(&dir.join(OsStr::from_bytes(hidden)))?;
            }
            continue;
        }
        let kind = entry.header().entry_type();
        if !(kind.is_dir()
            || kind.is_file()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_character_special()
            || kind.is_block_special()
            || kind.is_fifo()
            || kind == tar::EntryType::Continuous)
        {
            continue; // pax global headers and the like carry no file
        }
        let dir = resolve_dir(root, &parent, true)?.expect("made when missing");
        let target = dir.join(&name);
        let existing = std::fs::symlink_metadata(&target).ok();
        let header = entry.header().clone();
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        if kind.is_dir() {
            if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                if existing.is_some() {
                    remove_any(&target)?;
                }
                std::fs::create_dir(&target).map_err(|error| {
                    OciError::io(format!("making {}", relative.display()), error)
                })?;
            }
            own_and_mode(&target, uid, gid, Some(mode))?;
        } else {
            if existing.is_some() {
                remove_any(&target)?;
            }
            if kind.is_file() || kind == tar::EntryType::Continuous {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|error| {
                        OciError::io(format!("writing {}", relative.display()), error)
                    })?;
                let room = max_bytes.saturating_sub(stats.bytes);
                let copied =
                    std::io::copy(&mut (&mut entry).take(room.saturating_add(1)), &mut file)
                        .map_err(|error| {
                            OciError::io(format!("writing {}", relative.display()), error)
                        })?;
                if copied > room {
                    return Err(OciError::TooLarge(format!(
                        "the image unpacks to more than {} MiB, what this host may give it \
                         ({} is where it went over)",
                        max_bytes >> 20,
                        relative.display()
                    )));
                }
                stats.bytes += copied;
                drop(file);
                own_and_mode(&target, uid, gid, Some(mode))?;
            } else if kind.is_symlink() {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        OciError::Invalid(format!("{} is a link to nothing", relative.display()))
                    })?
                    .into_owned();
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target).map_err(|error| {
                    OciError::io(format!("linking {}", relative.display()), error)
                })?;
                own_and_mode(&target, uid, gid, None)?;
            } else if kind.is_hard_link() {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| {
                        OciError::Invalid(format!(
                            "{} is a hard link to nothing",
                            relative.display()
                        ))
                    })?
                    .into_owned();
                let source_relative = clean(Path::new(OsStr::from_bytes(&link)));
                let source = source_relative
                    .file_name()
                    .and_then(|source_name| {
                        resolve_dir(
                            root,
                            source_relative.parent().unwrap_or(Path::new("")),
                            false,
                        )
                        .ok()
                        .flatten()
                        .map(|dir| dir.join(source_name))
                    })
                    .filter(|source| std::fs::symlink_metadata(source).is_ok())
                    .ok_or_else(|| {
                        OciError::Invalid(format!(
                            "{} is a hard link to {}, which the layers do not have",
                            relative.display(),
                            source_relative.display()
                        ))
                    })?;
                std::fs::hard_link(&source, &target).map_err(|error| {
                    OciError::io(format!("linking {}", relative.display()), error)
                })?;
                written.insert(relative);
                stats.entries += 1;
                continue; // a hard link shares its source's owner, mode and times
            } else {
                let file_type = if kind.is_fifo() {
                    libc::S_IFIFO
                } else if kind.is_block_special() {
                    libc::S_IFBLK
                } else {
                    libc::S_IFCHR
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let path = c_path(&target)?;
                // SAFETY: `path` is a NUL-terminated path that lives across the call; mknod
                // only reads it.
                let made = unsafe {
                    libc::mknod(
                        path.as_ptr(),
                        file_type | (mode & 0o777),
                        libc::makedev(major, minor),
                    )
                };
                if made != 0 {
                    return Err(OciError::io(
                        format!("making the special file {}", relative.display()),
                        std::io::Error::last_os_error(),
                    ));
                }
                own_and_mode(&target, uid, gid, Some(mode))?;
            }
        }
        if let Ok(Some(extensions)) = entry.pax_extensions() {
            for extension in extensions.flatten() {
                if let Some(attribute) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    set_xattr(&target, attribute, extension.value_bytes());
                }
            }
        }
        set_mtime(&target, mtime);
        written.insert(relative);
        stats.entries += 1;
    }
    Ok(())
}

/// `path` without `.`, empty parts and a leading `/`, `..` taken lexically and never above
/// the root.
pub fn clean(path: &Path) -> PathBuf {
    let mut parts: Vec<&OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    parts.iter().collect()
}

/// The real directory `relative` names inside `root`, following links as the guest would
/// (an absolute link starts again at `root`; `..` stops at it): `None` when a part is missing
/// and `create` is false. With `create`, missing directories are made (root's, 0755), and a
/// file in the way is replaced by one.
pub fn resolve_dir(
    root: &Path,
    relative: &Path,
    create: bool,
) -> Result<Option<PathBuf>, OciError> {
    let mut pending: std::collections::VecDeque<OsString> = relative
        .components()
        .map(|component| component.as_os_str().to_os_string())
        .collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_bytes() {
            b"" | b"." | b"/" => continue,
            b".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let here: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&here) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(OciError::Invalid(format!(
                        "{} goes through more than {MAX_LINK_HOPS} links",
                        relative.display()
                    )));
                }
                let target = std::fs::read_link(&here)
                    .map_err(|error| OciError::io("reading a link", error))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for component in target.components().rev() {
                    pending.push_front(component.as_os_str().to_os_string());
                }
            }
            Ok(metadata) if metadata.is_dir() => resolved.push(part),
            Ok(_) if create => {
                remove_any(&here)?;
                make_dir(&here)?;
                resolved.push(part);
            }
            Ok(_) => return Ok(None),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
                make_dir(&here)?;
                resolved.push(part);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(OciError::io("resolving a path in the image", error)),
        }
    }
    Ok(Some(root.join(resolved.iter().collect::<PathBuf>())))
}

/// The host path of `relative`'s last part inside `root`, its directories resolved (and made)
/// as [`resolve_dir`] does; the last part itself is not followed.
pub fn resolve_in_root(root: &Path, relative: &Path) -> Result<PathBuf, OciError> {
    let relative = clean(relative);
    let name = relative
        .file_name()
        .ok_or_else(|| OciError::Invalid("an empty path".into()))?
        .to_os_string();
    let dir = resolve_dir(root, relative.parent().unwrap_or(Path::new("")), true)?
        .expect("made when missing");
    Ok(dir.join(name))
}

fn make_dir(path: &Path) -> Result<(), OciError> {
    std::fs::create_dir(path)
        .map_err(|error| OciError::io(format!("making {}", path.display()), error))
}

/// Removes a file, link or directory tree (never following a link).
pub fn remove_any(path: &Path) -> Result<(), OciError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    };
    removed.map_err(|error| OciError::io(format!("removing {}", path.display()), error))
}

/// Sets the owner (not following a link), then the mode (which a chown may have cleared the
/// set-id bits of).
fn own_and_mode(path: &Path, uid: u32, gid: u32, mode: Option<u32>) -> Result<(), OciError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|error| OciError::io(format!("owning {}", path.display()), error))?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|error| OciError::io(format!("moding {}", path.display()), error))?;
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<CString, OciError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| OciError::Invalid(format!("{} has a NUL byte", path.display())))
}

/// Sets a file's modification (and access) time, not following a link. A failure only loses
/// the time.
fn set_mtime(path: &Path, seconds: i64) {
    let Ok(path) = c_path(path) else { return };
    let time = libc::timespec {
        tv_sec: seconds as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `path` is NUL-terminated and `times` holds the two timespecs utimensat reads;
    // both outlive the call.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
}

/// Sets an extended attribute (file capabilities, for one), not following a link. A failure
/// (a file system without that namespace) only loses the attribute.
fn set_xattr(path: &Path, name: &[u8], value: &[u8]) {
    let (Ok(path), Ok(name)) = (c_path(path), CString::new(name)) else {
        return;
    };
    // SAFETY: `path` and `name` are NUL-terminated, `value` is `value.len()` readable bytes;
    // all outlive the call, which only reads them.
    let set = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if set != 0 {
        tracing::debug!(
            path = %path.to_string_lossy(),
            error = %std::io::Error::last_os_error(),
            "an extended attribute of the image was not kept"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar built entry by entry.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            // Root's files are the tester's own when the tests do not run as root.
            let uid = if uid == 0 {
                u64::from(nix::unistd::geteuid().as_raw())
            } else {
                uid
            };
            header.set_mode(mode);
            header.set_uid(uid);
            header.set_gid(uid);
            header.set_mtime(1_000_000);
            header.set_size(0);
            header
        }
        fn dir(mut self, path: &str) -> Layer {
            let mut header = Layer::header(tar::EntryType::Directory, 0o755, 0);
            self.0
                .append_data(&mut header, path, std::io::empty())
                .unwrap();
            self
        }
        fn file(mut self, path: &str, body: &str, mode: u32, uid: u64) -> Layer {
            let mut header = Layer::header(tar::EntryType::Regular, mode, uid);
            header.set_size(body.len() as u64);
            self.0
                .append_data(&mut header, path, body.as_bytes())
                .unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, path: &str, to: &str) -> Layer {
            let mut header = Layer::header(kind, 0o777, 0);
            self.0.append_link(&mut header, path, to).unwrap();
            self
        }
        /// A file whose path is written as is (the builder refuses `..` and absolute paths).
        fn raw_file(mut self, path: &str) -> Layer {
            let mut header = Layer::header(tar::EntryType::Regular, 0o644, 0);
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(1);
            header.set_cksum();
            self.0.append(&header, &b"x"[..]).unwrap();
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack(root: &Path, layer: Layer) -> Result<UnpackStats, OciError> {
        let mut stats = UnpackStats::default();
        unpack_layer(
            &layer.bytes()[..],
            root,
            &AtomicBool::new(false),
            &mut stats,
            u64::MAX,
        )?;
        Ok(stats)
    }

    /// The owner the tests give files: another user's as root, else the tester's own.
    fn owner() -> u64 {
        let euid = nix::unistd::geteuid();
        if euid.is_root() {
            1000
        } else {
            u64::from(euid.as_raw())
        }
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        unpack(
            root,
            Layer::new()
                .dir("etc/")
                .file("etc/gone", "lower", 0o644, 0)
                .file("etc/kept", "lower", 0o644, 0)
                .dir("opt/")
                .file("opt/old", "lower", 0o644, 0)
                .file("usr/bin/tool", "#!/bin/sh\n", 0o4755, 0)
                .link(tar::EntryType::Link, "usr/bin/tool-again", "usr/bin/tool"),
        )
        .unwrap();
        let stats = unpack(
            root,
            Layer::new()
                .file("etc/.wh.gone", "", 0o644, 0)
                .file("opt/new", "upper", 0o600, owner())
                .file("opt/.wh..wh..opq", "", 0o644, 0)
                .file("etc/kept", "upper", 0o640, owner()),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert!(!root.join("etc/gone").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/kept")).unwrap(),
            "upper"
        );
        let kept = std::fs::metadata(root.join("etc/kept")).unwrap();
        assert_eq!(
            (u64::from(kept.uid()), kept.mode() & 0o7777),
            (owner(), 0o640)
        );
        assert!(
            !root.join("opt/old").exists(),
            "the opaque directory hides the lower layer"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("opt/new")).unwrap(),
            "upper"
        );
        let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755, "set-uid kept");
        assert_eq!(tool.mtime(), 1_000_000);
        assert_eq!(tool.nlink(), 2, "the hard link shares the file");
    }

    #[test]
    fn links_never_lead_out_of_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outside_path = outside
            .path()
            .to_str()
            .unwrap()
            .trim_start_matches('/')
            .to_string();
        unpack(
            root,
            Layer::new()
                .link(
                    tar::EntryType::Symlink,
                    "escape",
                    outside.path().to_str().unwrap(),
                )
                .link(tar::EntryType::Symlink, "up", "../../../..")
                .link(tar::EntryType::Symlink, "lib", "usr/lib")
                .dir("usr/lib/"),
        )
        .unwrap();
        unpack(
            root,
            Layer::new()
                .file("escape/owned", "x", 0o644, 0)
                .file("up/owned", "x", 0o644, 0)
                .file("lib/libfoo.so", "elf", 0o644, 0)
                .raw_file("../../dotdot")
                .raw_file("/etc/absolute"),
        )
        .unwrap();
        assert!(
            !outside.path().join("owned").exists(),
            "an absolute link is the tree's"
        );
        assert!(root.join(&outside_path).join("owned").is_file());
        assert!(root.join("owned").is_file(), ".. stops at the tree's root");
        assert!(root.join("dotdot").is_file());
        assert!(root.join("etc/absolute").is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("usr/lib/libfoo.so")).unwrap(),
            "elf",
            "a link inside the tree is followed (merged /usr)"
        );
        // A hard link to a file outside the tree names the tree's own path, which is missing.
        let error = unpack(
            root,
            Layer::new().link(tar::EntryType::Link, "passwd", "/etc/passwd"),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("which the layers do not have"),
            "{error}"
        );
    }

    #[test]
    fn a_file_replaces_a_directory_and_a_stop_stops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        unpack(
            root,
            Layer::new()
                .dir("thing/")
                .file("thing/inner", "x", 0o644, 0),
        )
        .unwrap();
        unpack(root, Layer::new().file("thing", "now a file", 0o644, 0)).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("thing")).unwrap(),
            "now a file"
        );
        let mut stats = UnpackStats::default();
        let error = unpack_layer(
            &Layer::new().file("late", "x", 0o644, 0).bytes()[..],
            root,
            &AtomicBool::new(true),
            &mut stats,
            u64::MAX,
        )
        .unwrap_err();
        assert!(matches!(error, OciError::Cancelled(_)), "{error}");
        assert!(!root.join("late").exists());
    }

    #[test]
    fn an_image_that_unpacks_past_its_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Layer::new()
            .file("small", "12345", 0o644, 0)
            .file("big", &"x".repeat(100), 0o644, 0)
            .bytes();
        let mut stats = UnpackStats::default();
        let error = unpack_layer(
            &layer[..],
            dir.path(),
            &AtomicBool::new(false),
            &mut stats,
            50,
        )
        .unwrap_err();
        assert!(matches!(error, OciError::TooLarge(_)), "{error}");
        assert!(
            error.to_string().contains("big is where it went over"),
            "{error}"
        );
        // Right at the limit is fine.
        let dir = tempfile::tempdir().unwrap();
        let mut stats = UnpackStats::default();
        unpack_layer(
            &layer[..],
            dir.path(),
            &AtomicBool::new(false),
            &mut stats,
            105,
        )
        .unwrap();
        assert_eq!(stats.bytes, 105);
    }
}
