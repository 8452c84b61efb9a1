//! The filesystem as envd's clients see it: entry descriptions (`EntryInfo`), listing, creating,
//! moving and removing on behalf of a user, and watching directories. Knows nothing of Connect or
//! HTTP; `rpc::filesystem` and `http::files` map it to the wire.

pub mod access;
pub mod upload_temp;
pub mod watch;
pub mod xattr;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use wrenn_proto::filesystem::{EntryInfo, FileType};

use crate::users::{Accounts, User};
use access::Want;

pub use upload_temp::UPLOAD_TEMP_MARKER;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path '{0}' does not exist")]
    NotFound(PathBuf),
    #[error("path '{0}' already exists")]
    AlreadyExists(PathBuf),
    #[error("path '{0}' is not a directory")]
    NotADirectory(PathBuf),
    #[error("path '{0}' is a directory")]
    IsADirectory(PathBuf),
    #[error("user '{user}' may not access '{path}'")]
    PermissionDenied { user: String, path: PathBuf },
    #[error("{op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => FsError::NotFound(path.to_owned()),
            io::ErrorKind::AlreadyExists => FsError::AlreadyExists(path.to_owned()),
            _ => FsError::Io {
                op,
                path: path.to_owned(),
                source,
            },
        }
    }

    fn denied(user: &User, path: &Path) -> Self {
        FsError::PermissionDenied {
            user: user.name.clone(),
            path: path.to_owned(),
        }
    }
}

/// Go's `fs.FileMode` type letters, in its order, for `permissions` strings.
fn type_letters(metadata: &std::fs::Metadata) -> String {
    let file_type = metadata.file_type();
    let mode = metadata.mode();
    let mut letters = String::new();
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        letters.push('d');
    }
    if file_type.is_symlink() {
        letters.push('L');
    }
    if file_type.is_block_device() || file_type.is_char_device() {
        letters.push('D');
    }
    if file_type.is_fifo() {
        letters.push('p');
    }
    if file_type.is_socket() {
        letters.push('S');
    }
    if mode & 0o4000 != 0 {
        letters.push('u');
    }
    if mode & 0o2000 != 0 {
        letters.push('g');
    }
    if file_type.is_char_device() {
        letters.push('c');
    }
    if mode & 0o1000 != 0 {
        letters.push('t');
    }
    if letters.is_empty() {
        letters.push('-');
    }
    letters
}

/// The `permissions` string of an inode, as Go's `FileMode.String()` writes it
/// (`-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`).
pub fn permissions_string(metadata: &std::fs::Metadata) -> String {
    let mut text = type_letters(metadata);
    let mode = metadata.mode();
    for (i, letter) in "rwxrwxrwx".chars().enumerate() {
        text.push(if mode & (1 << (8 - i)) != 0 {
            letter
        } else {
            '-'
        });
    }
    text
}

fn file_type(metadata: &std::fs::Metadata) -> FileType {
    if metadata.is_dir() {
        FileType::Directory
    } else if metadata.is_file() {
        FileType::File
    } else {
        FileType::Unspecified
    }
}

/// Describes the entry at `path` without following a final symlink, as E2B's envd does: a
/// symlink is marked `is_symlink`, with the type and permission bits of what it finally points
/// to and its fully resolved target (the link's own path, type unspecified and mode 0 when the
/// target is missing or a loop).
pub fn entry_info(path: &Path, accounts: &Accounts) -> Result<EntryInfo, FsError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|e| FsError::io("stat", path, e))?;
    Ok(describe(path, &metadata, accounts))
}

fn describe(path: &Path, metadata: &std::fs::Metadata, accounts: &Accounts) -> EntryInfo {
    let is_symlink = metadata.file_type().is_symlink();
    let (kind, mode, symlink_target) = if is_symlink {
        match (std::fs::canonicalize(path), std::fs::metadata(path)) {
            (Ok(target), Ok(target_metadata)) => (
                file_type(&target_metadata),
                target_metadata.mode() & 0o777,
                Some(target.to_string_lossy().into_owned()),
            ),
            _ => (
                FileType::Unspecified,
                0,
                Some(path.to_string_lossy().into_owned()),
            ),
        }
    } else {
        (file_type(metadata), metadata.mode() & 0o777, None)
    };
    let modified = metadata.modified().ok().map(|time| {
        let since = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        pbjson_types::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }
    });
    EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned()),
        r#type: kind as i32,
        path: path.to_string_lossy().into_owned(),
        size: metadata.size() as i64,
        mode,
        permissions: permissions_string(metadata),
        owner: accounts.user_name(metadata.uid()),
        group: accounts.group_name(metadata.gid()),
        modified_time: modified,
        symlink_target,
        metadata: xattr::read_metadata(path),
        is_symlink,
    }
}

