//! How a channel's event is sent: its payload by kind ([`payload`]), the HTTP POST with its
//! signature headers and deadline ([`Sender`]), and the guard against channels aimed inside
//! the control plane's network ([`check_url`], and a resolver that keeps only public
//! addresses): a team must not make the control plane call its own loopback, a private
//! network or a cloud's metadata address, neither at create nor later by changing its DNS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use wrenn_http::client::reqwest;

use super::secrets::{self, SecretBox};
use super::{ChannelKind, ChannelPolicy};
use crate::store::{ChannelRow, EventRow};

/// The most of a refusing receiver's answer kept in the delivery log.
const ANSWER_KEPT: usize = 200;

/// Why an attempt failed: the receiver's status (0: no answer), what happened, and whether
/// trying again cannot help (a secret that no longer opens, a URL now refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub error: String,
    pub permanent: bool,
}

impl Failure {
    /// A failure no retry mends.
    pub fn permanent(error: impl Into<String>) -> Self {
        Failure {
            status: 0,
            error: error.into(),
            permanent: true,
        }
    }

    fn retried(status: u16, error: impl Into<String>) -> Self {
        Failure {
            status,
            error: error.into(),
            permanent: false,
        }
    }
}

/// An event's time as RFC 3339 (UTC, milliseconds).
fn rfc3339(at_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// One readable line of an event, for chat channels.
pub fn summary(event: &EventRow) -> String {
    let at = rfc3339(event.at_ms);
    if event.kind == crate::events::EventKind::ChannelTest.as_str() {
        return format!("wrenn: a test of this channel ({at}, by {})", event.actor);
    }
    format!(
        "wrenn: {} {} (team {}, by {}, at {at})",
        event.kind, event.subject, event.team_id, event.actor
    )
}

/// What a channel of `kind` is sent for `event`.
pub fn payload(kind: ChannelKind, event: &EventRow) -> serde_json::Value {
    match kind {
        ChannelKind::Webhook => serde_json::json!({
            "id": event.id,
            "seq": event.seq,
            "type": event.kind,
            "at": rfc3339(event.at_ms),
            "team": event.team_id,
            "actor": event.actor,
            "subject": event.subject,
            "data": event.data,
        }),
        ChannelKind::Slack => serde_json::json!({ "text": summary(event) }),
        ChannelKind::Discord => serde_json::json!({ "content": summary(event) }),
    }
}

/// Whether `address` is on the internet: not loopback, private, link-local (cloud metadata),
/// shared (CGNAT), multicast, documentation or unspecified.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                // Ranges that carry an IPv4 address (NAT64, 6to4, Teredo): refused whole.
                || (first == 0x0064 && v6.segments()[1] == 0xff9b)
                || first == 0x2002
                || (first == 0x2001 && v6.segments()[1] == 0))
        }
    }
}

/// `url` parsed, if a channel may use it: `http` or `https` with a host, whose address (a
/// literal one here; a name's at [`check_url`] and in the resolver) is public unless the
/// policy allows private ones.
fn parse_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|error| format!("{url:?} is not a URL: {error}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "a channel's URL is http or https, not {}",
            parsed.scheme()
        ));
    }
    let host = parsed.host_str().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = literal.parse::<IpAddr>()
        && !allow_private
        && !is_public(address)
    {
        return Err(format!(
            "{address} is not a public address: channels may not call this network"
        ));
    }
    Ok(parsed)
}

/// Refuses a channel URL (at create and change): a scheme but http(s), or a host that is or
/// resolves to a non-public address (unless the policy allows private ones).
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let parsed = parse_url(url, allow_private)?;
    if allow_private {
        return Ok(());
    }
    let host = parsed.host_str().unwrap_or_default();
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| format!("{host} does not resolve: {error}"))?
        .collect();
    if let Some(private) = addresses.iter().find(|address| !is_public(address.ip())) {
        return Err(format!(
            "{host} resolves to {}, not a public address: channels may not call this network",
            private.ip()
        ));
    }
    Ok(())
}

/// Resolves names to their public addresses only (all, when private ones are allowed): the
/// check at delivery, since a name's addresses may change after the channel was made.
struct PublicResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let kept: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|address| allow_private || is_public(address.ip()))
                .collect();
            if kept.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves to no public address").into();
                return Err(error);
            }
            let addresses: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addresses)
        })
    }
}

