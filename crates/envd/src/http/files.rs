//! `GET /files` and `POST /files`: streaming downloads (with Range, conditional requests and
//! gzip) and uploads (multipart with the destination in each part's filename, or a raw body),
//! authorised by the access token or a signed URL.
//!
//! An upload into a directory that does not exist creates every missing level for the uploading
//! user, as E2B's envd does.
//!
//! Uploads never hold a file in memory and never leave a half-written file behind: each one is
//! written to a temporary file beside its destination, flushed to disk, given its owner, mode
//! and metadata, and only then renamed over the destination. A failure (a client that goes
//! away, a full disk) removes the temporary file and leaves the previous file untouched.

// Handlers return early with a finished error response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use super::json_error;
use super::signature::{self, Operation, SignatureError};
use crate::auth;
use crate::fs::access::{self, Want};
use crate::fs::upload_temp::UploadKind;
use crate::fs::{self, xattr};
use crate::state::Envd;
use crate::users::User;

/// Size of the reads and writes of file transfers.
const TRANSFER_CHUNK: usize = 256 * 1024;
/// The prefix of metadata headers.
const METADATA_HEADER_PREFIX: &str = "x-metadata-";

#[derive(Debug, Default, Deserialize)]
pub(crate) struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

/// How a `/files` call was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// No access token is set, or the call carries it.
    Token,
    /// A signed URL: it grants one path, one operation and one user (the signed `username`,
    /// the default user when that is empty), nothing else.
    Signature,
}

/// The access-token or signature check of `/files` (E2B's order: no token set means open; a
/// token header must match; otherwise the signature must).
fn authorize(
    envd: &Envd,
    headers: &HeaderMap,
    query: &FilesQuery,
    operation: Operation,
) -> Result<Grant, Response> {
    let Some(token) = envd.access_token() else {
        return Ok(Grant::Token);
    };
    if let Some(given) = headers
        .get(auth::ACCESS_TOKEN_HEADER)
        .filter(|v| !v.is_empty())
    {
        return if auth::secrets_equal(given.as_bytes(), token.as_bytes()) {
            Ok(Grant::Token)
        } else {
            Err(json_error(
                StatusCode::UNAUTHORIZED,
                "access token present in header but does not match",
            ))
        };
    }
    signature::verify(
        query.path.as_deref().unwrap_or(""),
        operation,
        query.username.as_deref().unwrap_or(""),
        &token,
        query.signature.as_deref(),
        query.signature_expiration.as_deref(),
        chrono::Utc::now().timestamp(),
    )
    .map(|()| Grant::Signature)
    .map_err(|error| match error {
        SignatureError::BadExpiration => json_error(StatusCode::BAD_REQUEST, error.to_string()),
        other => json_error(StatusCode::UNAUTHORIZED, other.to_string()),
    })
}

/// The user of a `/files` call: the `username` query value, else (for a caller holding the
/// token) the Basic user, else the default. A signed URL never falls back to the Basic header:
/// a URL signed for the default user must not be turned into root's by adding `root:`.
fn files_user(
    envd: &Envd,
    headers: &HeaderMap,
    query: &FilesQuery,
    grant: Grant,
) -> Result<User, Response> {
    let requested = match query.username.as_deref().filter(|u| !u.is_empty()) {
        Some(name) => Some(name.to_owned()),
        None if grant == Grant::Token => auth::basic_username(headers).ok().flatten(),
        None => None,
    };
    envd.user(requested.as_deref()).map_err(|error| {
        let name = requested.unwrap_or_else(|| "<default>".to_owned());
        json_error(
            StatusCode::UNAUTHORIZED,
            format!("error looking up user '{name}': {error}"),
        )
    })
}

