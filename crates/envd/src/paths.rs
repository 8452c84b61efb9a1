//! Resolving the paths clients send (E2B's `ExpandAndResolve`): `~` and `~/x` expand to the
//! user's home, a relative path is taken relative to the home, an empty path is the default
//! working directory, and the result is made absolute and lexically cleaned. Symlinks are not
//! resolved here: the operations decide whether to follow them.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path '{0}' uses another user's home (~user), which is not supported")]
    OtherUsersHome(String),
    #[error("path contains a NUL byte")]
    NulByte,
}

/// Resolves `path` for a user whose home is `home`, with `default_dir` for an empty path.
pub fn resolve(path: &str, home: &Path, default_dir: Option<&Path>) -> Result<PathBuf, PathError> {
    if path.contains('\0') {
        return Err(PathError::NulByte);
    }
    let joined = if path.is_empty() {
        default_dir.unwrap_or(home).to_path_buf()
    } else if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('~') {
        return Err(PathError::OtherUsersHome(path.to_owned()));
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    Ok(clean(&joined))
}

/// Lexical cleaning of an absolute path: removes `.`, resolves `..` (never above `/`) and
/// repeated or trailing slashes.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn home() -> &'static Path {
        Path::new("/home/user")
    }

    #[test]
    fn expands_home_and_relative_paths() {
        let cases = [
            ("~", "/home/user"),
            ("~/", "/home/user"),
            ("~/a/b", "/home/user/a/b"),
            ("notes.txt", "/home/user/notes.txt"),
            ("./x/../y", "/home/user/y"),
            ("/etc//hosts/", "/etc/hosts"),
            ("/a/./b/../../..", "/"),
            ("../../../../etc", "/etc"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                resolve(input, home(), None).unwrap(),
                PathBuf::from(expected),
                "{input}"
            );
        }
    }

    #[test]
    fn empty_path_is_the_default_directory() {
        assert_eq!(
            resolve("", home(), None).unwrap(),
            PathBuf::from("/home/user")
        );
        assert_eq!(
            resolve("", home(), Some(Path::new("/code"))).unwrap(),
            PathBuf::from("/code")
        );
    }

    #[test]
    fn rejects_other_homes_and_nul() {
        assert_eq!(
            resolve("~root/x", home(), None),
            Err(PathError::OtherUsersHome("~root/x".into()))
        );
        assert_eq!(resolve("/a\0b", home(), None), Err(PathError::NulByte));
    }

    proptest! {
        #[test]
        fn resolved_paths_are_absolute_and_clean(path in "[a-z./~]{0,20}") {
            if let Ok(resolved) = resolve(&path, home(), None) {
                prop_assert!(resolved.is_absolute());
                let text = resolved.to_str().unwrap();
                prop_assert!(!text.contains("//"));
                prop_assert!(resolved.components().all(|c| !matches!(c, Component::ParentDir | Component::CurDir)));
                prop_assert!(text == "/" || !text.ends_with('/'));
            }
        }
    }
}
