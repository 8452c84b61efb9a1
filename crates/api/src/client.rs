//! A typed client of wrenn's REST API: one method per route the CLI, the benchmarks and the tests
//! use, taking and returning the types of this crate. [`Client::send`] is the raw call under them
//! all, for callers that probe the API's refusals (tests) or time it (benchmarks).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wrenn_http::client::{BodyError, ClientOptions, describe, read_bounded, reqwest};

use crate::TemplateFilesUpload;
use crate::{
    AssignTags, AssignedTags, ForgottenHost, Hosts, ListedSandbox, NewSandbox, RemoveTags, Sandbox,
    SandboxDetail, SandboxState, Template, TemplateBuildInfo, TemplateBuildRequest,
    TemplateBuildRequested, TemplateBuildStart, TemplateTag, TimeoutRequest,
};
use crate::{AuditLog, CreatedTeamApiKey, Events, NewTeamApiKey, TeamApiKey, UpdateTeamApiKey};
use crate::{SandboxLogsV2, SandboxMetric, TeamUsage};

/// The largest answer read: 16 MiB.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;
/// How long a call may take by default: a create may wait for a VM to boot.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url:?}: use http://host:port")]
    InvalidUrl { url: String },
    #[error("{method} {url}: {reason}")]
    Unreachable {
        method: Method,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: no answer within {} s", .deadline.as_secs())]
    TimedOut {
        method: Method,
        url: String,
        deadline: Duration,
    },
    #[error("{method} {path}: {status} ({message})")]
    Refused {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{method} {path}: the answer is not what the API documents: {reason}")]
    Unexpected {
        method: Method,
        path: String,
        reason: String,
    },
    #[error("{method} {path}: {source}")]
    Body {
        method: Method,
        path: String,
        #[source]
        source: BodyError,
    },
}

impl ClientError {
    /// The status of an answer that refused the call.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A whole answer, as [`Client::send`] returns it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON: `null` when empty, a JSON string of the text when not JSON.
    pub fn json(&self) -> serde_json::Value {
        if self.body.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| serde_json::Value::String(self.text()))
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Which sandboxes a listing returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Empty: every state.
    pub states: Vec<SandboxState>,
    /// Sandboxes whose metadata has all of these.
    pub metadata: BTreeMap<String, String>,
}

/// One page of a listing and the token of the next.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

/// A client of one control plane, calling as the team of one API key.
#[derive(Debug, Clone)]
pub struct Client {
    base_url: String,
    api_key: Option<String>,
    deadline: Duration,
    http: reqwest::Client,
}

impl Client {
    /// A client of the API at `base_url` (`http://host:port`), with `api_key` if given.
    pub fn new(base_url: &str, api_key: Option<&str>) -> Result<Client, ClientError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        if !base_url.starts_with("http://") || base_url.len() == "http://".len() {
            return Err(ClientError::InvalidUrl { url: base_url });
        }
        Ok(Client {
            base_url,
            api_key: api_key.map(str::to_string),
            deadline: DEFAULT_DEADLINE,
            http: wrenn_http::client::client(ClientOptions::default()),
        })
    }

    /// The same client, giving up on a call not answered within `deadline`.
    pub fn with_deadline(mut self, deadline: Duration) -> Client {
        self.deadline = deadline;
        self
    }

    /// The same client with another API key (none: unauthenticated).
    pub fn with_api_key(&self, api_key: Option<&str>) -> Client {
        Client {
            api_key: api_key.map(str::to_string),
            ..self.clone()
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// One call: `path` (with its query) under the base URL, `body` sent as JSON when given.
    /// Any answer, refusals too, is returned whole; only a call with no answer is an error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .timeout(self.deadline)
            .headers(headers.clone());
        if let Some(key) = &self.api_key
            && !headers.contains_key("x-api-key")
        {
            request = request.header("x-api-key", key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|error| {
            if error.is_timeout() {
                ClientError::TimedOut {
                    method: method.clone(),
                    url: url.clone(),
                    deadline: self.deadline,
                }
            } else {
                ClientError::Unreachable {
                    method: method.clone(),
                    url: url.clone(),
                    reason: describe(&error),
                }
            }
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body =
            read_bounded(response, MAX_ANSWER_BYTES)
                .await
                .map_err(|source| match source {
                    BodyError::Broken(error) if error.is_timeout() => ClientError::TimedOut {
                        method: method.clone(),
                        url: url.clone(),
                        deadline: self.deadline,
                    },
                    source => ClientError::Body {
                        method: method.clone(),
                        path: path.to_string(),
                        source,
                    },
                })?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// A call whose answer must be a 2xx: the answer, else [`ClientError::Refused`] with the
    /// API's message.
    async fn expect_success(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Answer, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|error| ClientError::Unexpected {
                method: method.clone(),
                path: path.to_string(),
                reason: format!("the request does not serialise: {error}"),
            })?
            .map(Bytes::from);
        let answer = self
            .send(method.clone(), path, &HeaderMap::new(), body)
            .await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        let message = serde_json::from_slice::<crate::Error>(&answer.body)
            .map(|error| error.message)
            .unwrap_or_else(|_| answer.text());
        Err(ClientError::Refused {
            method,
            path: path.to_string(),
            status: answer.status,
            message,
        })
    }

    /// A call whose 2xx answer is a `T`.
    async fn fetch<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let answer = self.expect_success(method.clone(), path, body).await?;
        serde_json::from_slice(&answer.body).map_err(|error| ClientError::Unexpected {
            method,
            path: path.to_string(),
            reason: error.to_string(),
        })
    }

    /// `POST /sandboxes`.
    pub async fn create_sandbox(&self, new: &NewSandbox) -> Result<Sandbox, ClientError> {
        self.fetch(Method::POST, "/sandboxes", Some(new)).await
    }

    /// `GET /sandboxes/{id}`.
    pub async fn sandbox(&self, id: &str) -> Result<SandboxDetail, ClientError> {
        self.fetch(Method::GET, &format!("/sandboxes/{}", segment(id)), NO_BODY)
            .await
    }

    /// One page of `GET /v2/sandboxes`, newest first.
    pub async fn list_page(
        &self,
        filter: &ListFilter,
        limit: u32,
        next_token: Option<&str>,
    ) -> Result<Page<ListedSandbox>, ClientError> {
        let mut query = vec![format!("limit={limit}")];
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            query.push(format!("state={}", segment(&states.join(","))));
        }
        if !filter.metadata.is_empty() {
            let pairs: Vec<String> = filter
                .metadata
                .iter()
                .map(|(k, v)| format!("{}={}", segment(k), segment(v)))
                .collect();
            query.push(format!("metadata={}", segment(&pairs.join("&"))));
        }
        if let Some(token) = next_token {
            query.push(format!("nextToken={}", segment(token)));
        }
        let path = format!("/v2/sandboxes?{}", query.join("&"));
        let answer = self.expect_success(Method::GET, &path, NO_BODY).await?;
        let items =
            serde_json::from_slice(&answer.body).map_err(|error| ClientError::Unexpected {
                method: Method::GET,
                path: path.clone(),
                reason: error.to_string(),
            })?;
        Ok(Page {
            items,
            next_token: answer.header("x-next-token").map(str::to_string),
        })
    }

    /// Every sandbox `filter` selects, page by page.
    pub async fn list_all(&self, filter: &ListFilter) -> Result<Vec<ListedSandbox>, ClientError> {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self.list_page(filter, 100, next.as_deref()).await?;
            all.extend(page.items);
            match page.next_token {
                Some(token) => next = Some(token),
                None => return Ok(all),
            }
        }
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill(&self, id: &str) -> Result<(), ClientError> {
        self.expect_success(
            Method::DELETE,
            &format!("/sandboxes/{}", segment(id)),
            NO_BODY,
        )
        .await
        .map(drop)
    }

    /// `POST /sandboxes/{id}/pause`: with its memory, or (`memory` false) its disk alone.
    pub async fn pause(&self, id: &str, memory: bool) -> Result<(), ClientError> {
        let path = format!("/sandboxes/{}/pause", segment(id));
        let body = crate::PauseRequest {
            memory: (!memory).then_some(false),
            ..crate::PauseRequest::default()
        };
        self.expect_success(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    /// `POST /sandboxes/{id}/snapshots`: a persistent snapshot of a running sandbox.
    pub async fn create_snapshot(
        &self,
        id: &str,
        name: Option<String>,
    ) -> Result<crate::SnapshotInfo, ClientError> {
        let path = format!("/sandboxes/{}/snapshots", segment(id));
        let body = crate::SnapshotRequest { name, memory: None };
        self.fetch(Method::POST, &path, Some(&body)).await
    }

    /// `GET /snapshots`, every page: the team's snapshots, of one sandbox if given.
    pub async fn snapshots(
        &self,
        sandbox_id: Option<&str>,
    ) -> Result<Vec<crate::SnapshotInfo>, ClientError> {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_string())];
            if let Some(id) = sandbox_id {
                query.push(("sandboxID", id.to_string()));
            }
            if let Some(token) = &next {
                query.push(("nextToken", token.clone()));
            }
            let query: Vec<String> = query
                .iter()
                .map(|(name, value)| format!("{name}={}", segment(value)))
                .collect();
            let path = format!("/snapshots?{}", query.join("&"));
            let answer = self.expect_success(Method::GET, &path, NO_BODY).await?;
            let page: Vec<crate::SnapshotInfo> =
                serde_json::from_slice(&answer.body).map_err(|error| ClientError::Unexpected {
                    method: Method::GET,
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            all.extend(page);
            let token = answer.header("x-next-token").map(str::to_string);
            match token {
                Some(token) => next = Some(token),
                None => return Ok(all),
            }
        }
    }

    /// `POST /sandboxes/{id}/fork`: `count` forks, each living `timeout` seconds.
    pub async fn fork(
        &self,
        id: &str,
        count: u32,
        timeout: Option<u64>,
    ) -> Result<Vec<crate::ForkResult>, ClientError> {
        let path = format!("/sandboxes/{}/fork", segment(id));
        let body = crate::ForkRequest {
            timeout,
            count: Some(count),
        };
        self.fetch(Method::POST, &path, Some(&body)).await
    }

    /// `POST /sandboxes/{id}/resume`, with a new timeout in seconds if given.
    pub async fn resume(&self, id: &str, timeout: Option<u64>) -> Result<Sandbox, ClientError> {
        let body = TimeoutRequest {
            timeout,
            ..TimeoutRequest::default()
        };
        let path = format!("/sandboxes/{}/resume", segment(id));
        self.fetch(Method::POST, &path, Some(&body)).await
    }

    /// `POST /sandboxes/{id}/resume` booting the sandbox from its disk (its pause's memory
    /// left aside).
    pub async fn resume_from_disk(
        &self,
        id: &str,
        timeout: Option<u64>,
    ) -> Result<Sandbox, ClientError> {
        let body = TimeoutRequest {
            timeout,
            memory: Some(false),
            ..TimeoutRequest::default()
        };
        let path = format!("/sandboxes/{}/resume", segment(id));
        self.fetch(Method::POST, &path, Some(&body)).await
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox ends `seconds` from now.
    pub async fn set_timeout(&self, id: &str, seconds: u64) -> Result<(), ClientError> {
        let body = TimeoutRequest {
            timeout: Some(seconds),
            ..TimeoutRequest::default()
        };
        let path = format!("/sandboxes/{}/timeout", segment(id));
        self.expect_success(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    /// `GET /templates`.
    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        self.fetch(Method::GET, "/templates", NO_BODY).await
    }

    /// `POST /v3/templates`: a template of that name (the team's own, or a new one) and a
    /// build of it to start.
    pub async fn request_build(
        &self,
        request: &TemplateBuildRequest,
    ) -> Result<TemplateBuildRequested, ClientError> {
        self.fetch(Method::POST, "/v3/templates", Some(request))
            .await
    }

    /// `POST /v2/templates/{templateID}/builds/{buildID}`.
    pub async fn start_build(
        &self,
        template_id: &str,
        build_id: &str,
        start: &TemplateBuildStart,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/v2/templates/{}/builds/{}",
            segment(template_id),
            segment(build_id)
        );
        self.expect_success(Method::POST, &path, Some(start))
            .await
            .map(drop)
    }

    /// `GET /templates/{templateID}/builds/{buildID}/status` from the `logs_offset`th line.
    pub async fn build_status(
        &self,
        template_id: &str,
        build_id: &str,
        logs_offset: usize,
    ) -> Result<TemplateBuildInfo, ClientError> {
        let path = format!(
            "/templates/{}/builds/{}/status?logsOffset={logs_offset}&limit=100",
            segment(template_id),
            segment(build_id)
        );
        self.fetch(Method::GET, &path, NO_BODY).await
    }

    /// `GET /templates/{templateID}/files/{hash}`: whether a COPY step's files are there, and
    /// if not, the link to upload them to.
    pub async fn template_files(
        &self,
        template_id: &str,
        hash: &str,
    ) -> Result<TemplateFilesUpload, ClientError> {
        let path = format!(
            "/templates/{}/files/{}",
            segment(template_id),
            segment(hash)
        );
        self.fetch(Method::GET, &path, NO_BODY).await
    }

    /// `PUT`s a COPY step's files to the upload link `url` gave (no key: the link authorises
    /// itself).
    pub async fn upload_files(&self, url: &str, tar: Bytes) -> Result<(), ClientError> {
        let method = Method::PUT;
        let response = self
            .http
            .put(url)
            .timeout(self.deadline)
            .header("content-type", "application/octet-stream")
            .body(tar)
            .send()
            .await
            .map_err(|error| ClientError::Unreachable {
                method: method.clone(),
                url: url.to_string(),
                reason: describe(&error),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = read_bounded(response, MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<crate::Error>(&body)
            .map(|error| error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(ClientError::Refused {
            method,
            path: url.to_string(),
            status,
            message,
        })
    }

    /// `DELETE /templates/{templateID}`.
    pub async fn delete_template(&self, template: &str) -> Result<(), ClientError> {
        let path = format!("/templates/{}", segment(template));
        self.expect_success(Method::DELETE, &path, NO_BODY)
            .await
            .map(drop)
    }

    /// `GET /templates/{templateID}/tags`.
    pub async fn template_tags(&self, template: &str) -> Result<Vec<TemplateTag>, ClientError> {
        let path = format!("/templates/{}/tags", segment(template));
        self.fetch(Method::GET, &path, NO_BODY).await
    }

    /// `POST /templates/tags`.
    pub async fn assign_tags(&self, request: &AssignTags) -> Result<AssignedTags, ClientError> {
        self.fetch(Method::POST, "/templates/tags", Some(request))
            .await
    }

    /// `DELETE /templates/tags`.
    pub async fn remove_tags(&self, request: &RemoveTags) -> Result<(), ClientError> {
        self.expect_success(Method::DELETE, "/templates/tags", Some(request))
            .await
            .map(drop)
    }

    /// `GET /v2/sandboxes/{id}/logs` with its query (already encoded by [`query`]).
    pub async fn sandbox_logs(&self, id: &str, query: &str) -> Result<SandboxLogsV2, ClientError> {
        self.fetch(
            Method::GET,
            &format!("/v2/sandboxes/{id}/logs?{query}"),
            NO_BODY,
        )
        .await
    }

    /// `GET /sandboxes/{id}/metrics` with its query (`start=…&end=…`, Unix seconds).
    pub async fn sandbox_metrics(
        &self,
        id: &str,
        query: &str,
    ) -> Result<Vec<SandboxMetric>, ClientError> {
        self.fetch(
            Method::GET,
            &format!("/sandboxes/{id}/metrics?{query}"),
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/usage` with its query (`start=…&end=…`, days).
    pub async fn usage(&self, query: &str) -> Result<TeamUsage, ClientError> {
        self.fetch(Method::GET, &format!("/v1/usage?{query}"), NO_BODY)
            .await
    }

    /// `GET /hosts`.
    pub async fn hosts(&self) -> Result<Hosts, ClientError> {
        self.fetch(Method::GET, "/hosts", NO_BODY).await
    }

    /// `GET /v1/audit` with its query (`after=…&limit=…`, already encoded by [`query`]).
    pub async fn audit(&self, query: &str) -> Result<AuditLog, ClientError> {
        self.fetch(Method::GET, &format!("/v1/audit?{query}"), NO_BODY)
            .await
    }

    /// `GET /v1/events` with its query (already encoded by [`query`]).
    pub async fn events(&self, query: &str) -> Result<Events, ClientError> {
        self.fetch(Method::GET, &format!("/v1/events?{query}"), NO_BODY)
            .await
    }

    /// `GET /api-keys`.
    pub async fn api_keys(&self) -> Result<Vec<TeamApiKey>, ClientError> {
        self.fetch(Method::GET, "/api-keys", NO_BODY).await
    }

    /// `POST /api-keys`.
    pub async fn create_api_key(
        &self,
        new: &NewTeamApiKey,
    ) -> Result<CreatedTeamApiKey, ClientError> {
        self.fetch(Method::POST, "/api-keys", Some(new)).await
    }

    /// `PATCH /api-keys/{apiKeyID}`.
    pub async fn rename_api_key(&self, id: &str, name: &str) -> Result<(), ClientError> {
        let body = UpdateTeamApiKey {
            name: name.to_string(),
        };
        self.expect_success(
            Method::PATCH,
            &format!("/api-keys/{}", segment(id)),
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// `DELETE /api-keys/{apiKeyID}`.
    pub async fn revoke_api_key(&self, id: &str) -> Result<(), ClientError> {
        self.expect_success(
            Method::DELETE,
            &format!("/api-keys/{}", segment(id)),
            NO_BODY,
        )
        .await
        .map(drop)
    }

    /// `DELETE /hosts/{name}`.
    pub async fn forget_host(&self, name: &str) -> Result<ForgottenHost, ClientError> {
        self.fetch(
            Method::DELETE,
            &format!("/hosts/{}", segment(name)),
            NO_BODY,
        )
        .await
    }
}

/// A query string of `pairs` (those with a value), each value encoded.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(name, value)| {
            value
                .as_ref()
                .map(|value| format!("{name}={}", segment(value)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// No request body (a typed `None` for the generic helpers).
const NO_BODY: Option<&()> = None;

/// `text` percent-encoded for a path segment or a query value.
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_taken() {
        assert!(Client::new("http://127.0.0.1:3000/", None).is_ok());
        for url in ["https://x:1", "127.0.0.1:3000", "http://", "ftp://x"] {
            assert!(
                matches!(Client::new(url, None), Err(ClientError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn path_segments_and_query_values_are_encoded() {
        assert_eq!(segment("a b/c&d=e"), "a%20b%2Fc%26d%3De");
        assert_eq!(segment("plain-id"), "plain%2Did");
    }

    #[test]
    fn an_empty_or_unparsable_answer_reads_as_null_or_text() {
        let answer = |body: &'static [u8]| Answer {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body),
        };
        assert_eq!(answer(b"").json(), serde_json::Value::Null);
        assert_eq!(answer(b"oops").json(), serde_json::json!("oops"));
        assert_eq!(answer(br#"{"a":1}"#).json(), serde_json::json!({"a": 1}));
    }
}