fn resolve(envd: &Envd, raw: &str, user: &User) -> Result<PathBuf, Response> {
    envd.resolve_path(raw, user).map_err(|error| {
        json_error(
            StatusCode::BAD_REQUEST,
            format!("error expanding and resolving path '{raw}': {error}"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Download

/// The content coding chosen from `Accept-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
}

/// Picks the response coding (E2B's rules): the highest-q acceptable coding wins; identity is
/// always acceptable unless `identity;q=0` (or `*;q=0` without identity) rules it out.
/// No coding the client accepts is available (406).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAcceptable;

/// The requested range lies outside the file (416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// `Err` means nothing acceptable (406).
pub fn negotiate_coding(accept_encoding: Option<&str>) -> Result<Coding, NotAcceptable> {
    let Some(header) = accept_encoding.filter(|h| !h.trim().is_empty()) else {
        return Ok(Coding::Identity);
    };
    let mut entries: Vec<(String, f32)> = header
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let name = parts.next()?.trim().to_ascii_lowercase();
            if name.is_empty() {
                return None;
            }
            let q = parts
                .find_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|v| v.trim().parse::<f32>().ok())
                })
                .unwrap_or(1.0);
            Some((name, q))
        })
        .collect();
    let identity_q = entries
        .iter()
        .find(|(n, _)| n == "identity")
        .map(|(_, q)| *q);
    let star_q = entries.iter().find(|(n, _)| n == "*").map(|(_, q)| *q);
    let identity_rejected =
        identity_q == Some(0.0) || (identity_q.is_none() && star_q == Some(0.0));
    entries.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, q) in &entries {
        if *q <= 0.0 {
            continue;
        }
        match name.as_str() {
            "identity" => return Ok(Coding::Identity),
            "gzip" => return Ok(Coding::Gzip),
            "*" => {
                return Ok(if identity_rejected {
                    Coding::Gzip
                } else {
                    Coding::Identity
                });
            }
            _ => {}
        }
    }
    if identity_rejected {
        Err(NotAcceptable)
    } else {
        Ok(Coding::Identity)
    }
}

/// `Content-Disposition: inline` with the file's name, quoted or RFC 2231-encoded as needed.
pub fn content_disposition(name: &str) -> String {
    const TSPECIALS: &str = "()<>@,;:\\\"/[]?= ";
    if name.is_empty() {
        return "inline".to_owned();
    }
    if !name.is_ascii() || name.chars().any(|c| c.is_ascii_control()) {
        // RFC 2231 attribute characters stay as they are.
        const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'!')
            .remove(b'#')
            .remove(b'$')
            .remove(b'&')
            .remove(b'+')
            .remove(b'-')
            .remove(b'.')
            .remove(b'^')
            .remove(b'_')
            .remove(b'`')
            .remove(b'|')
            .remove(b'~');
        let encoded = percent_encoding::utf8_percent_encode(name, ENCODED).to_string();
        return format!("inline; filename*=utf-8''{encoded}");
    }
    if name.chars().any(|c| TSPECIALS.contains(c)) {
        return format!(
            "inline; filename=\"{}\"",
            name.replace('\\', "\\\\").replace('"', "\\\"")
        );
    }
    format!("inline; filename={name}")
}

fn content_type_for(path: &Path) -> Option<&'static str> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match extension.as_str() {
        "txt" | "log" | "md" => "text/plain; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "xml" => "text/xml; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "wasm" => "application/wasm",
        _ => return None,
    })
}

/// A single byte range of a file of `size` bytes, from a `Range` header. `Ok(None)` means serve
/// the whole file (no header, or one we do not handle such as multiple ranges); `Err` means
/// unsatisfiable (416).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let suffix: u64 = end.parse().map_err(|_| Unsatisfiable)?;
        if suffix == 0 {
            return Err(Unsatisfiable);
        }
        (
            size.saturating_sub(suffix),
            size.checked_sub(1).ok_or(Unsatisfiable)?,
        )
    } else {
        let start: u64 = start.parse().map_err(|_| Unsatisfiable)?;
        let end = if end.is_empty() {
            size.saturating_sub(1)
        } else {
            end.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(Unsatisfiable);
        }
        (start, end)
    };
    Ok(Some(range))
}