/// Lists a directory to `depth` levels (0 means 1). The directory itself may be a symlink to
/// one; symlinks below it are listed but not followed, so loops cannot recurse.
pub fn list_dir(
    path: &Path,
    depth: u32,
    user: &User,
    accounts: &Accounts,
) -> Result<Vec<EntryInfo>, FsError> {
    let metadata = std::fs::metadata(path).map_err(|e| FsError::io("stat", path, e))?;
    if !metadata.is_dir() {
        return Err(FsError::NotADirectory(path.to_owned()));
    }
    if !access::allowed(&metadata, user, Want::Read) {
        return Err(FsError::denied(user, path));
    }
    let mut entries = Vec::new();
    let mut pending = vec![(path.to_path_buf(), 1u32)];
    while let Some((dir, level)) = pending.pop() {
        let read = match std::fs::read_dir(&dir) {
            Ok(read) => read,
            // A subdirectory that vanished or is unreadable is skipped, not fatal.
            Err(_) if dir != path => continue,
            Err(error) => return Err(FsError::io("read directory", &dir, error)),
        };
        for item in read.flatten() {
            let child = item.path();
            let Ok(child_metadata) = std::fs::symlink_metadata(&child) else {
                continue;
            };
            if child_metadata.is_dir() && level < depth.max(1) {
                pending.push((child.clone(), level + 1));
            }
            entries.push(describe(&child, &child_metadata, accounts));
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Changes the owner of a path to the user (not following symlinks).
pub fn chown_to(path: &Path, user: &User) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
}

/// The mode of the directories envd creates (before the umask), E2B's.
pub const NEW_DIR_MODE: u32 = 0o755;

/// Creates the missing directories from the deepest existing ancestor down to `path`, one by
/// one, each [`NEW_DIR_MODE`] and owned by `user` (E2B's `EnsureDirs`). No permission check:
/// callers decide whether `user` may.
pub fn create_dirs_as(path: &Path, user: &User) -> Result<(), FsError> {
    let mut missing = Vec::new();
    let mut current = path;
    loop {
        match std::fs::symlink_metadata(current) {
            Ok(metadata) if metadata.is_dir() => break,
            Ok(_) if std::fs::metadata(current).is_ok_and(|m| m.is_dir()) => break,
            Ok(_) => return Err(FsError::NotADirectory(current.to_owned())),
            Err(_) => missing.push(current.to_owned()),
        }
        match current.parent() {
            Some(parent) => current = parent,
            None => break,
        }
    }
    let mut builder = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, NEW_DIR_MODE);
    for dir in missing.iter().rev() {
        match builder.create(dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => continue,
            Err(error) => return Err(FsError::io("create directory", dir, error)),
        }
        chown_to(dir, user).map_err(|e| FsError::io("chown", dir, e))?;
    }
    Ok(())
}

/// Creates a directory and its parents, owned by the user.
pub fn make_dir(path: &Path, user: &User, accounts: &Accounts) -> Result<EntryInfo, FsError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => return Err(FsError::AlreadyExists(path.to_owned())),
        Ok(_) => return Err(FsError::NotADirectory(path.to_owned())),
        Err(_) => {}
    }
    if !access::may_create(path, user) {
        return Err(FsError::denied(user, path));
    }
    create_dirs_as(path, user)?;
    entry_info(path, accounts)
}

/// Moves (renames) an entry, creating the destination's parents.
pub fn move_entry(
    source: &Path,
    destination: &Path,
    user: &User,
    accounts: &Accounts,
) -> Result<EntryInfo, FsError> {
    std::fs::symlink_metadata(source).map_err(|e| FsError::io("stat", source, e))?;
    let source_parent = source.parent().unwrap_or(Path::new("/"));
    let parent_ok =
        std::fs::metadata(source_parent).is_ok_and(|m| access::allowed(&m, user, Want::ModifyDir));
    if !parent_ok || !access::may_create(destination, user) {
        return Err(FsError::denied(
            user,
            if parent_ok { destination } else { source },
        ));
    }
    if let Some(parent) = destination.parent() {
        create_dirs_as(parent, user)?;
    }
    std::fs::rename(source, destination).map_err(|e| FsError::io("move", source, e))?;
    entry_info(destination, accounts)
}

