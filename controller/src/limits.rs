//! Per-request limits of the API: the size and the time of a request body, and the rate of
//! requests of each principal. (The limits of connections are the server's: [`crate::server`].)
//!
//! Contract, for every route but `/healthz`:
//! - Rates: each principal ([`rate_key`]) has two token buckets, one for reads (`GET`, `HEAD`)
//!   and one for writes (every other method), refilled at `per_second` up to `burst`. A request
//!   that finds its bucket empty is answered `429 rate_limited` with `Retry-After` (the whole
//!   seconds until a token is back) and is not served; other principals are not affected. A
//!   request without a principal (no token, or one refused: it is about to get a 401) counts
//!   against its address instead, so a flood of bad or missing credentials is limited too, and
//!   never against a principal whose token it names.
//! - Bodies: a body longer than `max_body_bytes` is answered `413 payload_too_large`, from its
//!   `Content-Length` before anything is read, or as soon as more than that has arrived; a body
//!   that has not fully arrived `body_timeout` after the request head is answered
//!   `408 request_timeout`. The handler only ever sees a whole body within the limit.
//!
//! [`crate::api::router`] places the two layers ([`limit_rate`], [`limit_body`]): the rate limit
//! inside authentication, which puts the [`Principal`] in the request's extensions (but before
//! a refused credential is answered 401); the body limit innermost, so that only a request of a
//! principal within its rate ever has its body read.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;
use crate::auth::{LocalPeer, Principal};

/// A token bucket's settings: `per_second` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The limits [`apply`] enforces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub reads: Rate,
    pub writes: Rate,
}

/// Who a request counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An authenticated principal, by name (`tok-…`, `local-root`).
    Principal(String),
    /// An address over TCP (requests that carry no principal).
    Peer(IpAddr),
    /// A uid on the local socket (requests that carry no principal: not root, no token).
    LocalUid(Option<u32>),
    /// Neither is known (a router served without a socket, in tests).
    Unknown,
}

impl std::fmt::Display for RateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateKey::Principal(p) => write!(f, "principal {p}"),
            RateKey::Peer(ip) => write!(f, "address {ip}"),
            RateKey::LocalUid(Some(uid)) => write!(f, "uid {uid} on the local socket"),
            RateKey::LocalUid(None) => write!(f, "an unknown uid on the local socket"),
            RateKey::Unknown => write!(f, "this client"),
        }
    }
}

/// The principal of a request if it has one (authentication put it in the request's
/// extensions), else its peer: the address over TCP, the uid on the local socket (the server
/// puts the peer in [`ConnectInfo`]). The one place that decides who shares a rate limit.
pub fn rate_key(req: &Request) -> RateKey {
    if let Some(p) = req.extensions().get::<Principal>() {
        return RateKey::Principal(p.name().to_owned());
    }
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        return RateKey::Peer(peer.ip());
    }
    match req.extensions().get::<ConnectInfo<LocalPeer>>() {
        Some(ConnectInfo(peer)) => RateKey::LocalUid(peer.uid),
        None => RateKey::Unknown,
    }
}

/// Buckets older than this, when full again, are forgotten (so a flood of addresses cannot
/// grow the table for ever).
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// The table is swept of forgotten buckets once it holds this many.
const SWEEP_AT: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate.per_second.max(f64::MIN_POSITIVE);
            Err(Duration::from_secs_f64(wait.min(86_400.0)))
        }
    }
}

/// The state [`apply`]'s layers share.
pub struct Limits {
    settings: Settings,
    buckets: Mutex<HashMap<(RateKey, bool), Bucket>>,
}

impl Limits {
    pub fn new(settings: Settings) -> Arc<Limits> {
        Arc::new(Limits { settings, buckets: Mutex::new(HashMap::new()) })
    }

