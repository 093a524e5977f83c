//! The REST API as a test speaks it: [`Api`] (one daemon's API as one principal), raw HTTP
//! requests, and a relay that reaches one host's API from another host's namespace.
//!
//! Two paths, on purpose:
//! - The typed operations of a user ([`Api::create_universe`], [`Api::add_rule`],
//!   [`Api::create_endpoint`], [`Api::hosts`], [`Api::metrics`], ... and everything else
//!   through [`Api::client`]) go through the product's own client, `verse::client::Client`:
//!   the same requests, the same decoding of answers and the same retry of a `429` as the `verse`
//!   CLI. A test that configures Verse this way tests what a user runs, and a change of the
//!   API that the client does not follow fails here first.
//! - Raw HTTP ([`Api::request`], [`Api::get`]/[`Api::post`]/[`Api::patch`]/[`Api::delete`],
//!   [`http_request`]) is kept for what the product's client cannot or must not send and for
//!   what it does not show: malformed or unknown bodies, wrong methods, missing or foreign
//!   tokens, raw bytes, and the exact status, headers and body of an answer (error answers,
//!   `Retry-After`, `Verse-Revision` of a refusal). Reads that still use it are older tests that
//!   assert on the raw answer; new tests use the client for anything a user would do.
//!
//! Every daemon listens on the loopback of its own namespace. The product client is built on a
//! thread inside that namespace: reqwest's blocking client makes its connections on a runtime
//! thread it spawns when it is built, and a new thread inherits the network namespace of the
//! thread that spawns it, so every connection of that client starts in the daemon's namespace
//! (`api_client_speaks_http_inside_a_namespace` below holds this).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use verse::api::CreatedToken;
use verse::client::Client;
use verse::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateToken, CreateUniverse, PatchEndpoint, Role,
};

use crate::*;

/// An HTTP answer of the API.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The body as JSON; panics (naming the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("response (status {}) is not JSON: {e}: {}", self.status, self.body)
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
    /// The `Verse-Revision` header, parsed.
    pub fn revision(&self) -> Option<u64> {
        self.header("verse-revision").and_then(|v| v.trim().parse().ok())
    }
    /// `error.code` of an error answer.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {}", self.body))
            .to_owned()
    }
    /// `error.message` of an error answer.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.message in {}", self.body))
            .to_owned()
    }
}

/// One daemon's API as one principal, with a bearer token (the admin's unless
/// [`Api::with_token`] says otherwise): the product's client for what a user does, raw HTTP for
/// the rest (see the module's documentation). Clones share one client.
#[derive(Clone, Debug)]
pub struct Api {
    pub(crate) netns: String,
    pub(crate) port: u16,
    pub(crate) token: Option<String>,
    /// Built on first use, inside `netns`.
    client: Arc<OnceLock<Client>>,
}

/// What a typed call answered, as the JSON the API sent (the product's types serialize to it).
fn to_json(what: &str, value: impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("{what}: cannot show the answer: {e}"))
}

/// What the mutation `what` made, as JSON; panics with the client's error if it failed.
fn made<T: Serialize>(what: &str, answer: verse::client::Result<(T, u64)>) -> Value {
    to_json(what, answer.unwrap_or_else(|e| panic!("{what}: {e}")).0)
}

impl Api {
    /// The API of the daemon listening on `port` of the loopback of namespace `netns`.
    pub(crate) fn new(netns: &str, port: u16, token: Option<String>) -> Api {
        Api { netns: netns.to_owned(), port, token, client: Arc::default() }
    }