pub(crate) async fn download(
    State(envd): State<Arc<Envd>>,
    Query(query): Query<FilesQuery>,
    headers: HeaderMap,
) -> Response {
    let grant = match authorize(&envd, &headers, &query, Operation::Read) {
        Ok(grant) => grant,
        Err(response) => return response,
    };
    let user = match files_user(&envd, &headers, &query, grant) {
        Ok(user) => user,
        Err(response) => return response,
    };
    let path = match resolve(&envd, query.path.as_deref().unwrap_or(""), &user) {
        Ok(path) => path,
        Err(response) => return response,
    };
    let metadata = match tokio::fs::metadata(&path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return json_error(
                StatusCode::NOT_FOUND,
                format!("path '{}' does not exist", path.display()),
            );
        }
        Err(error) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "error checking if path exists '{}': {error}",
                    path.display()
                ),
            );
        }
    };
    if metadata.is_dir() {
        return json_error(
            StatusCode::BAD_REQUEST,
            format!("path '{}' is a directory", path.display()),
        );
    }
    if !access::allowed(&metadata, &user, Want::Read) {
        return json_error(
            StatusCode::FORBIDDEN,
            format!("user '{}' may not read '{}'", user.name, path.display()),
        );
    }

    let header_text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let conditional = [
        header::RANGE,
        header::IF_MODIFIED_SINCE,
        header::IF_NONE_MATCH,
        header::IF_RANGE,
    ]
    .iter()
    .any(|name| headers.contains_key(name));
    let coding = match negotiate_coding(header_text(header::ACCEPT_ENCODING)) {
        Ok(Coding::Gzip) if conditional => Coding::Identity,
        Ok(coding) => coding,
        Err(NotAcceptable) => {
            return json_error(
                StatusCode::NOT_ACCEPTABLE,
                "error parsing Accept-Encoding: no acceptable encoding found, supported: [gzip]",
            );
        }
    };

    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("error opening file '{}': {error}", path.display()),
            );
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Ok(value) = HeaderValue::from_str(&content_disposition(&name)) {
        response_headers.insert(header::CONTENT_DISPOSITION, value);
    }

    if coding == Coding::Gzip {
        let content_type = content_type_for(&path).unwrap_or("application/octet-stream");
        response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let encoder = async_compression::tokio::bufread::GzipEncoder::new(
            BufReader::with_capacity(TRANSFER_CHUNK, file),
        );
        let body = Body::from_stream(ReaderStream::with_capacity(encoder, TRANSFER_CHUNK));
        return (StatusCode::OK, response_headers, body).into_response();
    }

    let size = metadata.len();
    let modified = metadata.modified().ok();
    if let Some(modified) = modified {
        response_headers.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_str(&httpdate::fmt_http_date(modified))
                .expect("http dates are ASCII"),
        );
        let since =
            header_text(header::IF_MODIFIED_SINCE).and_then(|v| httpdate::parse_http_date(v).ok());
        let modified_secs = modified
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Some(since) = since {
            let since_secs = since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if modified_secs <= since_secs && !headers.contains_key(header::IF_NONE_MATCH) {
                return (StatusCode::NOT_MODIFIED, response_headers).into_response();
            }
        }
    }
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let content_type = match content_type_for(&path) {
        Some(content_type) => content_type,
        None => sniff(&mut file).await,
    };
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    match parse_range(header_text(header::RANGE), size) {
        Err(Unsatisfiable) => {
            response_headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII"),
            );
            (StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response()
        }
        Ok(Some((start, end))) => {
            if let Err(error) = file.seek(io::SeekFrom::Start(start)).await {
                return json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("error reading file: {error}"),
                );
            }
            let len = end - start + 1;
            response_headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ASCII"),
            );
            response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            let body =
                Body::from_stream(ReaderStream::with_capacity(file.take(len), TRANSFER_CHUNK));
            (StatusCode::PARTIAL_CONTENT, response_headers, body).into_response()
        }
        Ok(None) => {
            response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            let body =
                Body::from_stream(ReaderStream::with_capacity(file.take(size), TRANSFER_CHUNK));
            (StatusCode::OK, response_headers, body).into_response()
        }
    }
}