/// The HTTP client of deliveries: HTTPS checked against the system's authorities, no
/// redirects (one could lead to a private address), names resolved to public addresses only.
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
}

impl Sender {
    pub fn new(policy: &ChannelPolicy) -> Result<Self, String> {
        let http = wrenn_http::client::internet_client_builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(PublicResolver {
                allow_private: policy.allow_private,
            }))
            .user_agent("wrenn-channels")
            .build()
            .map_err(|error| wrenn_http::client::describe(&error))?;
        Ok(Sender { http })
    }

    /// Sends `event` to `channel` once: the receiver's 2xx status, or why not.
    pub async fn send(
        &self,
        channel: &ChannelRow,
        event: &EventRow,
        secrets: &SecretBox,
        policy: &ChannelPolicy,
    ) -> Result<u16, Failure> {
        let kind = ChannelKind::from_name(&channel.kind)
            .ok_or_else(|| Failure::permanent(format!("unknown channel kind {}", channel.kind)))?;
        let url = secrets
            .open(&channel.url_sealed)
            .map_err(|error| Failure::permanent(error.to_string()))?;
        let url = parse_url(&url, policy.allow_private).map_err(Failure::permanent)?;
        let body = payload(kind, event).to_string();
        let mut request = self
            .http
            .post(url)
            .timeout(policy.timeout)
            .header("content-type", "application/json");
        if kind == ChannelKind::Webhook && !channel.secret_sealed.is_empty() {
            let secret = secrets
                .open(&channel.secret_sealed)
                .map_err(|error| Failure::permanent(error.to_string()))?;
            let timestamp = wrenn_core::now_ms() / 1000;
            let signature = secrets::sign(&secret, &event.id, timestamp, body.as_bytes())
                .map_err(|error| Failure::permanent(error.to_string()))?;
            request = request
                .header("webhook-id", &event.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        }
        let response = request.body(body).send().await.map_err(|error| {
            // Never the URL: a chat webhook's URL is its credential.
            Failure::retried(0, wrenn_http::client::describe(&error.without_url()))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let answer = wrenn_http::client::read_bounded(response, 64 * 1024)
            .await
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let answer: String = answer.chars().take(ANSWER_KEPT).collect();
        Err(Failure::retried(
            status.as_u16(),
            format!("the receiver answered {status}: {}", answer.trim()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> EventRow {
        EventRow {
            seq: 7,
            id: "e1".into(),
            at_ms: 1_700_000_000_123,
            team_id: "t1".into(),
            actor: "key:k1".into(),
            kind: "sandbox.created".into(),
            subject: "sb1".into(),
            data: serde_json::json!({ "template": "base" }),
        }
    }

    #[test]
    fn payloads_have_each_kinds_shape() {
        let webhook = payload(ChannelKind::Webhook, &event());
        assert_eq!(
            webhook,
            serde_json::json!({
                "id": "e1", "seq": 7, "type": "sandbox.created", "at": "2023-11-14T22:13:20.123Z",
                "team": "t1", "actor": "key:k1", "subject": "sb1", "data": { "template": "base" },
            })
        );
        let slack = payload(ChannelKind::Slack, &event());
        let text = slack["text"].as_str().unwrap();
        assert!(text.contains("sandbox.created sb1"), "{text}");
        assert_eq!(slack.as_object().unwrap().len(), 1);
        let discord = payload(ChannelKind::Discord, &event());
        assert_eq!(discord["content"].as_str(), Some(text));
        assert_eq!(discord.as_object().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn private_and_odd_urls_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/hook",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://localhost:9/",
        ] {
            let error = check_url(url, false).await.unwrap_err();
            assert!(error.contains("not a public address"), "{url}: {error}");
            check_url(url, true).await.unwrap();
        }
        for url in ["ftp://example.com/", "not a url", "file:///etc/passwd"] {
            assert!(check_url(url, true).await.is_err(), "{url}");
        }
        check_url("https://93.184.215.14/hook", false)
            .await
            .unwrap();
        assert!(is_public("8.8.8.8".parse().unwrap()));
        assert!(!is_public("100.64.0.1".parse().unwrap()));
        assert!(!is_public("::ffff:10.0.0.1".parse().unwrap()));
        for refused in [
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:0:4136::1",
            "fec0::1",
            "192.0.0.8",
        ] {
            assert!(!is_public(refused.parse().unwrap()), "{refused}");
        }
        assert!(is_public("2606:4700::1111".parse().unwrap()));
    }
}