    /// The base URL as seen from inside the host namespace (for the CLI, run with `ip netns
    /// exec`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The token this client sends (`VERSE_TOKEN` for the CLI).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The same API as another principal (`None`: no credentials at all).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api::new(&self.netns, self.port, token.map(str::to_owned))
    }

    /// The product's client of this API (`verse::client::Client`, what the CLI speaks), as this
    /// principal, its connections made inside the daemon's namespace.
    pub fn client(&self) -> &Client {
        self.client.get_or_init(|| {
            let url = self.url();
            let client = enter_netns(&self.netns, || Client::new(&url))
                .unwrap_or_else(|e| panic!("a client of {url} in {}: {e}", self.netns));
            match &self.token {
                Some(token) => client.with_token(token.clone()),
                None => client,
            }
        })
    }

    /// One raw request; `timeout` bounds connecting and each read. API edits wait (10 s at
    /// most) for the dataplane, so callers allow more than that.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> io::Result<Response> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        http_request_as(&self.netns, addr, method, path, body, self.token.as_deref(), timeout)
    }

    /// One raw request as a well-behaved client makes it: a `429` (the daemon's rate limit,
    /// which tests that create thousands of objects can reach) is sent again after its
    /// `Retry-After`. Use [`Api::request`] to see every answer as it is.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self
                .request(method, path, body, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            if r.status != 429 || Instant::now() >= deadline {
                return r;
            }
            let wait: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1);
            std::thread::sleep(Duration::from_secs(wait.clamp(1, 10)));
        }
    }
    /// A raw `GET`; its answer as it is, once it is not a `429` (sent again after its `Retry-After`).
    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }
    /// A raw `POST`; its answer as it is, once it is not a `429` (sent again after its `Retry-After`).
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(body))
    }
    /// A raw `PATCH`; its answer as it is, once it is not a `429` (sent again after its `Retry-After`).
    pub fn patch(&self, path: &str, body: &Value) -> Response {
        self.call("PATCH", path, Some(body))
    }
    /// A raw `DELETE`; its answer as it is, once it is not a `429` (sent again after its `Retry-After`).
    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None)
    }

    /// `verse universe create NAME --cidr CIDR`; returns the universe.
    pub fn create_universe(&self, name: &str, cidr: &str) -> Value {
        let req = CreateUniverse {
            name: name.into(),
            cidr: Some(cidr.into()),
            cidrs: None,
            ipv6_cidrs: None,
        };
        made(&format!("create universe {name} {cidr}"), self.client().create_universe(&req))
    }
    /// A dual-stack universe: `cidr` and its IPv6 counterpart ([`Family::text`]).
    pub fn create_dual_universe(&self, name: &str, cidr: &str) -> Value {
        let req = CreateUniverse {
            name: name.into(),
            cidr: Some(cidr.into()),
            cidrs: None,
            ipv6_cidrs: Some(vec![Family::V6.text(cidr)]),
        };
        made(&format!("create universe {name} {cidr}"), self.client().create_universe(&req))
    }
    /// `verse group create`; returns the group.
    pub fn create_group(&self, universe: &str, name: &str) -> Value {
        let req = CreateGroup { universe: universe.into(), name: name.into(), description: None };
        made(&format!("create group {name} in {universe}"), self.client().create_group(&req))
    }
    /// `verse rule add`, the rule given as the JSON body of `POST
    /// /v1/security-groups/{group}/rules`; returns the rule.
    pub fn add_rule(&self, group: &str, rule: &Value) -> Value {
        let req: CreateRule = serde_json::from_value(rule.clone())
            .unwrap_or_else(|e| panic!("{rule} is not a rule the client can send: {e}"));
        made(&format!("add rule {rule} to {group}"), self.client().add_rule(group, &req))
    }
    /// `verse rule delete`.
    pub fn delete_rule(&self, group: &str, rule: &str) {
        self.client()
            .delete_rule(group, rule)
            .unwrap_or_else(|e| panic!("delete rule {rule} of {group}: {e}"));
    }
    /// The group as it is defined (without the hit counters `GET` adds, which traffic moves).
    pub fn group(&self, id: &str) -> Value {
        let g = self.client().get_group(id).unwrap_or_else(|e| panic!("get group {id}: {e}"));
        to_json("group", g)
    }
    /// Removes every egress rule of a group, leaving it with no rules at all in that direction.
    pub fn clear_egress(&self, group: &str) {
        let g = self.client().get_group(group).unwrap_or_else(|e| panic!("get group {group}: {e}"));
        for rule in &g.egress {
            self.delete_rule(group, &rule.id);
        }
    }
    /// The `default` group of a universe (S3).
    pub fn default_group(&self, universe: &str) -> Value {
        let groups = self
            .client()
            .list_groups(Some(universe))
            .unwrap_or_else(|e| panic!("list the groups of {universe}: {e}"));
        let g = groups
            .iter()
            .find(|g| g.name == "default" && g.universe == universe)
            .unwrap_or_else(|| panic!("universe {universe} has no default group: {groups:?}"));
        to_json("group", g)
    }
    /// `verse endpoint set-groups`: replaces the endpoint's groups; returns the endpoint.
    pub fn set_groups(&self, endpoint: &str, groups: &[&str]) -> Value {
        let req = PatchEndpoint::groups(groups.iter().map(|g| (*g).to_owned()).collect());
        let what = format!("set the groups of {endpoint} to {groups:?}");
        made(&what, self.client().patch_endpoint(endpoint, &req))
    }
    /// Makes a workload namespace and plugs it as an endpoint through this API (`verse endpoint
    /// create`), placed on `host` (`None`: the host serving the request). `groups` empty means
    /// "none given", so the endpoint gets `default` (S3).
    pub fn create_endpoint(
        &self,
        host: Option<&str>,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> Workload {
        self.create_endpoint_at(host, universe, ip, groups).0
    }

    /// Like [`Api::create_endpoint`], also returning the revision the creation produced
    /// (`Verse-Revision`).
    pub fn create_endpoint_at(
        &self,
        host: Option<&str>,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> (Workload, u64) {
        self.plug(endpoint_request(host, universe, ip, groups))
    }

    /// Like [`Api::create_endpoint`], dual stack: `ip` and its IPv6 counterpart
    /// ([`Family::text`]), placed on `host` (`None`: the host serving the request).
    pub fn create_dual_endpoint(
        &self,
        host: Option<&str>,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> Workload {
        let req = endpoint_request(host, universe, ip, groups);
        self.plug(CreateEndpoint { ipv6: Some(Family::V6.text(ip)), ..req }).0
    }

    /// Makes a workload namespace and plugs it as the endpoint `req` describes (its `netns` is
    /// the new namespace's); returns it and the revision the creation produced.
    pub fn plug(&self, mut req: CreateEndpoint) -> (Workload, u64) {
        let ns = Netns::new("w");
        req.netns = ns.name().to_owned();
        let (ep, revision) = self
            .client()
            .create_endpoint(&req)
            .unwrap_or_else(|e| panic!("create endpoint {req:?}: {e}"));
        let workload = Workload {
            id: ep.id.clone(),
            ip: ep.ip,
            ipv6: ep.ipv6,
            mac: ep.mac.clone(),
            interface: ep.interface.clone(),
            json: to_json("endpoint", &ep),
            ns,
        };
        (workload, revision)
    }
    /// `verse token create --role ROLE [--universe U]`: the token, its secret included.
    pub fn create_token(&self, role: Role, universe: Option<&str>) -> CreatedToken {
        let req = CreateToken {
            role,
            universe: universe.map(str::to_owned),
            expires: None,
            description: None,
        };
        let what = format!("create a token {req:?}");
        self.client().create_token(&req).unwrap_or_else(|e| panic!("{what}: {e}")).0
    }
    /// `verse host list`: `[{name, underlay_ip, revision, healthy, ...}]`.
    pub fn hosts(&self) -> Vec<Value> {
        let hosts = self.client().list_hosts().unwrap_or_else(|e| panic!("list the hosts: {e}"));
        hosts.iter().map(|h| to_json("host", h)).collect()
    }
    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        self.client().metrics().unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }
}

/// The API of one host made reachable from another host's namespace: a TCP relay listening on
/// the loopback of `from` that connects each client to `api` inside its own namespace (every
/// daemon listens on its namespace's loopback only). Stops accepting on drop.
pub struct ApiRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiRelay {
    pub fn start(from: &Netns, api: &Api) -> ApiRelay {
        let port = unique_port();
        let listener = from
            .enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .unwrap_or_else(|e| panic!("relay listener in {}: {e}", from.name()));
        listener.set_nonblocking(true).expect("non-blocking relay listener");
        let (netns, target) =
            (api.netns.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, api.port)));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => return,
                };
                let Ok(upstream) = enter_netns(&netns, || TcpStream::connect(target)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                let (mut c1, mut u1) = (client, upstream);
                std::thread::spawn(move || {
                    let _ = io::copy(&mut c1, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        ApiRelay { port, stop, thread: Some(thread) }
    }

    /// The relayed API's URL, as seen from inside the namespace the relay listens in.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request to `addr` from inside the namespace `netns` (`Connection: close`);
/// `timeout` bounds connecting and each read and write.
pub fn http_request(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> io::Result<Response> {
    http_request_as(netns, addr, method, path, body, None, timeout)
}

/// [`http_request`] with `Authorization: Bearer <token>` when a token is given.
pub fn http_request_as(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = enter_netns(netns, || TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    req.push_str(&payload);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

pub(crate) fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses one HTTP/1.1 response (the whole connection's bytes, `Connection: close`).
pub fn parse_http_response(raw: &[u8]) -> io::Result<Response> {
    let end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of HTTP head"))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|e| bad(format!("HTTP head not UTF-8: {e}")))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = decode_chunked(&body)?;
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().map_err(|e| bad(format!("content-length {len:?}: {e}")))?;
        if body.len() < len {
            return Err(bad(format!("body shorter ({}) than content-length {len}", body.len())));
        }
        body.truncate(len);
    }
    let body = String::from_utf8(body).map_err(|e| bad(format!("body not UTF-8: {e}")))?;
    Ok(Response { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol =
            data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("chunk size line"))?;
        let size_text =
            std::str::from_utf8(&data[..eol]).map_err(|_| bad("chunk size not UTF-8"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|e| bad(format!("chunk size {size_text:?}: {e}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The request of an IPv4 endpoint at `ip` in `universe`, placed on `host` (`None`: the host
/// serving the request), in `groups` (empty: none given, so `default`, S3).
fn endpoint_request(
    host: Option<&str>,
    universe: &str,
    ip: &str,
    groups: &[&str],
) -> CreateEndpoint {
    CreateEndpoint {
        universe: universe.into(),
        host: host.map(str::to_owned),
        ip: ip.into(),
        security_groups: (!groups.is_empty())
            .then(|| groups.iter().map(|g| (*g).to_owned()).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_responses() {
        let raw = b"HTTP/1.1 201 Created\r\nVerse-Revision: 7\r\ncontent-length: 2\r\n\r\n{}";
        let r = parse_http_response(raw).unwrap();
        assert_eq!((r.status, r.revision(), r.body.as_str()), (201, Some(7), "{}"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(raw).unwrap().body, "abcde");
    }

    #[test]
    fn api_client_speaks_http_inside_a_namespace() {
        // The namespace's loopback is the only place this port listens: the raw path and the
        // product's client both reach it only if they connect from inside the namespace.
        let ns = Netns::new("tapi");
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:7070")).unwrap();
        let universe = r#"{"id":"uni-0000000a","name":"u","cidrs":["10.0.0.0/16"],"vni":7}"#;
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for body in ["{\"ok\":true}", universe] {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(b"}") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "client closed early");
                    req.extend_from_slice(&buf[..n]);
                }
                write!(
                    s,
                    "HTTP/1.1 201 Created\r\nverse-revision: 3\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                seen.push(String::from_utf8_lossy(&req).into_owned());
            }
            seen
        });
        let api = Api::new(ns.name(), 7070, Some("vt_x".into()));
        let r = api.post("/v1/universes", &json!({"name": "u"}));
        assert_eq!((r.status, r.revision(), r.json()), (201, Some(3), json!({"ok": true})));
        let typed = api.create_universe("u", "10.0.0.0/16");
        assert_eq!(typed, serde_json::from_str::<Value>(universe).unwrap());
        let seen = server.join().unwrap();
        let raw = &seen[0];
        assert!(
            raw.starts_with("POST /v1/universes HTTP/1.1\r\n") && raw.ends_with("{\"name\":\"u\"}"),
            "{raw}"
        );
        assert!(raw.contains("\r\nAuthorization: Bearer vt_x\r\n"), "{raw}");
        let client = seen[1].to_ascii_lowercase();
        assert!(client.starts_with("post /v1/universes http/1.1\r\n"), "{client}");
        assert!(client.contains("\r\nauthorization: bearer vt_x\r\n"), "{client}");
        assert!(client.ends_with(r#"{"name":"u","cidr":"10.0.0.0/16"}"#), "{client}");
    }
}
