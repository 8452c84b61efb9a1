//! The template store: where a fleet's templates live as immutable, content-addressed
//! artifacts that every host pulls from. A local directory (`wrenn up`'s default, or one a
//! host's agents share) or an S3 bucket (`s3://bucket/prefix`, through `object_store`, with
//! the `AWS_*` environment's credentials, region and endpoint).
//!
//! The layout:
//! - `blobs/sha256/<hex>.zst`: a file (a kernel, an initramfs, a memory snapshot, a disk
//!   layer), zstd-compressed, named by the SHA-256 of its uncompressed bytes. A blob is
//!   written once (a host that finds it there does not send it again) and checked against its
//!   name and size whenever it is read.
//! - `templates/<id>.json`: an [`Artifact`], what makes a template of blobs.
//!
//! This module moves bytes and knows nothing of the agent's templates; `manager::stored` puts
//! templates in and takes them out.

use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AgentError;
use crate::store::TemplateRecord;

/// The version of [`Artifact`] this agent writes: 2 has the guest's memory in a file of its
/// own when the template keeps it so (an agent that reads only 1 cannot restore it).
pub const ARTIFACT_FORMAT: u32 = 2;
/// The oldest version this agent reads.
pub const OLDEST_ARTIFACT_FORMAT: u32 = 1;
/// How many compressed bytes a chunk between the compressing thread and the upload holds.
const CHUNK_BYTES: usize = 1 << 20;
/// The zstd level blobs are written at: fast, and zeros (sparse disks) cost nothing.
const ZSTD_LEVEL: i32 = 3;
/// How much of a file is read, or left unwritten when it is all zeros, at a time.
const BLOCK_BYTES: usize = 64 << 10;
/// A block of zeros, to compare with.
static ZEROS: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
/// The longest one request to the store may take (a blob is one request each way).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The largest template record written to or read from a store.
pub const MAX_ARTIFACT_BYTES: u64 = 4 << 20;
/// A blob no template names is removed only once it is this old: a host may be putting the
/// template that names it.
pub const UNREFERENCED_BLOB_AGE: Duration = Duration::from_secs(3600);

/// A file of a template, by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Its name in the template's directory.
    pub name: String,
    /// The SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its length in bytes (sparse files are stored whole, their holes as zeros).
    pub size: u64,
}

/// A template in the store: its record, with every path a file name in the template's
/// directory, and its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub format: u32,
    pub record: TemplateRecord,
    /// The kernel, the initramfs and the memory snapshot.
    pub files: Vec<StoredFile>,
    /// The disk's chain, its top layer (the record's disk) first, each with its format.
    pub disk: Vec<(StoredFile, String)>,
}

impl Artifact {
    /// Every file, the disk's layers last.
    pub fn all_files(&self) -> impl Iterator<Item = &StoredFile> {
        self.files
            .iter()
            .chain(self.disk.iter().map(|(file, _)| file))
    }

    /// The bytes of its files, uncompressed.
    pub fn size(&self) -> u64 {
        self.all_files().map(|file| file.size).sum()
    }
}

/// What a transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Files sent or fetched (the others were there already).
    pub files: u64,
    /// Their bytes, uncompressed.
    pub bytes: u64,
    /// Their bytes as the store keeps them (compressed).
    pub stored_bytes: u64,
}

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, other: Moved) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.stored_bytes += other.stored_bytes;
    }
}

/// A store of templates.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    objects: Arc<dyn ObjectStore>,
    location: String,
}

fn store_error(doing: &str, error: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("the template store: {doing}: {error}"))
}

