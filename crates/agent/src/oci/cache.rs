//! The host's cache of image blobs (`<data>/oci/blobs`): a layer is kept under its digest once
//! its bytes hashed to it, so a second build from the same image fetches nothing. It is held
//! under a size limit, the blobs used least recently going first.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::OciError;

/// The blob cache's default size limit.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;

#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl BlobCache {
    /// The cache in `dir`, at most `max_bytes` once [`BlobCache::trim`] ran; downloads a
    /// previous run left unfinished are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<BlobCache, OciError> {
        let cache = BlobCache {
            dir: dir.to_path_buf(),
            max_bytes,
        };
        for sub in [cache.blobs(), cache.parts()] {
            std::fs::create_dir_all(&sub)
                .map_err(|error| OciError::io("making the blob cache", error))?;
        }
        if let Ok(entries) = std::fs::read_dir(cache.parts()) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(cache)
    }

    fn blobs(&self) -> PathBuf {
        self.dir.join("sha256")
    }

    fn parts(&self) -> PathBuf {
        self.dir.join("downloading")
    }

    fn path_of(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        super::reference::check_digest(digest).ok()?;
        Some(self.blobs().join(hex))
    }

    /// The cached blob `digest`, marked as used now.
    pub fn get(&self, digest: &str) -> Option<PathBuf> {
        let path = self.path_of(digest)?;
        let file = std::fs::File::options().append(true).open(&path).ok()?;
        let _ = file.set_modified(SystemTime::now());
        Some(path)
    }

    /// A new file to download into (removed by [`BlobCache::commit`] or by its caller).
    pub async fn create_part(&self) -> Result<(PathBuf, tokio::fs::File), OciError> {
        let name = wrenn_core::random::hex_token(12)
            .map_err(|error| OciError::io("naming a download", std::io::Error::other(error)))?;
        let path = self.parts().join(format!("{name}.part"));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|error| OciError::io("starting a download into the blob cache", error))?;
        Ok((path, file))
    }

    /// Keeps a verified download as blob `digest`.
    pub fn commit(&self, part: &Path, digest: &str) -> Result<PathBuf, OciError> {
        let target = self
            .path_of(digest)
            .ok_or_else(|| OciError::Invalid(format!("{digest:?} is not a sha256 digest")))?;
        std::fs::rename(part, &target)
            .map_err(|error| OciError::io("keeping a layer in the blob cache", error))?;
        Ok(target)
    }

    /// Removes the blobs used least recently until the cache is under its limit, sparing
    /// `in_use`.
    pub fn trim(&self, in_use: &[PathBuf]) {
        let Ok(entries) = std::fs::read_dir(self.blobs()) else {
            return;
        };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let metadata = entry.metadata().ok()?;
                Some((metadata.modified().ok()?, metadata.len(), entry.path()))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|(_, size, _)| size).sum();
        blobs.sort();
        for (_, size, path) in blobs {
            if total <= self.max_bytes {
                break;
            }
            if in_use.contains(&path) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                tracing::info!(blob = %path.display(), "blob cache: removed (least recently used)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_are_kept_by_digest_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), 10).unwrap();
        let digest = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
        let mut paths = Vec::new();
        for n in 0..3u8 {
            let (part, _file) = cache.create_part().await.unwrap();
            std::fs::write(&part, [n; 6]).unwrap();
            paths.push(cache.commit(&part, &digest(n)).unwrap());
            let file = std::fs::File::options()
                .append(true)
                .open(&paths[n as usize])
                .unwrap();
            file.set_modified(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(n) * 100),
            )
            .unwrap();
        }
        assert!(
            cache.get(&digest(0)).is_some(),
            "a get marks blob 0 as used now"
        );
        assert!(cache.get("sha256:../../etc").is_none());
        cache.trim(&[paths[1].clone()]);
        // 18 bytes over a limit of 10: blob 1 is the least recent but in use, so blob 2 goes,
        // then blob 0 (just used, but still over the limit).
        assert!(!paths[2].exists());
        assert!(paths[1].exists());
        assert!(!paths[0].exists());
        // A download left unfinished is gone at the next open.
        let (part, _file) = cache.create_part().await.unwrap();
        BlobCache::open(dir.path(), 10).unwrap();
        assert!(!part.exists());
    }
}