    /// Takes a token from `key`'s read or write bucket.
    fn take(&self, key: RateKey, write: bool, now: Instant) -> Result<(), Duration> {
        let rate = if write { self.settings.writes } else { self.settings.reads };
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|(_, w), b| {
                let rate = if *w { self.settings.writes } else { self.settings.reads };
                let mut b = *b;
                b.refill(rate, now);
                b.tokens < rate.burst || now.saturating_duration_since(b.at) < FORGET_AFTER
            });
        }
        buckets
            .entry((key, write))
            .or_insert(Bucket { tokens: rate.burst, at: now })
            .take(rate, now)
    }
}

/// The rate limit of the module contract, as a middleware (`None`: no limit).
pub async fn limit_rate(
    State(limits): State<Option<Arc<Limits>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(limits) = limits else { return next.run(req).await };
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let key = rate_key(&req);
    match limits.take(key.clone(), write, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let rate = if write { limits.settings.writes } else { limits.settings.reads };
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let message = format!(
                "too many {} from {key}: {} a second are allowed (bursts of {}); retry in {secs} s",
                if write { "writes" } else { "reads" },
                rate.per_second,
                rate.burst,
            );
            let mut resp = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                .into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
}

fn too_large(max: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("body: longer than the {max} bytes a request body may have"),
    )
    .into_response()
}

/// The body limits of the module contract, as a middleware (`None`: no limit here).
pub async fn limit_body(
    State(limits): State<Option<Arc<Limits>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(limits) = limits else { return next.run(req).await };
    let Settings { max_body_bytes: max, body_timeout, .. } = limits.settings;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large(max);
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(body_timeout, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            // `to_bytes` fails with a length-limit error once more than `max` has arrived.
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if over || e.to_string().contains("length limit") {
                return too_large(max);
            }
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("body: could not be read: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("body: not received within {} s", body_timeout.as_secs_f64()),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate { per_second: 2.0, burst: 3.0 };
        let t0 = Instant::now();
        let mut b = Bucket { tokens: rate.burst, at: t0 };
        for _ in 0..3 {
            assert!(b.take(rate, t0).is_ok());
        }
        let wait = b.take(rate, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(b.take(rate, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(rate, t0 + Duration::from_millis(500)).is_err());
        // Never more than the burst saved up, however long it waited.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(rate, later).is_ok());
        }
        assert!(b.take(rate, later).is_err());
    }

    #[test]
    fn principals_and_directions_have_their_own_buckets() {
        let limits = Limits::new(Settings {
            max_body_bytes: 1,
            body_timeout: Duration::from_secs(1),
            reads: Rate { per_second: 1.0, burst: 1.0 },
            writes: Rate { per_second: 1.0, burst: 1.0 },
        });
        let now = Instant::now();
        let a = RateKey::Peer("127.0.0.1".parse().unwrap());
        let b = RateKey::Peer("127.0.0.2".parse().unwrap());
        assert!(limits.take(a.clone(), true, now).is_ok());
        assert!(limits.take(a.clone(), true, now).is_err());
        assert!(limits.take(a, false, now).is_ok(), "reads are counted apart from writes");
        assert!(limits.take(b, true, now).is_ok(), "another address is not affected");
    }

    #[test]
    fn the_principal_is_the_key_and_the_peer_only_without_one() {
        let peer: SocketAddr = "198.18.0.7:5555".parse().unwrap();
        let request = || Request::new(Body::empty());
        let mut req = request();
        req.extensions_mut().insert(ConnectInfo(peer));
        assert_eq!(rate_key(&req), RateKey::Peer(peer.ip()), "no principal: the address");
        let token = Principal::Token {
            id: "tok-0000abcd".into(),
            role: crate::model::Role::Viewer,
            universe: None,
        };
        req.extensions_mut().insert(token);
        assert_eq!(rate_key(&req), RateKey::Principal("tok-0000abcd".into()));
        let mut req = request();
        req.extensions_mut().insert(ConnectInfo(LocalPeer { uid: Some(1000), pid: None }));
        assert_eq!(rate_key(&req), RateKey::LocalUid(Some(1000)));
        req.extensions_mut().insert(Principal::LocalRoot);
        assert_eq!(rate_key(&req), RateKey::Principal("local-root".into()));
        assert_eq!(rate_key(&request()), RateKey::Unknown);
    }
}