/// Whether `text` is a SHA-256 in lowercase hex.
fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TemplateStore {
    /// Opens the store `location` names: `s3://bucket[/prefix]`, or a directory (a path, or
    /// `file://` and one), made if missing and kept root's alone.
    pub fn open(location: &str) -> Result<TemplateStore, AgentError> {
        let objects: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(AgentError::InvalidArgument(format!(
                    "the template store {location:?} names no bucket: use s3://bucket[/prefix]"
                )));
            }
            // Its HTTPS goes through the rustls wrenn builds with ring.
            wrenn_http::client::use_ring_for_tls();
            let options = object_store::ClientOptions::new()
                .with_timeout(REQUEST_TIMEOUT)
                .with_connect_timeout(Duration::from_secs(10));
            let builder = object_store::aws::AmazonS3Builder::from_env();
            let allow_http = builder
                .get_config_value(&object_store::aws::AmazonS3ConfigKey::Client(
                    object_store::ClientConfigKey::AllowHttp,
                ))
                .is_some_and(|value| value.eq_ignore_ascii_case("true") || value == "1");
            let s3 = builder
                .with_bucket_name(bucket)
                .with_client_options(options)
                .with_http_connector(StoreConnector { allow_http })
                .build()
                .map_err(|error| {
                    AgentError::InvalidArgument(format!(
                        "the template store {location:?}: {error} (credentials, region and \
                         endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, \
                         AWS_ENDPOINT_URL and AWS_ALLOW_HTTP)"
                    ))
                })?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
            if !dir.is_absolute() {
                return Err(AgentError::InvalidArgument(format!(
                    "the template store {location:?} must be s3://bucket[/prefix] or an \
                     absolute directory"
                )));
            }
            crate::store::private_dir(&dir)?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|error| store_error(&format!("opening {}", dir.display()), error))?;
            Arc::new(local)
        };
        Ok(TemplateStore {
            objects,
            location: location.to_string(),
        })
    }

    /// Checks that the store answers and its bucket or directory is there (a listing).
    pub async fn check(&self) -> Result<(), AgentError> {
        self.objects
            .list_with_delimiter(Some(&Path::from("templates")))
            .await
            .map(drop)
            .map_err(|error| store_error(&format!("reaching {}", self.location), error))
    }

    /// Where it is, as it was named.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn blob_path(sha256: &str) -> Path {
        Path::from(format!("blobs/sha256/{sha256}.zst"))
    }

    fn artifact_path(template_id: &str) -> Path {
        Path::from(format!("templates/{template_id}.json"))
    }

    /// Whether the blob of `sha256` is there.
    pub async fn has_blob(&self, sha256: &str) -> Result<bool, AgentError> {
        match self.objects.head(&Self::blob_path(sha256)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(store_error("looking for a blob", error)),
        }
    }

    /// Puts the file at `path`, whose bytes hash to `file.sha256`, unless the store has it.
    /// The bytes are hashed again as they are sent: a file that changed meanwhile is refused
    /// and nothing of it is kept.
    pub async fn put_blob(&self, path: &FsPath, file: &StoredFile) -> Result<Moved, AgentError> {
        if !is_sha256(&file.sha256) {
            return Err(AgentError::Internal(format!(
                "{:?} is not a SHA-256",
                file.sha256
            )));
        }
        if self.has_blob(&file.sha256).await? {
            return Ok(Moved::default());
        }
        let (sender, mut chunks) = tokio::sync::mpsc::channel::<Bytes>(4);
        let source = path.to_path_buf();
        let compress = tokio::task::spawn_blocking(move || compress_file(&source, sender));
        let mut upload = object_store::buffered::BufWriter::with_capacity(
            self.objects.clone(),
            Self::blob_path(&file.sha256),
            8 << 20,
        );
        let mut stored_bytes = 0u64;
        let sent = async {
            while let Some(chunk) = chunks.recv().await {
                stored_bytes += chunk.len() as u64;
                upload.put(chunk).await?;
            }
            Ok::<_, object_store::Error>(())
        }
        .await;
        drop(chunks);
        let compressed = compress
            .await
            .map_err(|error| AgentError::internal("the compressing thread", error))?;
        let outcome = match (sent, compressed) {
            (Err(error), _) => Err(store_error("sending a blob", error)),
            (Ok(()), Err(error)) => Err(error),
            (Ok(()), Ok((sha256, size))) if sha256 != file.sha256 || size != file.size => {
                Err(AgentError::Internal(format!(
                    "{} changed while it was sent to the template store",
                    path.display()
                )))
            }
            (Ok(()), Ok(_)) => Ok(()),
        };
        match outcome {
            Ok(()) => {
                tokio::io::AsyncWriteExt::shutdown(&mut upload)
                    .await
                    .map_err(|error| store_error("finishing a blob", error))?;
                Ok(Moved {
                    files: 1,
                    bytes: file.size,
                    stored_bytes,
                })
            }
            Err(error) => {
                let _ = upload.abort().await;
                Err(error)
            }
        }
    }

    /// Fetches the blob of `file` into `target` (made anew, sparse where the file has zeros),
    /// checked against its size and hash: a blob that does not match is an error and
    /// `target` is removed.
    pub async fn get_blob(&self, file: &StoredFile, target: &FsPath) -> Result<Moved, AgentError> {
        if !is_sha256(&file.sha256) {
            return Err(AgentError::Internal(format!(
                "the template names {:?}, not a SHA-256",
                file.sha256
            )));
        }
        let got = match self.objects.get(&Self::blob_path(&file.sha256)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(AgentError::NotFound(format!(
                    "the template store has no blob {} ({})",
                    file.sha256, file.name
                )));
            }
            Err(error) => return Err(store_error("fetching a blob", error)),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
        let destination = target.to_path_buf();
        let expected = file.clone();
        let decompress =
            tokio::task::spawn_blocking(move || decompress_into(receiver, &destination, &expected));
        let mut stream = got.into_stream();
        let mut stored_bytes = 0u64;
        let mut received = Ok(());
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    stored_bytes += chunk.len() as u64;
                    // The thread stops reading when the bytes went wrong: its error says why.
                    if sender.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    received = Err(store_error("fetching a blob", error));
                    break;
                }
            }
        }
        drop(sender);
        let written = decompress
            .await
            .map_err(|error| AgentError::internal("the decompressing thread", error))?;
        let outcome = received.and(written);
        if outcome.is_err() {
            let _ = std::fs::remove_file(target);
        }
        outcome.map(|()| Moved {
            files: 1,
            bytes: file.size,
            stored_bytes,
        })
    }

    /// What the artifact's blobs take in the store (compressed), each counted once.
    pub async fn stored_bytes(&self, artifact: &Artifact) -> Result<u64, AgentError> {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for file in artifact.all_files() {
            if seen.insert(file.sha256.clone()) {
                let meta = self
                    .objects
                    .head(&Self::blob_path(&file.sha256))
                    .await
                    .map_err(|error| store_error("looking at a blob", error))?;
                total += meta.size;
            }
        }
        Ok(total)
    }

    /// Writes the template's artifact (one put: readers see all of it or none).
    pub async fn put_artifact(&self, artifact: &Artifact) -> Result<(), AgentError> {
        let json = serde_json::to_vec_pretty(artifact)
            .map_err(|error| AgentError::internal("encoding the artifact", error))?;
        if json.len() as u64 > MAX_ARTIFACT_BYTES {
            return Err(AgentError::FailedPrecondition(format!(
                "template {}'s record is {} bytes, over the {MAX_ARTIFACT_BYTES} a store's \
                 record may have (its steps' ENV, most likely)",
                artifact.record.template_id,
                json.len()
            )));
        }
        self.objects
            .put(
                &Self::artifact_path(&artifact.record.template_id),
                json.into(),
            )
            .await
            .map_err(|error| store_error("writing a template", error))?;
        Ok(())
    }

    /// The template `template_id`'s artifact, if the store has it.
    pub async fn artifact(&self, template_id: &str) -> Result<Option<Artifact>, AgentError> {
        let got = match self.objects.get(&Self::artifact_path(template_id)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(store_error("reading a template", error)),
        };
        // A record names a few dozen files: one far larger is not ours to read into memory.
        if got.meta.size > MAX_ARTIFACT_BYTES {
            return Err(AgentError::Internal(format!(
                "the template store's record of {template_id} is {} bytes, over the {} a record \
                 may have",
                got.meta.size, MAX_ARTIFACT_BYTES
            )));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|error| store_error("reading a template", error))?;
        let artifact: Artifact = serde_json::from_slice(&bytes).map_err(|error| {
            AgentError::Internal(format!(
                "the template store's record of {template_id} is unreadable: {error}"
            ))
        })?;
        if !(OLDEST_ARTIFACT_FORMAT..=ARTIFACT_FORMAT).contains(&artifact.format) {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} is in the store's format {}, this agent reads \
                 {OLDEST_ARTIFACT_FORMAT} to {ARTIFACT_FORMAT}",
                artifact.format
            )));
        }
        if artifact.record.template_id != template_id {
            return Err(AgentError::Internal(format!(
                "the template store's record of {template_id} names {}",
                artifact.record.template_id
            )));
        }
        Ok(Some(artifact))
    }

    /// The ids of the templates in the store.
    pub async fn template_ids(&self) -> Result<Vec<String>, AgentError> {
        let mut ids = Vec::new();
        let mut listing = self.objects.list(Some(&Path::from("templates")));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|error| store_error("listing templates", error))?;
            if let Some(id) = meta
                .location
                .filename()
                .and_then(|name| name.strip_suffix(".json"))
            {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Removes the template `template_id`, then the blobs no template names any more that
    /// are older than `blob_age` (a younger one may belong to a template being put). Whether
    /// the store had it.
    pub async fn delete(&self, template_id: &str, blob_age: Duration) -> Result<bool, AgentError> {
        let had = match self.objects.head(&Self::artifact_path(template_id)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(error) => return Err(store_error("looking for a template", error)),
        };
        if !had {
            return Ok(false);
        }
        match self.objects.delete(&Self::artifact_path(template_id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => return Err(store_error("removing a template", error)),
        }
        // The template is gone whatever the collection does: it is tried again at the next.
        if let Err(error) = self.collect_garbage(blob_age).await {
            tracing::warn!(template = template_id, %error, "the template store's blobs were not collected");
        }
        Ok(true)
    }

    /// Removes the blobs no template names that are older than `age`: how many.
    pub async fn collect_garbage(&self, age: Duration) -> Result<u64, AgentError> {
        let mut named = std::collections::HashSet::new();
        for id in self.template_ids().await? {
            // One that cannot be read may name any blob: nothing is removed then.
            match self.artifact(&id).await {
                Ok(Some(artifact)) => {
                    named.extend(artifact.all_files().map(|file| file.sha256.clone()))
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(AgentError::Internal(format!(
                        "template {id} in the store cannot be read, so no blob is removed: {error}"
                    )));
                }
            }
        }
        let oldest =
            chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let mut removed = 0;
        let mut listing = self.objects.list(Some(&Path::from("blobs/sha256")));
        let mut unnamed = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|error| store_error("listing blobs", error))?;
            let Some(sha256) = meta
                .location
                .filename()
                .and_then(|name| name.strip_suffix(".zst"))
            else {
                continue;
            };
            if !named.contains(sha256) && meta.last_modified <= oldest {
                unnamed.push(meta.location.clone());
            }
        }
        for location in unnamed {
            match self.objects.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(error) => return Err(store_error("removing a blob", error)),
            }
        }
        Ok(removed)
    }
}

