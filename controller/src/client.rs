//! A typed, blocking client of the REST API: what `verse` (the CLI), the integration tests and
//! the demo speak.
//!
//! Contract: one method per route of the REST API (README, "REST API"). A mutation returns its result and the
//! revision it produced (the `Verse-Revision` header). Any non-2xx answer becomes
//! [`Error::Api`] with the server's code and message, unchanged, except `429` (rate limited),
//! which is retried after the server's `Retry-After`, a few times, before it is returned. Must
//! not be called from inside an async runtime (it blocks).
//!
//! Two transports: `http://HOST:PORT` or `https://HOST:PORT` (reqwest), and `unix:PATH`, the
//! local socket of a `versed` (root only; hyper over a tokio `UnixStream`, as reqwest speaks TCP
//! only). Over `https://` the server's certificate is verified against the system's roots, a CA
//! file, or a pinned fingerprint ([`ClientTls`]). A token ([`Client::with_token`]) is sent on
//! either as `Authorization: Bearer`.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use reqwest::blocking::Client as Http;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{CreatedToken, EndpointView, ErrorBody, Host, TokenView, REVISION_HEADER};
use crate::audit::AuditRecord;
use crate::events::StreamItem;
use crate::hits::{GroupView, RuleStats};
use crate::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateToken, CreateUniverse, PatchEndpoint, Rule,
    SecurityGroup, Universe,
};
use crate::trace::{TraceAnswer, TraceRequest};

/// The API address when none is given.
pub const DEFAULT_API: &str = "http://127.0.0.1:7070";
/// A mutation waits up to 10 s on the server for its revision to be realized; leave room.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`Client::wait_revision`] polls `GET /v1/hosts`.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the request; `code` and `message` are the server's.
    #[error("{message} ({status} {code})")]
    Api { status: u16, code: String, message: String },
    /// The API address is not a usable URL.
    #[error("invalid API address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The request (`METHOD URL`) did not reach the server or no answer came back (with the
    /// causes, such as a certificate the client does not trust).
    #[error("{request}: {}", chain(source.as_ref()))]
    Transport { request: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// The TLS settings are unusable (an unreadable CA file, a malformed fingerprint).
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    /// The server answered the request (`METHOD URL`) with something the API does not promise.
    #[error("{request}: unexpected answer: {reason}")]
    Decode { request: String, reason: String },
    /// [`Client::wait_revision`] ran out of time.
    #[error("timed out after {waited:?} waiting for revision {revision}; hosts: {hosts}")]
    Timeout { revision: u64, waited: Duration, hosts: String },
}

impl Error {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes, joined by ": " (reqwest's own message leaves the cause out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let msg = c.to_string();
        if !text.ends_with(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        cause = c.source();
    }
    text
}

/// How many times a rate-limited (429) request is sent again, and the longest wait between two.
const RATE_LIMIT_RETRIES: u32 = 5;
const RATE_LIMIT_MAX_WAIT: Duration = Duration::from_secs(10);

pub use crate::tls::ClientTls;

/// A client of one `versed`.
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    transport: Transport,
    token: Option<String>,
}

#[derive(Clone, Debug)]
enum Transport {
    /// One-shot requests (with a timeout), and streams (without), trusting the same.
    Http(Http, Http),
    Unix(Arc<UnixTransport>),
}

/// HTTP/1.1 over the local unix socket, one connection per request.
struct UnixTransport {
    path: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for UnixTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixTransport").field("path", &self.path).finish()
    }
}

