//! The process's Prometheus metrics: one registry ([`registry`]) every wrenn crate registers its
//! metrics in (so `wrenn up`, the control plane and an agent in one process, has one
//! `/metrics`), gauges refreshed at each scrape ([`on_scrape`]), the HTTP servers' request
//! counts and latencies by route ([`track_requests`]), and the answer of a `/metrics` route
//! ([`answer`]) in the OpenMetrics text format, which Prometheus scrapes.
//!
//! Who may read it: with a metrics token configured, a caller that sends it as
//! `Authorization: Bearer <token>`; without one, callers on the loopback only (the figures say
//! how busy the fleet is, not for every network to read).

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
pub use prometheus_client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// Labels as name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// The registry and what refreshes its gauges at each scrape.
struct Metrics {
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Arc<dyn Fn() + Send + Sync>>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    registry: Mutex::new(Registry::default()),
    refreshers: Mutex::new(Vec::new()),
});

/// Registers `metric` under `name` (without the `_total` a counter gets) and returns it: keep
/// the returned handle (a clone of the registered one) and update it.
pub fn register<M: Metric + Clone>(name: &str, help: &str, metric: M) -> M {
    METRICS
        .registry
        .lock()
        .expect("metrics lock")
        .register(name, help, metric.clone());
    metric
}

/// Runs `refresh` before every scrape (it sets gauges from the state it reads).
pub fn on_scrape(refresh: impl Fn() + Send + Sync + 'static) {
    METRICS
        .refreshers
        .lock()
        .expect("metrics lock")
        .push(Arc::new(refresh));
}

/// Every metric, refreshed, in the OpenMetrics text format.
pub fn encode() -> String {
    let refreshers: Vec<Arc<dyn Fn() + Send + Sync>> =
        METRICS.refreshers.lock().expect("metrics lock").clone();
    for refresh in refreshers {
        refresh();
    }
    let mut text = String::new();
    let registry = METRICS.registry.lock().expect("metrics lock");
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text = "# EOF\n".into();
    }
    text
}

/// The OpenMetrics text format's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scrape with these headers from `peer` may read the metrics: with a `token`, the
/// caller must send it as a bearer token; without one, it must be on the loopback.
pub fn may_scrape(headers: &HeaderMap, peer: Option<SocketAddr>, token: Option<&str>) -> bool {
    match token {
        Some(token) => headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|given| {
                // Constant time: compare all of both.
                given.len() == token.len()
                    && given
                        .bytes()
                        .zip(token.bytes())
                        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                        == 0
            }),
        None => peer.is_some_and(|peer| peer.ip().is_loopback()),
    }
}

/// A `/metrics` answer: the text when [`may_scrape`], else a 401 or 403 saying why.
pub fn answer(headers: &HeaderMap, peer: Option<SocketAddr>, token: Option<&str>) -> Response {
    if may_scrape(headers, peer, token) {
        return ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], encode()).into_response();
    }
    match token {
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            "the metrics need the metrics token as Authorization: Bearer <token>\n",
        )
            .into_response(),
        None => (
            StatusCode::FORBIDDEN,
            "the metrics are served to the loopback only: set a metrics token to scrape from elsewhere\n",
        )
            .into_response(),
    }
}

/// The request metrics of the HTTP servers.
struct RequestMetrics {
    requests: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

static REQUESTS: LazyLock<RequestMetrics> = LazyLock::new(|| RequestMetrics {
    requests: register(
        "wrenn_http_requests",
        "HTTP requests answered, by server, method, route and status class",
        Family::default(),
    ),
    seconds: register(
        "wrenn_http_request_duration_seconds",
        "Time to the answer's head, by server, method and route",
        Family::new_with_constructor(latency_histogram as fn() -> Histogram),
    ),
});

/// Registers the request metrics now (a scrape before the first request shows them at 0).
pub fn register_request_metrics() {
    LazyLock::force(&REQUESTS);
}

/// An axum middleware counting requests and timing them to their answer's head, labelled by
/// `server`, method and matched route (the route's template, never the path: ids would make
/// a series each).
pub async fn track_requests(server: &'static str, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    // Any token is a method to HTTP: the standard ones by name, the rest as one series.
    let method = match *request.method() {
        http::Method::GET
        | http::Method::POST
        | http::Method::PUT
        | http::Method::PATCH
        | http::Method::DELETE
        | http::Method::HEAD
        | http::Method::OPTIONS => request.method().as_str().to_string(),
        _ => "other".to_string(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    let class = format!("{}xx", response.status().as_u16() / 100);
    let metrics = &*REQUESTS;
    metrics
        .requests
        .get_or_create(&vec![
            ("server", server.to_string()),
            ("method", method.clone()),
            ("route", route.clone()),
            ("status", class),
        ])
        .inc();
    metrics
        .seconds
        .get_or_create(&vec![
            ("server", server.to_string()),
            ("method", method),
            ("route", route),
        ])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The peer of a request, as the servers record it.
pub fn peer_of(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_needs_the_token_when_there_is_one_else_the_loopback() {
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let none = HeaderMap::new();
        assert!(may_scrape(&none, Some(loopback), None));
        assert!(!may_scrape(&none, Some(remote), None));
        assert!(!may_scrape(&none, None, None));
        let mut bearer = HeaderMap::new();
        bearer.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(may_scrape(&bearer, Some(remote), Some("s3cret")));
        assert!(!may_scrape(&bearer, Some(remote), Some("s3cret!")));
        assert!(!may_scrape(&none, Some(loopback), Some("s3cret")));
        assert_eq!(
            answer(&none, Some(remote), None).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            answer(&none, Some(remote), Some("x")).status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn registered_metrics_are_encoded_with_their_labels() {
        let family: Family<Labels, Counter> = register(
            "wrenn_test_things",
            "Things, for the test",
            Family::default(),
        );
        family.get_or_create(&vec![("kind", "a".into())]).inc_by(3);
        let text = encode();
        assert!(text.contains("# TYPE wrenn_test_things counter"), "{text}");
        assert!(
            text.contains("wrenn_test_things_total{kind=\"a\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
