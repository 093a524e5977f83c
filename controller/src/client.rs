//! A typed, blocking client of the REST API: what `verse` (the CLI), the integration tests and
//! the demo speak.
//!
//! Contract: one method per route of the REST API (README, "REST API"). A mutation returns its result and the
//! revision it produced (the `Verse-Revision` header). Any non-2xx answer becomes
//! [`Error::Api`] with the server's code and message, unchanged. Must not be called from inside
//! an async runtime (it uses `reqwest::blocking`).

use std::thread;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{EndpointView, ErrorBody, Host, REVISION_HEADER};
use crate::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, PatchEndpoint, Rule, SecurityGroup,
    Universe,
};

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
    /// The request (`METHOD URL`) did not reach the server or no answer came back.
    #[error("{request}: {source}")]
    Transport { request: String, source: reqwest::Error },
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

/// A client of one `versed`.
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    http: Http,
}

impl Client {
    /// A client of the API at `base` (`http://HOST:PORT`, maybe with a path prefix).
    pub fn new(base: &str) -> Result<Client> {
        let bad = |reason: String| Error::BadUrl { url: base.to_owned(), reason };
        let url = Url::parse(base).map_err(|e| bad(e.to_string()))?;
        if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
            return Err(bad("expected http://HOST:PORT".into()));
        }
        let http =
            Http::builder().timeout(REQUEST_TIMEOUT).build().map_err(|e| bad(e.to_string()))?;
        Ok(Client { base: url, http })
    }

    /// The API address.
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

    /// Sends a request; returns the successful response or the server's error.
    fn send(&self, method: Method, url: Url, body: Option<&dyn ErasedJson>) -> Result<Response> {
        let mut req: RequestBuilder = self.http.request(method.clone(), url.clone());
        if let Some(body) = body {
            let bytes = body.to_json().map_err(|e| Error::Decode {
                request: request(&method, &url),
                reason: format!("cannot encode the request: {e}"),
            })?;
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(bytes);
        }
        let resp = req
            .send()
            .map_err(|source| Error::Transport { request: request(&method, &url), source })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => {
                Error::Api { status: status.as_u16(), code: b.error.code, message: b.error.message }
            }
            Err(_) => Error::Api {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message: if text.is_empty() { status.to_string() } else { text },
            },
        })
    }

    fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, Option<&str>)],
    ) -> Result<T> {
        let url = self.url(segments, query);
        let resp = self.send(Method::GET, url.clone(), None)?;
        decode(Method::GET, url, resp)
    }

    /// A mutation with a JSON answer: the answer and the revision.
    fn mutate<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: &dyn ErasedJson,
    ) -> Result<(T, u64)> {
        let url = self.url(segments, &[]);
        let resp = self.send(method.clone(), url.clone(), Some(body))?;
        let revision = revision(&method, &url, &resp)?;
        Ok((decode(method, url, resp)?, revision))
    }

    /// A `DELETE`: the revision.
    fn delete(&self, segments: &[&str]) -> Result<u64> {
        let url = self.url(segments, &[]);
        let resp = self.send(Method::DELETE, url.clone(), None)?;
        revision(&Method::DELETE, &url, &resp)
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
        let resp = self.send(Method::GET, url.clone(), None)?;
        let text = resp
            .text()
            .map_err(|source| Error::Transport { request: request(&Method::GET, &url), source })?;
        if text.trim() == "ok" {
            Ok(())
        } else {
            Err(Error::Decode {
                request: request(&Method::GET, &url),
                reason: format!("expected \"ok\", got {text:?}"),
            })
        }
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        let url = self.url(&["metrics"], &[]);
        let resp = self.send(Method::GET, url.clone(), None)?;
        resp.text()
            .map_err(|source| Error::Transport { request: request(&Method::GET, &url), source })
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

/// `METHOD URL`, to say which request failed.
fn request(method: &Method, url: &Url) -> String {
    format!("{method} {url}")
}

fn decode<T: DeserializeOwned>(method: Method, url: Url, resp: Response) -> Result<T> {
    let bytes = resp
        .bytes()
        .map_err(|source| Error::Transport { request: request(&method, &url), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Decode { request: request(&method, &url), reason: e.to_string() })
}

fn revision(method: &Method, url: &Url, resp: &Response) -> Result<u64> {
    resp.headers()
        .get(REVISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Decode {
            request: request(method, url),
            reason: format!("missing or invalid {REVISION_HEADER} header"),
        })
}