/// Text or binary, from the first 512 bytes (then rewinds).
async fn sniff(file: &mut tokio::fs::File) -> &'static str {
    let mut head = [0u8; 512];
    let read = file.read(&mut head).await.unwrap_or(0);
    let _ = file.seek(io::SeekFrom::Start(0)).await;
    let head = &head[..read];
    let text = !head.contains(&0)
        && (std::str::from_utf8(head).is_ok()
            || read == 512 && std::str::from_utf8(&head[..508]).is_ok());
    if text {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

// ---------------------------------------------------------------------------------------------
// Upload

/// One uploaded file, as the response lists it.
#[derive(Debug, Serialize)]
struct UploadedFile {
    #[serde(skip_serializing_if = "std::collections::HashMap::is_empty")]
    metadata: std::collections::HashMap<String, String>,
    name: String,
    path: String,
    r#type: &'static str,
}

#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("path is a directory: {0}")]
    IsDirectory(PathBuf),
    #[error("error ensuring directories: {0}")]
    Directories(fs::FsError),
    #[error("user '{user}' may not write '{path}'")]
    PermissionDenied { user: String, path: PathBuf },
    #[error("not enough disk space available")]
    NoSpace,
    #[error("error reading request body: {0}")]
    Body(io::Error),
    #[error("error writing file: {0}")]
    Io(io::Error),
    #[error("error writing file metadata: {0}")]
    Metadata(io::Error),
}

impl UploadError {
    fn status(&self) -> StatusCode {
        match self {
            UploadError::IsDirectory(_) | UploadError::Body(_) => StatusCode::BAD_REQUEST,
            UploadError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            UploadError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            UploadError::Directories(_) | UploadError::Io(_) | UploadError::Metadata(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn from_write(error: io::Error) -> Self {
        if is_no_space(&error) {
            UploadError::NoSpace
        } else {
            UploadError::Io(error)
        }
    }
}

fn is_no_space(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    )
}

/// The metadata named by `X-Metadata-<key>` headers (first value of each), validated.
fn metadata_from_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, String> {
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() || !seen.insert(key.to_owned()) {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| format!("metadata value for key {key:?} is not printable ASCII"))?;
        entries.push((key.to_owned(), value.to_owned()));
    }
    xattr::validate(&entries).map_err(|error| error.to_string())
}

/// Removes the temporary file unless the upload completed.
struct TempFileGuard(Option<PathBuf>);

impl Drop for TempFileGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn temp_path_for(target: &Path, kind: UploadKind) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    kind.temp_path(target, &format!("{}-{nanos:08x}", std::process::id()))
}

