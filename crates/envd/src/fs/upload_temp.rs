//! The names of uploads' temporary files, which carry what the upload does.
//!
//! An upload is written to a hidden temporary file and renamed over its destination (see
//! `http::files`). A watcher sees only the rename, which cannot tell a new file from a replaced
//! one, nor an empty file from a written one, while E2B's envd, writing in place, produces
//! different events for each. So the temporary file's name says whether the upload creates its
//! destination and whether it sets metadata; the watcher reads that from the name of the
//! rename's source and reports the events E2B's envd would have caused (`fs::watch`). Does not
//! create or rename files.

use std::path::{Path, PathBuf};

/// Part of the name of an upload's temporary file (`.<name><marker><flags>-<unique>`), which
/// watchers hide.
pub const UPLOAD_TEMP_MARKER: &str = ".wrenn-upload-";

/// At most this many bytes of the destination's name go into the temporary file's name, so that
/// a destination name near the 255-byte limit still has a temporary file.
const NAME_PREFIX_MAX_BYTES: usize = 128;

/// What an upload does to its destination, as its temporary file's name records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadKind {
    /// The destination did not exist before (otherwise its contents are replaced).
    pub creates: bool,
    /// Extended attributes are written (new metadata, or stale metadata removed).
    pub sets_metadata: bool,
}

impl UploadKind {
    fn flags(self) -> [char; 2] {
        [
            if self.creates { 'n' } else { 'o' },
            if self.sets_metadata { 'm' } else { '-' },
        ]
    }

    /// The temporary file beside `target` for this upload; `unique` tells concurrent uploads
    /// apart.
    pub fn temp_path(self, target: &Path, unique: &str) -> PathBuf {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut end = name.len().min(NAME_PREFIX_MAX_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let [created, metadata] = self.flags();
        target.with_file_name(format!(
            ".{}{UPLOAD_TEMP_MARKER}{created}{metadata}-{unique}",
            &name[..end]
        ))
    }

    /// The kind of upload a temporary file's name records; `None` for a name that is not one
    /// (or whose flags are unreadable).
    pub fn from_temp_name(name: &str) -> Option<UploadKind> {
        if !is_upload_temp(name) {
            return None;
        }
        let (_, after) = name.rsplit_once(UPLOAD_TEMP_MARKER)?;
        let mut flags = after.chars();
        let creates = match flags.next()? {
            'n' => true,
            'o' => false,
            _ => return None,
        };
        let sets_metadata = match flags.next()? {
            'm' => true,
            '-' => false,
            _ => return None,
        };
        Some(UploadKind {
            creates,
            sets_metadata,
        })
    }
}

/// Whether a file name is an upload's temporary file (which watchers hide).
pub fn is_upload_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(UPLOAD_TEMP_MARKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_round_trips_every_kind() {
        for creates in [true, false] {
            for sets_metadata in [true, false] {
                let kind = UploadKind {
                    creates,
                    sets_metadata,
                };
                let temp = kind.temp_path(Path::new("/d/report.txt"), "42-0badcafe");
                assert_eq!(temp.parent(), Some(Path::new("/d")));
                let name = temp.file_name().unwrap().to_str().unwrap();
                assert!(name.starts_with(".report.txt.wrenn-upload-"), "{name}");
                assert_eq!(UploadKind::from_temp_name(name), Some(kind), "{name}");
            }
        }
    }

    #[test]
    fn destination_names_that_look_like_temporary_files_do_not_confuse_it() {
        let kind = UploadKind {
            creates: false,
            sets_metadata: true,
        };
        let temp = kind.temp_path(Path::new("/d/.x.wrenn-upload-n-"), "1-2");
        let name = temp.file_name().unwrap().to_str().unwrap();
        assert_eq!(UploadKind::from_temp_name(name), Some(kind));
        assert_eq!(UploadKind::from_temp_name("plain.txt"), None);
        assert_eq!(UploadKind::from_temp_name(".a.wrenn-upload-x-1"), None);
        assert!(is_upload_temp(".a.wrenn-upload-x-1"));
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        let long = "\u{e9}".repeat(127); // 254 bytes
        let temp = UploadKind {
            creates: true,
            sets_metadata: false,
        }
        .temp_path(&Path::new("/d").join(&long), "123456-89abcdef");
        let name = temp.file_name().unwrap().to_str().unwrap();
        assert!(name.len() <= 255, "{}", name.len());
        assert!(UploadKind::from_temp_name(name).unwrap().creates);
    }
}