/// Makes the S3 client's HTTP client: wrenn's (rustls with ring, the system's authorities, no
/// environment proxies), HTTPS only unless `AWS_ALLOW_HTTP` says otherwise.
#[derive(Debug)]
struct StoreConnector {
    allow_http: bool,
}

impl object_store::client::HttpConnector for StoreConnector {
    fn connect(
        &self,
        _options: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        let client = wrenn_http::client::internet_client_builder()
            .timeout(REQUEST_TIMEOUT)
            .https_only(!self.allow_http)
            .build()
            .map_err(|error| object_store::Error::Generic {
                store: "S3",
                source: Box::new(error),
            })?;
        Ok(object_store::client::HttpClient::new(client))
    }
}

/// The SHA-256 and length of the file at `path` (read on the calling thread).
pub fn hash_file(path: &FsPath) -> Result<(String, u64), AgentError> {
    let mut file = std::fs::File::open(path)
        .map_err(|error| AgentError::internal(&format!("reading {}", path.display()), error))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|error| AgentError::internal(&format!("reading {}", path.display()), error))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `Write` that hands what it is given to the upload in chunks.
struct ChunkSender {
    sender: tokio::sync::mpsc::Sender<Bytes>,
    pending: Vec<u8>,
}

impl ChunkSender {
    fn send_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.pending,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.sender
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= CHUNK_BYTES {
            self.send_pending()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_pending()
    }
}