/// Writes `body` to `target` atomically, as `user`, with `metadata`.
async fn write_file(
    target: &Path,
    user: &User,
    mut body: impl AsyncRead + Unpin,
    metadata: &[(String, String)],
) -> Result<UploadedFile, UploadError> {
    // Writing through a symlink writes its target, as opening the link would.
    let target = match tokio::fs::symlink_metadata(target).await {
        Ok(m) if m.file_type().is_symlink() => tokio::fs::canonicalize(target)
            .await
            .unwrap_or_else(|_| target.to_owned()),
        _ => target.to_owned(),
    };
    let existing = match tokio::fs::metadata(&target).await {
        Ok(m) if m.is_dir() => return Err(UploadError::IsDirectory(target)),
        Ok(m) => Some(m),
        Err(_) => None,
    };
    let denied = || UploadError::PermissionDenied {
        user: user.name.clone(),
        path: target.clone(),
    };
    let parent = target.parent().unwrap_or(Path::new("/")).to_owned();
    match tokio::fs::metadata(&parent).await {
        // Into an existing directory: the user must be allowed to write the file, or to add it.
        Ok(parent_metadata) if parent_metadata.is_dir() => match &existing {
            Some(m) if !access::allowed(m, user, Want::Write) => return Err(denied()),
            None if !access::allowed(&parent_metadata, user, Want::ModifyDir) => {
                return Err(denied());
            }
            _ => {}
        },
        Ok(_) => {
            return Err(UploadError::Directories(fs::FsError::NotADirectory(parent)));
        }
        // Into a directory that does not exist: E2B's envd creates every missing level (0755,
        // owned by the uploading user, top-down) whoever owns the deepest existing one, and so
        // do we (SDK users write e.g. `/0/file.txt` as `user`). A file on the way is an error.
        Err(_) => {
            let user_for_dirs = user.clone();
            tokio::task::spawn_blocking(move || fs::create_dirs_as(&parent, &user_for_dirs))
                .await
                .map_err(|e| UploadError::Io(io::Error::other(e)))?
                .map_err(UploadError::Directories)?;
        }
    }

    // Watchers learn from the temporary file's name which events E2B's in-place write would
    // have caused (see `fs::upload_temp`). Writing the file's metadata also removes what the
    // replaced file had, as E2B's envd removes stale metadata.
    let kind = UploadKind {
        creates: existing.is_none(),
        sets_metadata: !metadata.is_empty()
            || (existing.is_some() && !xattr::read_metadata(&target).is_empty()),
    };
    let temp = temp_path_for(&target, kind);
    let mut guard = TempFileGuard(Some(temp.clone()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_CLOEXEC)
        .open(&temp)
        .map_err(UploadError::from_write)?;
    // The body is read on the async side and written by one blocking thread, so disk writes
    // overlap with receiving and no write waits on a task hand-off.
    let (chunks, mut pending) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let mut file = file;
        while let Some(chunk) = pending.blocking_recv() {
            std::io::Write::write_all(&mut file, &chunk)?;
        }
        // No fsync: the rename already makes the upload atomic for every reader, and a sandbox
        // never outlives a crash of its VM (its disk is discarded; a pause snapshots memory,
        // page cache included). Syncing 256 MiB cost a third of the upload rate here.
        Ok(())
    });
    let received = async {
        loop {
            let mut buffer = vec![0u8; TRANSFER_CHUNK];
            let mut filled = 0;
            // Fill whole chunks: fewer, larger writes.
            while filled < TRANSFER_CHUNK {
                let read = body.read(&mut buffer[filled..]).await?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled == 0 {
                return Ok(());
            }
            buffer.truncate(filled);
            let last = filled < TRANSFER_CHUNK;
            if chunks.send(buffer).await.is_err() {
                // The writer stopped: its error is reported below.
                return Ok(());
            }
            if last {
                return Ok(());
            }
        }
    }
    .await;
    drop(chunks);
    let written = writer
        .await
        .map_err(|e| UploadError::Io(io::Error::other(e)))?;
    received.map_err(UploadError::Body)?;
    written.map_err(UploadError::from_write)?;

    let mode = existing.as_ref().map(|m| m.mode() & 0o7777);
    let (uid, gid) = (user.uid, user.gid);
    let final_temp = temp.clone();
    let metadata = metadata.to_vec();
    let finished_target = target.clone();
    tokio::task::spawn_blocking(move || -> Result<(), UploadError> {
        if let Some(mode) = mode {
            std::fs::set_permissions(&final_temp, std::fs::Permissions::from_mode(mode)).map_err(UploadError::Io)?;
        }
        std::os::unix::fs::chown(&final_temp, Some(uid), Some(gid)).map_err(UploadError::Io)?;
        for (key, value) in &metadata {
            match xattr::write_entry(&final_temp, key, value) {
                Ok(()) => {}
                Err(error) if matches!(error.raw_os_error(), Some(libc::ENOTSUP)) => {
                    tracing::warn!(path = %finished_target.display(), "filesystem has no user xattrs: metadata not stored");
                    break;
                }
                Err(error) if is_no_space(&error) => return Err(UploadError::NoSpace),
                Err(error) => return Err(UploadError::Metadata(error)),
            }
        }
        std::fs::rename(&final_temp, &finished_target).map_err(UploadError::from_write)
    })
    .await
    .map_err(|e| UploadError::Io(io::Error::other(e)))??;
    guard.0 = None;

    Ok(UploadedFile {
        metadata: xattr::read_metadata(&target),
        name: target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        path: target.to_string_lossy().into_owned(),
        r#type: "file",
    })
}