/// An answer, read whole.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Client {
    /// A client of the API at `base`: `http://HOST:PORT` or `https://HOST:PORT` (maybe with a
    /// path prefix; over TLS trusting the system's roots), or `unix:PATH` for the local socket
    /// of a `versed` (`unix:/var/lib/verse/api.sock`).
    pub fn new(base: &str) -> Result<Client> {
        Client::with_tls(base, &ClientTls::default())
    }

    /// A client of the API at `base` that trusts what `tls` says over `https://`.
    pub fn with_tls(base: &str, tls: &ClientTls) -> Result<Client> {
        let bad = |reason: String| Error::BadUrl { url: base.to_owned(), reason };
        if let Some(path) = base.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(bad("expected unix:/ABSOLUTE/PATH".into()));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| bad(format!("cannot start the client's runtime: {e}")))?;
            let unix = UnixTransport { path: PathBuf::from(path), runtime };
            let url = Url::parse("http://localhost/").map_err(|e| bad(e.to_string()))?;
            return Ok(Client {
                base: url,
                transport: Transport::Unix(Arc::new(unix)),
                token: None,
            });
        }
        let url = Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
            return Err(bad("expected http://HOST:PORT, https://HOST:PORT or unix:/PATH".into()));
        }
        // Two clients with the same trust: one-shot requests time out, a stream does not.
        let build = |timeout: Option<Duration>| -> Result<Http> {
            let mut builder = Http::builder().timeout(timeout).use_rustls_tls();
            if let Some(config) = tls.rustls_config()? {
                builder = builder.use_preconfigured_tls(config);
            }
            builder.build().map_err(|e| bad(chain(&e)))
        };
        let (http, stream) = (build(Some(REQUEST_TIMEOUT))?, build(None)?);
        Ok(Client { base: url, transport: Transport::Http(http, stream), token: None })
    }

    /// The same client, sending `token` as `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        self.token = Some(token.into());
        self
    }

    /// The API address (`http://localhost/` for the local socket).
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, segments: &[&str], query: &[(&str, Option<&str>)]) -> Url {
        let mut url = self.base.clone();
        {
            // `new` refused URLs that cannot be a base, so the segments are available; each
            // segment is percent-encoded by `extend`.
            if let Ok(mut path) = url.path_segments_mut() {
                path.pop_if_empty().extend(segments);
            }
        }
        let present: Vec<_> = query.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
        if !present.is_empty() {
            url.query_pairs_mut().extend_pairs(present);
        }
        url
    }

    /// `METHOD URL` as the user would recognize it (`unix:PATH/v1/...` on the local socket).
    fn describe(&self, method: &Method, url: &Url) -> String {
        match &self.transport {
            Transport::Http(..) => format!("{method} {url}"),
            Transport::Unix(u) => {
                let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
                format!("{method} unix:{}{}{query}", u.path.display(), url.path())
            }
        }
    }

    /// Sends a request; returns the successful answer or the server's error. A 429 is sent
    /// again after its `Retry-After`, up to [`RATE_LIMIT_RETRIES`] times.
    fn send(&self, method: Method, url: Url, body: Option<&dyn ErasedJson>) -> Result<Reply> {
        let described = self.describe(&method, &url);
        let bytes = match body {
            Some(body) => Some(body.to_json().map_err(|e| Error::Decode {
                request: described.clone(),
                reason: format!("cannot encode the request: {e}"),
            })?),
            None => None,
        };
        let mut headers = HeaderMap::new();
        if bytes.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        self.authorize(&mut headers, &described)?;
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| Error::Transport {
            request: described.clone(),
            source,
        };
        let mut attempt = 0;
        let reply = loop {
            let reply = match &self.transport {
                Transport::Http(http, _) => {
                    let mut req =
                        http.request(method.clone(), url.clone()).headers(headers.clone());
                    if let Some(bytes) = &bytes {
                        req = req.body(bytes.clone());
                    }
                    let resp = req.send().map_err(|e| transport(e.into()))?;
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let body = resp.bytes().map_err(|e| transport(e.into()))?.to_vec();
                    Reply { status, headers, body }
                }
                Transport::Unix(unix) => unix
                    .send(method.clone(), &url, headers.clone(), bytes.clone())
                    .map_err(transport)?,
            };
            if reply.status != 429 || attempt >= RATE_LIMIT_RETRIES {
                break reply;
            }
            attempt += 1;
            let wait = reply
                .headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(1), Duration::from_secs)
                .min(RATE_LIMIT_MAX_WAIT);
            thread::sleep(wait);
        };
        if (200..300).contains(&reply.status) {
            return Ok(reply);
        }
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        let status = reply.status;
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Error::Api { status, code: b.error.code, message: b.error.message },
            Err(_) => Error::Api {
                status,
                code: format!("http_{status}"),
                message: if text.is_empty() { format!("HTTP {status}") } else { text },
            },
        })
    }

    fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, Option<&str>)],
    ) -> Result<T> {
        let url = self.url(segments, query);
        let described = self.describe(&Method::GET, &url);
        let reply = self.send(Method::GET, url, None)?;
        decode(described, &reply)
    }

    /// A mutation with a JSON answer: the answer and the revision.
    fn mutate<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: &dyn ErasedJson,
    ) -> Result<(T, u64)> {
        let url = self.url(segments, &[]);
        let described = self.describe(&method, &url);
        let reply = self.send(method, url, Some(body))?;
        let revision = revision(&described, &reply)?;
        Ok((decode(described, &reply)?, revision))
    }

    /// A `DELETE`: the revision.
    fn delete(&self, segments: &[&str]) -> Result<u64> {
        let url = self.url(segments, &[]);
        let described = self.describe(&Method::DELETE, &url);
        let reply = self.send(Method::DELETE, url, None)?;
        revision(&described, &reply)
    }

    // ---- Universes ----

    pub fn create_universe(&self, req: &CreateUniverse) -> Result<(Universe, u64)> {
        self.mutate(Method::POST, &["v1", "universes"], req)
    }
    pub fn list_universes(&self) -> Result<Vec<Universe>> {
        self.get(&["v1", "universes"], &[])
    }
    pub fn get_universe(&self, id: &str) -> Result<Universe> {
        self.get(&["v1", "universes", id], &[])
    }
    pub fn delete_universe(&self, id: &str) -> Result<u64> {
        self.delete(&["v1", "universes", id])
    }

    // ---- Security groups and rules ----

    pub fn create_group(&self, req: &CreateGroup) -> Result<(SecurityGroup, u64)> {
        self.mutate(Method::POST, &["v1", "security-groups"], req)
    }
    pub fn list_groups(&self, universe: Option<&str>) -> Result<Vec<SecurityGroup>> {
        self.get(&["v1", "security-groups"], &[("universe", universe)])
    }
    pub fn get_group(&self, id: &str) -> Result<SecurityGroup> {
        self.get(&["v1", "security-groups", id], &[])
    }
    /// The group with each rule's hits summed over the fleet.
    pub fn group_view(&self, id: &str) -> Result<GroupView> {
        self.get(&["v1", "security-groups", id], &[])
    }
    pub fn rule_stats(
        &self,
        universe: Option<&str>,
        group: Option<&str>,
        host: Option<&str>,
    ) -> Result<Vec<RuleStats>> {
        self.get(&["v1", "rule-stats"], &[("universe", universe), ("group", group), ("host", host)])
    }

    /// Adds the bearer token, if any, to `headers` of the request `described`.
    fn authorize(&self, headers: &mut HeaderMap, described: &str) -> Result<()> {
        if let Some(token) = &self.token {
            let value =
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| Error::BadUrl {
                    url: described.to_owned(),
                    reason: "the token holds characters a header cannot carry".into(),
                })?;
            headers.insert(AUTHORIZATION, value);
        }
        Ok(())
    }

    /// `GET /v1/events?<query>`: calls `each` with every line as it arrives, until the stream
    /// ends or `each` returns false. No timeout: a followed stream lasts until it is stopped.
    pub fn events(
        &self,
        query: &[(&str, Option<&str>)],
        mut each: impl FnMut(StreamItem) -> bool,
    ) -> Result<()> {
        use std::io::BufRead;
        let url = self.url(&["v1", "events"], query);
        let described = self.describe(&Method::GET, &url);
        let mut headers = HeaderMap::new();
        self.authorize(&mut headers, &described)?;
        let transport = |source: Box<dyn std::error::Error + Send + Sync>| Error::Transport {
            request: described.clone(),
            source,
        };
        let mut line_of = |line: &[u8]| -> Result<bool> {
            if line.iter().all(u8::is_ascii_whitespace) {
                return Ok(true);
            }
            let item = serde_json::from_slice::<StreamItem>(line).map_err(|e| Error::Decode {
                request: described.clone(),
                reason: format!("a line that is no event: {e}"),
            })?;
            Ok(each(item))
        };
        let api_error = |status: u16, body: &[u8]| {
            let text = String::from_utf8_lossy(body).into_owned();
            match serde_json::from_str::<ErrorBody>(&text) {
                Ok(b) => Error::Api { status, code: b.error.code, message: b.error.message },
                Err(_) => Error::Api { status, code: format!("http_{status}"), message: text },
            }
        };
        match &self.transport {
            Transport::Http(_, http) => {
                let resp = http
                    .get(url.clone())
                    .headers(headers)
                    .send()
                    .map_err(|e| transport(e.into()))?;
                let status = resp.status().as_u16();
                if !(200..300).contains(&status) {
                    let body = resp.bytes().map_err(|e| transport(e.into()))?;
                    return Err(api_error(status, &body));
                }
                let mut reader = std::io::BufReader::new(resp);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = reader.read_until(b'\n', &mut line).map_err(|e| transport(e.into()))?;
                    if n == 0 || !line_of(&line)? {
                        return Ok(());
                    }
                }
            }
            Transport::Unix(unix) => unix
                .stream(&url, headers, &mut |status, chunk| {
                    if !(200..300).contains(&status) {
                        return Err(api_error(status, chunk));
                    }
                    line_of(chunk)
                })
                .map_err(|e| match e {
                    StreamError::Transport(e) => transport(e),
                    StreamError::Stop(e) => e,
                }),
        }
    }

    pub fn delete_group(&self, id: &str) -> Result<u64> {
        self.delete(&["v1", "security-groups", id])
    }
    pub fn add_rule(&self, group: &str, req: &CreateRule) -> Result<(Rule, u64)> {
        self.mutate(Method::POST, &["v1", "security-groups", group, "rules"], req)
    }
    pub fn delete_rule(&self, group: &str, rule: &str) -> Result<u64> {
        self.delete(&["v1", "security-groups", group, "rules", rule])
    }

    // ---- Endpoints ----

    pub fn create_endpoint(&self, req: &CreateEndpoint) -> Result<(EndpointView, u64)> {
        self.mutate(Method::POST, &["v1", "endpoints"], req)
    }
    pub fn list_endpoints(
        &self,
        universe: Option<&str>,
        host: Option<&str>,
    ) -> Result<Vec<EndpointView>> {
        self.get(&["v1", "endpoints"], &[("universe", universe), ("host", host)])
    }
    pub fn get_endpoint(&self, id: &str) -> Result<EndpointView> {
        self.get(&["v1", "endpoints", id], &[])
    }
    pub fn patch_endpoint(&self, id: &str, req: &PatchEndpoint) -> Result<(EndpointView, u64)> {
        self.mutate(Method::PATCH, &["v1", "endpoints", id], req)
    }
    pub fn delete_endpoint(&self, id: &str) -> Result<u64> {
        self.delete(&["v1", "endpoints", id])
    }

    // ---- Tokens and the audit trail ----

    /// `POST /v1/tokens`: the token with its secret (shown this once).
    pub fn create_token(&self, req: &CreateToken) -> Result<(CreatedToken, u64)> {
        self.mutate(Method::POST, &["v1", "tokens"], req)
    }
    pub fn list_tokens(&self) -> Result<Vec<TokenView>> {
        self.get(&["v1", "tokens"], &[])
    }
    pub fn delete_token(&self, id: &str) -> Result<u64> {
        self.delete(&["v1", "tokens", id])
    }
    /// `GET /v1/audit`: `since` is an RFC 3339 time or how long ago (`1h`).
    pub fn audit(
        &self,
        universe: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditRecord>> {
        let limit = limit.map(|l| l.to_string());
        self.get(
            &["v1", "audit"],
            &[("universe", universe), ("since", since), ("limit", limit.as_deref())],
        )
    }

    /// `GET /v1/flow-logs`: the records of `endpoint`, oldest first.
    pub fn flow_logs(
        &self,
        endpoint: &str,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<crate::flowlogs::FlowLogRecord>> {
        let limit = limit.map(|l| l.to_string());
        self.get(
            &["v1", "flow-logs"],
            &[("endpoint", Some(endpoint)), ("since", since), ("limit", limit.as_deref())],
        )
    }

    /// `GET /v1/trace`: this host's part of the packet's path.
    pub fn trace(&self, req: &TraceRequest) -> Result<TraceAnswer> {
        self.trace_on(req, None)
    }

    /// `GET /v1/trace?host=`: the part of host `host` (relayed there by this API), or this
    /// host's part when `None`.
    pub fn trace_on(&self, req: &TraceRequest, host: Option<&str>) -> Result<TraceAnswer> {
        let num = |v: Option<u16>| v.map(|v| v.to_string());
        let (port, sport) = (num(req.port), num(req.sport));
        let (ty, code) =
            (req.icmp_type.map(|v| v.to_string()), req.icmp_code.map(|v| v.to_string()));
        self.get(
            &["v1", "trace"],
            &[
                ("from", Some(req.from.as_str())),
                ("to", Some(req.to.as_str())),
                ("universe", req.universe.as_deref()),
                ("protocol", Some(req.protocol.as_str())),
                ("port", port.as_deref()),
                ("sport", sport.as_deref()),
                ("icmp_type", ty.as_deref()),
                ("icmp_code", code.as_deref()),
                ("run", req.run.then_some("true")),
                ("host", host),
            ],
        )
    }

    // ---- Hosts and service routes ----

    pub fn list_hosts(&self) -> Result<Vec<Host>> {
        self.get(&["v1", "hosts"], &[])
    }

    /// Polls `GET /v1/hosts` until at least one host is healthy and every healthy host has
    /// realized `revision` (S13); returns the hosts as last seen.
    pub fn wait_revision(&self, revision: u64, timeout: Duration) -> Result<Vec<Host>> {
        let start = Instant::now();
        loop {
            let last = self.list_hosts();
            if let Ok(hosts) = &last {
                let healthy: Vec<_> = hosts.iter().filter(|h| h.healthy).collect();
                if !healthy.is_empty() && healthy.iter().all(|h| h.revision >= revision) {
                    return last;
                }
            }
            if start.elapsed() >= timeout {
                let hosts = match last {
                    Ok(hosts) => hosts
                        .iter()
                        .map(|h| {
                            format!(
                                "{} at {}{}",
                                h.name,
                                h.revision,
                                if h.healthy { "" } else { " (unhealthy)" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    Err(e) => return Err(e),
                };
                return Err(Error::Timeout { revision, waited: start.elapsed(), hosts });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `GET /healthz`: `Ok(())` when the daemon answers "ok".
    pub fn healthz(&self) -> Result<()> {
        let url = self.url(&["healthz"], &[]);
        let described = self.describe(&Method::GET, &url);
        let reply = self.send(Method::GET, url, None)?;
        let text = String::from_utf8_lossy(&reply.body);
        if text.trim() == "ok" {
            Ok(())
        } else {
            Err(Error::Decode {
                request: described,
                reason: format!("expected \"ok\", got {text:?}"),
            })
        }
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        let url = self.url(&["metrics"], &[]);
        let described = self.describe(&Method::GET, &url);
        let reply = self.send(Method::GET, url, None)?;
        String::from_utf8(reply.body)
            .map_err(|e| Error::Decode { request: described, reason: e.to_string() })
    }

    /// `GET /v1/openapi.json`.
    pub fn openapi(&self) -> Result<serde_json::Value> {
        self.get(&["v1", "openapi.json"], &[])
    }
}

/// Serializes a request body without making the methods above generic over it.
trait ErasedJson {
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: Serialize> ErasedJson for T {
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

/// Why [`UnixTransport::stream`] ended early.
enum StreamError {
    Transport(Box<dyn std::error::Error + Send + Sync>),
    Stop(Error),
}

impl UnixTransport {
    /// A `GET` whose answer is read as it comes: `each` is called with the status and every
    /// line (a whole body for an error status); it ends the stream with `Ok(false)` or an error.
    fn stream(
        &self,
        url: &Url,
        headers: HeaderMap,
        each: &mut dyn FnMut(u16, &[u8]) -> Result<bool>,
    ) -> std::result::Result<(), StreamError> {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::rt::TokioIo;
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let t = |e: Box<dyn std::error::Error + Send + Sync>| StreamError::Transport(e);
        self.runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|e| t(format!("connecting to {}: {e}", self.path.display()).into()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| t(e.into()))?;
            let driver = tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(Method::GET)
                .uri(target)
                .header(hyper::header::HOST, "localhost");
            if let Some(h) = req.headers_mut() {
                h.extend(headers);
            }
            let req = req.body(Empty::<bytes::Bytes>::new()).map_err(|e| t(e.into()))?;
            let resp = sender.send_request(req).await.map_err(|e| t(e.into()))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            if !(200..300).contains(&status) {
                let all = body.collect().await.map_err(|e| t(e.into()))?.to_bytes();
                each(status, &all).map_err(StreamError::Stop)?;
                driver.abort();
                return Ok(());
            }
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| t(e.into()))?;
                let Some(data) = frame.data_ref() else { continue };
                buf.extend_from_slice(data);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    if !each(status, &line).map_err(StreamError::Stop)? {
                        driver.abort();
                        return Ok(());
                    }
                }
            }
            driver.abort();
            Ok(())
        })
    }

    fn send(
        &self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> std::result::Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::TokioIo;
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.path).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("connecting to {}: {e}", self.path.display()))
            })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(target)
                .header(hyper::header::HOST, "localhost");
            if let Some(h) = req.headers_mut() {
                h.extend(headers);
            }
            let req = req.body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await?.to_bytes().to_vec();
            driver.abort();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Reply { status, headers, body })
        };
        self.runtime.block_on(async {
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(reply) => reply,
                Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}").into()),
            }
        })
    }
}

fn decode<T: DeserializeOwned>(request: String, reply: &Reply) -> Result<T> {
    serde_json::from_slice(&reply.body)
        .map_err(|e| Error::Decode { request, reason: e.to_string() })
}

fn revision(request: &str, reply: &Reply) -> Result<u64> {
    reply
        .headers
        .get(REVISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Decode {
            request: request.to_owned(),
            reason: format!("missing or invalid {REVISION_HEADER} header"),
        })
}
