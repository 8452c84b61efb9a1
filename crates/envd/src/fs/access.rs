//! Whether a user may touch a path, by the classic owner/group/other permission bits. envd runs
//! as root and acts on a user's behalf, so it checks what the kernel would have checked had the
//! user made the call.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::users::User;

/// What the user wants to do with an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Read,
    /// Create, rename or delete entries of a directory (write and search).
    ModifyDir,
    /// Overwrite a file's contents.
    Write,
}

/// Whether `user` may do `want` to the inode `metadata` describes.
pub fn allowed(metadata: &std::fs::Metadata, user: &User, want: Want) -> bool {
    if user.uid == 0 {
        return true;
    }
    let mode = metadata.mode();
    let class_bits = if metadata.uid() == user.uid {
        (mode >> 6) & 0o7
    } else if user.groups.contains(&metadata.gid()) || metadata.gid() == user.gid {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    let needed = match want {
        Want::Read => 0o4,
        Want::ModifyDir => 0o3,
        Want::Write => 0o2,
    };
    class_bits & needed == needed
}

/// The deepest existing ancestor of `path` (itself included), with its metadata.
pub fn existing_ancestor(path: &Path) -> Option<(&Path, std::fs::Metadata)> {
    let mut current = Some(path);
    while let Some(candidate) = current {
        if let Ok(metadata) = std::fs::metadata(candidate) {
            return Some((candidate, metadata));
        }
        current = candidate.parent();
    }
    None
}

/// Whether `user` may create `path` (and any missing parents): the deepest existing ancestor
/// must be a directory they may modify.
pub fn may_create(path: &Path, user: &User) -> bool {
    let parent = path.parent().unwrap_or(path);
    match existing_ancestor(parent) {
        Some((_, metadata)) => metadata.is_dir() && allowed(&metadata, user, Want::ModifyDir),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn user(uid: u32, groups: Vec<u32>) -> User {
        User::for_tests("u", uid, "/", groups)
    }

    #[test]
    fn permission_classes() {
        let (_dir, file) = crate::fs::testing::file_with_mode(b"", 0o640);
        let metadata = std::fs::metadata(&file).unwrap();
        let owner = user(metadata.uid(), vec![424242]);
        let group_member = user(4242, vec![metadata.gid()]);
        let stranger = user(4242, vec![434343]);
        assert!(allowed(&metadata, &owner, Want::Write));
        assert!(allowed(&metadata, &group_member, Want::Read));
        assert!(!allowed(&metadata, &group_member, Want::Write));
        assert!(!allowed(&metadata, &stranger, Want::Read));
        assert!(allowed(&metadata, &user(0, vec![0]), Want::Write));
    }

    #[test]
    fn creation_checks_the_deepest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let owner_uid = std::fs::metadata(dir.path()).unwrap().uid();
        let target = dir.path().join("a/b/c.txt");
        assert!(may_create(&target, &user(owner_uid, vec![1])));
        assert!(!may_create(&target, &user(owner_uid + 1, vec![4343])));
    }
}