fn body_reader(body: Body) -> impl AsyncRead + Unpin + Send {
    StreamReader::new(body.into_data_stream().map_err(io::Error::other))
}

pub(crate) async fn upload(
    State(envd): State<Arc<Envd>>,
    Query(query): Query<FilesQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let grant = match authorize(&envd, &headers, &query, Operation::Write) {
        Ok(grant) => grant,
        Err(response) => return response,
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let gzip = match encoding.as_str() {
        "" | "identity" => false,
        "gzip" => true,
        other => {
            // Refusals read the (bounded) body first, so the client sees the answer rather
            // than a broken pipe while it is still sending.
            crate::http::drain_body(body).await;
            return json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "error decompressing request body: unsupported Content-Encoding: {other}, supported: [gzip]"
                ),
            );
        }
    };
    let user = match files_user(&envd, &headers, &query, grant) {
        Ok(user) => user,
        Err(response) => {
            crate::http::drain_body(body).await;
            return response;
        }
    };
    let metadata = match metadata_from_headers(&headers) {
        Ok(metadata) => metadata,
        Err(error) => {
            crate::http::drain_body(body).await;
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("invalid metadata: {error}"),
            );
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();

    let mut reader: Box<dyn AsyncRead + Unpin + Send> = if gzip {
        Box::new(async_compression::tokio::bufread::GzipDecoder::new(
            BufReader::with_capacity(TRANSFER_CHUNK, body_reader(body)),
        ))
    } else {
        Box::new(body_reader(body))
    };

    let result = if media_type == "application/octet-stream" {
        upload_raw(&envd, &query, &user, reader, &metadata).await
    } else if media_type.starts_with("multipart/") {
        let uploaded =
            upload_multipart(&envd, &query, &user, &content_type, &mut reader, &metadata).await;
        if uploaded.is_err() {
            // A part failed before the body's end: read the rest, so the client still sending
            // it gets this answer, not a broken pipe.
            drain_bounded(&mut reader).await;
        }
        uploaded
    } else {
        drain_bounded(&mut reader).await;
        Err(json_error(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported content type: {content_type}, expected multipart/form-data or application/octet-stream"
            ),
        ))
    };
    match result {
        Ok(files) => (StatusCode::OK, axum::Json(files)).into_response(),
        Err(response) => response,
    }
}

/// Reads and drops the rest of a request body (at most 1 MiB, for at most 2 s), so that an
/// error answered before the body's end reaches a client that is still sending it.
async fn drain_bounded(reader: &mut (dyn AsyncRead + Unpin + Send)) {
    let mut limited = reader.take(1024 * 1024);
    let mut sink = tokio::io::sink();
    let drained = tokio::io::copy(&mut limited, &mut sink);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drained).await;
}

fn upload_failure(error: UploadError) -> Response {
    json_error(error.status(), error.to_string())
}

async fn upload_raw(
    envd: &Envd,
    query: &FilesQuery,
    user: &User,
    reader: Box<dyn AsyncRead + Unpin + Send>,
    metadata: &[(String, String)],
) -> Result<Vec<UploadedFile>, Response> {
    let Some(raw_path) = query.path.as_deref().filter(|p| !p.is_empty()) else {
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            "path query parameter is required for raw body upload",
        ));
    };
    let path = resolve(envd, raw_path, user)?;
    let file = write_file(&path, user, reader, metadata)
        .await
        .map_err(upload_failure)?;
    Ok(vec![file])
}

