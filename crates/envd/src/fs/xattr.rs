//! File metadata stored as extended attributes `user.e2b.<key>` (E2B's scheme): reading all of
//! them and writing a new set. Thin wrappers over the xattr system calls.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The attribute namespace prefix of file metadata.
pub const PREFIX: &str = "user.e2b.";

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// The most bytes read of a file's attribute names, and of one attribute's value.
const READ_BUFFER_BYTES: usize = 4096;

/// What a get-style xattr call writes into a buffer of [`READ_BUFFER_BYTES`]: `fill` gets the
/// buffer and its length and returns how many bytes it wrote, or a negative number on failure
/// (then `None`).
fn read_into(fill: impl FnOnce(*mut libc::c_void, usize) -> isize) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let len = usize::try_from(fill(buffer.as_mut_ptr().cast(), buffer.len())).ok()?;
    buffer.truncate(len);
    Some(buffer)
}

/// The metadata of a file (not following a final symlink). Filesystems without xattr support
/// have none.
pub fn read_metadata(path: &Path) -> HashMap<String, String> {
    let Ok(path) = c_path(path) else {
        return HashMap::new();
    };
    // SAFETY: `read_into` passes a buffer valid for writes of the length it passes; the path
    // is NUL-terminated.
    let Some(names) =
        read_into(|buffer, len| unsafe { libc::llistxattr(path.as_ptr(), buffer.cast(), len) })
    else {
        return HashMap::new();
    };
    let mut metadata = HashMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(c_name) = CString::new(name) else {
            continue;
        };
        // SAFETY: as above, with a NUL-terminated attribute name.
        let Some(value) = read_into(|buffer, len| unsafe {
            libc::lgetxattr(path.as_ptr(), c_name.as_ptr(), buffer, len)
        }) else {
            continue;
        };
        metadata.insert(
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(&value).into_owned(),
        );
    }
    metadata
}

/// Sets one metadata entry on a file.
pub fn write_entry(path: &Path, key: &str, value: &str) -> io::Result<()> {
    let c_path = c_path(path)?;
    let name = CString::new(format!("{PREFIX}{key}"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "metadata key contains NUL"))?;
    // SAFETY: path and name are NUL-terminated; the value pointer is valid for its length.
    let result = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Metadata keys and values must be printable ASCII, keys at most this long (the xattr name
/// limit of 255 minus the prefix)...
pub const MAX_KEY_BYTES: usize = 246;
/// ...and all of it together at most this large.
pub const MAX_TOTAL_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata key '{0}' must be printable ASCII")]
    KeyNotPrintable(String),
    #[error("metadata value of key '{0}' must be printable ASCII")]
    ValueNotPrintable(String),
    #[error("metadata key '{0}' is longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong(String),
    #[error("metadata is larger than {MAX_TOTAL_BYTES} bytes in all")]
    TooLarge,
    #[error("metadata key is empty")]
    EmptyKey,
}

fn printable(text: &str) -> bool {
    text.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Validates a metadata set and normalises its keys to lower case.
pub fn validate(entries: &[(String, String)]) -> Result<Vec<(String, String)>, MetadataError> {
    let mut total = 0;
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if key.is_empty() {
            return Err(MetadataError::EmptyKey);
        }
        if !printable(key) {
            return Err(MetadataError::KeyNotPrintable(key.clone()));
        }
        if !printable(value) {
            return Err(MetadataError::ValueNotPrintable(key.clone()));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(MetadataError::KeyTooLong(key.clone()));
        }
        total += key.len() + value.len();
        if total > MAX_TOTAL_BYTES {
            return Err(MetadataError::TooLarge);
        }
        out.push((key.to_ascii_lowercase(), value.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = validate(&[("Owner".into(), "team a".into())]).unwrap();
        assert_eq!(ok, vec![("owner".to_owned(), "team a".to_owned())]);
        assert_eq!(
            validate(&[("k\u{e9}".into(), "v".into())]),
            Err(MetadataError::KeyNotPrintable("k\u{e9}".into()))
        );
        assert_eq!(
            validate(&[("k".into(), "v\n".into())]),
            Err(MetadataError::ValueNotPrintable("k".into()))
        );
        let long = "k".repeat(247);
        assert_eq!(
            validate(&[(long.clone(), "v".into())]),
            Err(MetadataError::KeyTooLong(long))
        );
        let big: Vec<_> = (0..20)
            .map(|i| (format!("k{i}"), "v".repeat(250)))
            .collect();
        assert_eq!(validate(&big), Err(MetadataError::TooLarge));
    }

    #[test]
    fn round_trip_where_supported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        match write_entry(&file, "owner", "me") {
            Ok(()) => assert_eq!(
                read_metadata(&file).get("owner").map(String::as_str),
                Some("me")
            ),
            // Only "not supported" means the filesystem has no user xattrs; any other error fails.
            Err(error)
                if [libc::ENOTSUP, libc::EOPNOTSUPP]
                    .map(Some)
                    .contains(&error.raw_os_error()) =>
            {
                wrenn_testkit::missing_prerequisite(
                    "the xattr round trip",
                    &format!(
                        "the filesystem of {} has no user xattrs ({error})",
                        dir.path().display()
                    ),
                )
            }
            Err(error) => panic!("writing an xattr failed: {error}"),
        }
    }
}