/// Removes a file, a symlink or a directory tree. A missing path is not an error (like
/// `rm -rf`).
pub fn remove(path: &Path, user: &User) -> Result<(), FsError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(FsError::io("stat", path, error)),
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !std::fs::metadata(parent).is_ok_and(|m| access::allowed(&m, user, Want::ModifyDir)) {
        return Err(FsError::denied(user, path));
    }
    let result = if metadata.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(FsError::io("remove", path, error))
        }
        _ => Ok(()),
    }
}

/// What the tests of this module and of its submodules share.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    /// A new temporary directory (removed when dropped) holding a file `f` with `contents` and
    /// the permission bits `mode`.
    pub(crate) fn file_with_mode(contents: &[u8], mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, contents).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn root() -> User {
        User::for_tests("root", 0, "/root", vec![0])
    }

    #[test]
    fn permission_strings_follow_go() {
        let (dir, file) = testing::file_with_mode(b"abc", 0o644);
        assert_eq!(
            permissions_string(&std::fs::metadata(&file).unwrap()),
            "-rw-r--r--"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1755)).unwrap();
        assert_eq!(
            permissions_string(&std::fs::metadata(dir.path()).unwrap()),
            "dtrwxr-xr-x"
        );
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(
            permissions_string(&std::fs::symlink_metadata(&link).unwrap()),
            "Lrwxrwxrwx"
        );
    }

    #[test]
    fn symlinks_report_their_target() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("missing", dir.path().join("dangling")).unwrap();
        let accounts = Accounts::default();
        let link = entry_info(&dir.path().join("link"), &accounts).unwrap();
        assert!(link.is_symlink);
        assert_eq!(link.r#type, FileType::Directory as i32);
        let real = std::fs::canonicalize(dir.path().join("real")).unwrap();
        assert_eq!(link.symlink_target.unwrap(), real.to_string_lossy());
        let dangling = entry_info(&dir.path().join("dangling"), &accounts).unwrap();
        assert!(dangling.is_symlink);
        assert_eq!(dangling.r#type, FileType::Unspecified as i32);
        assert_eq!(dangling.mode, 0);
    }

    #[test]
    fn list_depths_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        std::fs::write(dir.path().join("a/f.txt"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("a/loop")).unwrap();
        let accounts = Accounts::default();
        let names = |depth| -> Vec<String> {
            list_dir(dir.path(), depth, &root(), &accounts)
                .unwrap()
                .into_iter()
                .map(|e| {
                    e.path
                        .trim_start_matches(dir.path().to_str().unwrap())
                        .to_owned()
                })
                .collect()
        };
        assert_eq!(names(0), vec!["/a"]);
        assert_eq!(names(1), vec!["/a"]);
        assert_eq!(names(2), vec!["/a", "/a/b", "/a/f.txt", "/a/loop"]);
        assert_eq!(
            names(10),
            vec!["/a", "/a/b", "/a/b/c", "/a/f.txt", "/a/loop"]
        );
        assert!(matches!(
            list_dir(&dir.path().join("a/f.txt"), 1, &root(), &accounts),
            Err(FsError::NotADirectory(_))
        ));
        assert!(matches!(
            list_dir(&dir.path().join("nope"), 1, &root(), &accounts),
            Err(FsError::NotFound(_))
        ));
    }

    #[test]
    fn make_move_remove() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::default();
        let nested = dir.path().join("x/y/z");
        assert_eq!(
            make_dir(&nested, &root(), &accounts).unwrap().r#type,
            FileType::Directory as i32
        );
        assert!(matches!(
            make_dir(&nested, &root(), &accounts),
            Err(FsError::AlreadyExists(_))
        ));
        std::fs::write(dir.path().join("file"), b"1").unwrap();
        assert!(matches!(
            make_dir(&dir.path().join("file"), &root(), &accounts),
            Err(FsError::NotADirectory(_))
        ));
        let moved = move_entry(
            &dir.path().join("file"),
            &dir.path().join("new/place"),
            &root(),
            &accounts,
        )
        .unwrap();
        assert_eq!(moved.name, "place");
        assert!(matches!(
            move_entry(
                &dir.path().join("file"),
                &dir.path().join("other"),
                &root(),
                &accounts
            ),
            Err(FsError::NotFound(_))
        ));
        remove(&dir.path().join("x"), &root()).unwrap();
        assert!(!dir.path().join("x").exists());
        remove(&dir.path().join("x"), &root()).unwrap();
    }
}
