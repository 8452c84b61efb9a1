//! `wrenn sandbox cp`: a file into or out of a sandbox, streamed through the edge proxy to envd's
//! `/files` route (as the SDKs upload and download). A download is written beside its target and
//! renamed, so an interrupted copy leaves no half file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use wrenn_http::client::{ClientOptions, describe, read_bounded, reqwest};

use crate::connection::Connection;

/// The most of an error answer shown.
const MAX_ERROR_ANSWER: usize = 64 * 1024;

/// `ID:/path` → (ID, /path).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) && path.starts_with('/'))
        .then_some((id, path))
}

fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A request to envd's `/files` in sandbox `id`, through the proxy.
async fn files_request(
    connection: &Connection,
    method: reqwest::Method,
    id: &str,
    path: &str,
    user: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let token = connection.access_token(id).await?;
    let http = wrenn_http::client::client(ClientOptions {
        connect_timeout: Some(Duration::from_secs(10)),
        keep_idle: false,
        http2_prior_knowledge: false,
    });
    let url = format!(
        "http://{}/files?path={}&username={}",
        connection.proxy_authority()?,
        percent_encode(path),
        percent_encode(user)
    );
    let mut request = http
        .request(method, url)
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", wrenn_proto::ENVD_PORT);
    if let Some(token) = token {
        request = request.header("x-access-token", token);
    }
    Ok(request)
}

/// The error of a refused transfer, with envd's (or the proxy's) message.
async fn refused(what: &str, response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let answer = read_bounded(response, MAX_ERROR_ANSWER)
        .await
        .map(|body| String::from_utf8_lossy(&body).trim().to_string())
        .unwrap_or_else(|error| error.to_string());
    anyhow::anyhow!("{what}: {status}: {answer}")
}

async fn upload(
    connection: &Connection,
    source: &Path,
    id: &str,
    path: &str,
    user: &str,
) -> anyhow::Result<u64> {
    let file = tokio::fs::File::open(source)
        .await
        .with_context(|| format!("reading {}", source.display()))?;
    let length = file.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    let response = files_request(connection, reqwest::Method::POST, id, path, user)
        .await?
        .header("content-type", "application/octet-stream")
        .header("content-length", length)
        .body(body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("uploading to {id}:{path}: {}", describe(&e)))?;
    if !response.status().is_success() {
        return Err(refused(&format!("uploading to {id}:{path}"), response).await);
    }
    Ok(length)
}

async fn download(
    connection: &Connection,
    id: &str,
    path: &str,
    destination: &str,
    user: &str,
) -> anyhow::Result<(u64, PathBuf)> {
    let mut response = files_request(connection, reqwest::Method::GET, id, path, user)
        .await?
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("downloading {id}:{path}: {}", describe(&e)))?;
    if !response.status().is_success() {
        return Err(refused(&format!("downloading {id}:{path}"), response).await);
    }
    let mut target = PathBuf::from(destination);
    if target.is_dir() {
        target.push(
            Path::new(path)
                .file_name()
                .context("the remote path names no file")?,
        );
    }
    let partial = target.with_file_name(format!(
        ".{}.wrenn-partial",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("writing {}", partial.display()))?;
    let mut bytes = 0u64;
    let outcome: anyhow::Result<()> = async {
        while let Some(data) = response
            .chunk()
            .await
            .map_err(|e| anyhow::anyhow!(describe(&e)))?
        {
            bytes += data.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &data).await?;
        }
        file.sync_all().await?;
        Ok(())
    }
    .await;
    if let Err(error) = outcome {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error.context(format!("downloading {id}:{path}")));
    }
    tokio::fs::rename(&partial, &target).await?;
    Ok((bytes, target))
}

pub async fn copy(
    connection: &Connection,
    source: &str,
    destination: &str,
    user: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (moved, what) = match (remote(source), remote(destination)) {
        (None, Some((id, path))) => {
            let length = upload(connection, Path::new(source), id, path, user).await?;
            (length, format!("{source} → {id}:{path}"))
        }
        (Some((id, path)), None) => {
            let (bytes, target) = download(connection, id, path, destination, user).await?;
            (bytes, format!("{id}:{path} → {}", target.display()))
        }
        _ => bail!(
            "cp copies between this machine and a sandbox: `cp ./file ID:/path` or `cp ID:/path ./file`"
        ),
    };
    let seconds = started.elapsed().as_secs_f64();
    if connection.json {
        println!(
            "{}",
            json!({ "copied": what, "bytes": moved, "seconds": seconds })
        );
    } else {
        println!("{what}: {moved} bytes in {seconds:.2} s");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_name_a_sandbox_and_an_absolute_path() {
        assert_eq!(remote("abc123:/tmp/x"), Some(("abc123", "/tmp/x")));
        assert_eq!(remote("./local"), None);
        assert_eq!(remote("abc:relative"), None);
        assert_eq!(remote("C:/windows"), Some(("C", "/windows")));
    }
}