/// Reads `path`, compresses it into `sender`'s chunks, and says what it hashed to.
fn compress_file(
    path: &FsPath,
    sender: tokio::sync::mpsc::Sender<Bytes>,
) -> Result<(String, u64), AgentError> {
    let context = |error: std::io::Error| {
        AgentError::internal(
            &format!("sending {} to the template store", path.display()),
            error,
        )
    };
    let mut file = std::fs::File::open(path).map_err(context)?;
    let output = ChunkSender {
        sender,
        pending: Vec::with_capacity(CHUNK_BYTES),
    };
    let mut encoder = zstd::stream::write::Encoder::new(output, ZSTD_LEVEL).map_err(context)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(context)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
        encoder.write_all(&buffer[..read]).map_err(context)?;
    }
    let mut output = encoder.finish().map_err(context)?;
    output.flush().map_err(context)?;
    Ok((hex(&hasher.finalize()), size))
}

/// A `Read` over the chunks the download receives.
struct ChunkReceiver {
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChunkReceiver {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        buffer[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Decompresses the received chunks into `target`, skipping blocks of zeros (the file stays
/// sparse), and checks the bytes against `expected`.
fn decompress_into(
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    target: &FsPath,
    expected: &StoredFile,
) -> Result<(), AgentError> {
    let context = |error: std::io::Error| {
        AgentError::internal(
            &format!("fetching {} from the template store", expected.name),
            error,
        )
    };
    let corrupt = |why: String| {
        AgentError::Internal(format!(
            "the template store's blob {} ({}) is corrupt: {why}",
            expected.sha256, expected.name
        ))
    };
    let input = ChunkReceiver {
        receiver,
        current: Bytes::new(),
    };
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(context)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_private()
        .open(target)
        .map_err(context)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BLOCK_BYTES];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            let read = decoder
                .read(&mut buffer[filled..])
                .map_err(|error| corrupt(error.to_string()))?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled == 0 {
            break;
        }
        let block = &buffer[..filled];
        hasher.update(block);
        size += filled as u64;
        if size > expected.size {
            return Err(corrupt(format!("longer than its {} bytes", expected.size)));
        }
        if block == &ZEROS[..filled] {
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Current(filled as i64))
                .map_err(context)?;
        } else {
            file.write_all(block).map_err(context)?;
        }
    }
    if size != expected.size {
        return Err(corrupt(format!("{size} bytes, not {}", expected.size)));
    }
    let sha256 = hex(&hasher.finalize());
    if sha256 != expected.sha256 {
        return Err(corrupt(format!("its bytes hash to {sha256}")));
    }
    file.set_len(size).map_err(context)?;
    file.sync_all().map_err(context)?;
    Ok(())
}

/// Files the store fetches are root's alone, as every file of the agent's.
trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &FsPath, bytes: &[u8]) -> StoredFile {
        std::fs::write(path, bytes).unwrap();
        let (sha256, size) = hash_file(path).unwrap();
        StoredFile {
            name: path.file_name().unwrap().to_string_lossy().into(),
            sha256,
            size,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blobs_go_in_once_come_back_whole_and_sparse_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        // A mostly sparse file: data, 4 MiB of zeros, data.
        let source = dir.path().join("disk.raw");
        let mut bytes = b"head".repeat(1000);
        bytes.extend(std::iter::repeat_n(0u8, 4 << 20));
        bytes.extend(b"tail".repeat(1000));
        let file = write(&source, &bytes);
        let sent = store.put_blob(&source, &file).await.unwrap();
        assert_eq!(sent.files, 1);
        assert!(
            sent.stored_bytes < 64 << 10,
            "zeros compress: {}",
            sent.stored_bytes
        );
        assert_eq!(
            store.put_blob(&source, &file).await.unwrap(),
            Moved::default(),
            "a blob the store has is not sent again"
        );
        let target = dir.path().join("fetched");
        store.get_blob(&file, &target).await.unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), bytes);
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&target).unwrap()) * 512;
        assert!(
            allocated < 1 << 20,
            "the zeros are holes: {allocated} bytes allocated"
        );

        // A blob whose bytes are not what its name says is refused and nothing is left.
        let other = write(&dir.path().join("other"), b"other bytes");
        let lying = StoredFile {
            sha256: file.sha256.clone(),
            size: other.size,
            name: "lying".into(),
        };
        let blob = dir
            .path()
            .join("store/blobs/sha256")
            .join(format!("{}.zst", file.sha256));
        std::fs::write(&blob, zstd::encode_all(&b"other bytes"[..], 3).unwrap()).unwrap();
        let target = dir.path().join("refused");
        let error = store.get_blob(&lying, &target).await.unwrap_err();
        assert!(error.to_string().contains("is corrupt"), "{error}");
        assert!(!target.exists());
        let error = store.get_blob(&file, &target).await.unwrap_err();
        assert!(error.to_string().contains("is corrupt"), "{error}");
        // Not zstd at all.
        std::fs::write(&blob, b"not zstd").unwrap();
        let error = store.get_blob(&file, &target).await.unwrap_err();
        assert!(error.to_string().contains("is corrupt"), "{error}");
        assert!(!target.exists());
        // A blob that is not there.
        let error = store.get_blob(&other, &target).await.unwrap_err();
        assert!(matches!(error, AgentError::NotFound(_)), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_changes_while_it_is_sent_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let source = dir.path().join("file");
        let mut file = write(&source, b"before");
        std::fs::write(&source, b"after!").unwrap();
        let error = store.put_blob(&source, &file).await.unwrap_err();
        assert!(error.to_string().contains("changed"), "{error}");
        assert!(!store.has_blob(&file.sha256).await.unwrap());
        file.sha256 = "not a digest".into();
        assert!(store.put_blob(&source, &file).await.is_err());
    }

    #[test]
    fn locations_are_s3_urls_or_absolute_directories() {
        for bad in ["relative/dir", "s3://", "s3:///prefix"] {
            assert!(TemplateStore::open(bad).is_err(), "{bad}");
        }
    }
}