async fn upload_multipart(
    envd: &Envd,
    query: &FilesQuery,
    user: &User,
    content_type: &str,
    reader: &mut (dyn AsyncRead + Unpin + Send),
    metadata: &[(String, String)],
) -> Result<Vec<UploadedFile>, Response> {
    let boundary = multer::parse_boundary(content_type).map_err(|error| {
        json_error(
            StatusCode::BAD_REQUEST,
            format!("error parsing multipart form: {error}"),
        )
    })?;
    let mut multipart = multer::Multipart::new(
        ReaderStream::with_capacity(reader, TRANSFER_CHUNK),
        boundary,
    );
    let mut uploaded = Vec::new();
    let mut destinations = HashSet::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(error) => {
                return Err(json_error(
                    StatusCode::BAD_REQUEST,
                    format!("error reading form: {error}"),
                ));
            }
        };
        if field.name() != Some("file") {
            continue;
        }
        let raw_path = match (
            query.path.as_deref().filter(|p| !p.is_empty()),
            field.file_name(),
        ) {
            (Some(path), _) => path.to_owned(),
            (None, Some(name)) => name.to_owned(),
            (None, None) => {
                return Err(json_error(
                    StatusCode::BAD_REQUEST,
                    "error getting multipart custom part file name: filename not found in Content-Disposition header",
                ));
            }
        };
        let path = resolve(envd, &raw_path, user)?;
        if !destinations.insert(path.clone()) {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "you cannot upload multiple files to the same path '{}' in one upload request, only the first specified file was uploaded",
                    path.display()
                ),
            ));
        }
        let part = StreamReader::new(field.map_err(io::Error::other));
        uploaded.push(
            write_file(&path, user, part, metadata)
                .await
                .map_err(upload_failure)?,
        );
    }
    Ok(uploaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coding_negotiation() {
        assert_eq!(negotiate_coding(None), Ok(Coding::Identity));
        assert_eq!(negotiate_coding(Some("gzip")), Ok(Coding::Gzip));
        assert_eq!(
            negotiate_coding(Some("gzip, deflate, br")),
            Ok(Coding::Gzip)
        );
        assert_eq!(negotiate_coding(Some("gzip;q=0")), Ok(Coding::Identity));
        assert_eq!(negotiate_coding(Some("identity")), Ok(Coding::Identity));
        assert_eq!(negotiate_coding(Some("br")), Ok(Coding::Identity));
        assert_eq!(
            negotiate_coding(Some("br, identity;q=0")),
            Err(NotAcceptable)
        );
        assert_eq!(negotiate_coding(Some("*;q=0")), Err(NotAcceptable));
        assert_eq!(
            negotiate_coding(Some("identity;q=0.5, gzip;q=0.9")),
            Ok(Coding::Gzip)
        );
        assert_eq!(negotiate_coding(Some("*, identity;q=0")), Ok(Coding::Gzip));
    }

    #[test]
    fn dispositions() {
        assert_eq!(content_disposition("a.txt"), "inline; filename=a.txt");
        assert_eq!(
            content_disposition("my file.txt"),
            "inline; filename=\"my file.txt\""
        );
        assert_eq!(
            content_disposition("\u{20ac}.txt"),
            "inline; filename*=utf-8''%E2%82%AC.txt"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Ok(Some((0, 4))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Err(Unsatisfiable));
    }

    #[test]
    fn metadata_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-metadata-owner", HeaderValue::from_static("team-a"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(
            metadata_from_headers(&headers).unwrap(),
            vec![("owner".to_owned(), "team-a".to_owned())]
        );
        headers.insert("x-metadata-bad", HeaderValue::from_static("tab\there"));
        assert!(metadata_from_headers(&headers).is_err());
    }
}
