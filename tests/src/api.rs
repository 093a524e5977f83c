//! The REST API as a test speaks it: [`Api`] (one daemon's API as one principal), raw HTTP
//! requests, and a relay that reaches one host's API from another host's namespace.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

/// A client of one daemon's API, speaking HTTP/1.1 from inside the daemon's namespace (the API
/// listens on that namespace's loopback), with a bearer token (the admin's unless
/// [`Api::with_token`] says otherwise).
#[derive(Clone, Debug)]
pub struct Api {
    pub(crate) netns: String,
    pub(crate) port: u16,
    pub(crate) token: Option<String>,
}

impl Api {
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
        Api { token: token.map(str::to_owned), ..self.clone() }
    }

    /// One request; `timeout` bounds connecting and each read. API edits wait (10 s at most)
    /// for the dataplane, so callers allow more than that.
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

    /// One request as a well-behaved client makes it: a `429` (the daemon's rate limit, which
    /// tests that create thousands of objects can reach) is sent again after its
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
    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(body))
    }
    pub fn patch(&self, path: &str, body: &Value) -> Response {
        self.call("PATCH", path, Some(body))
    }
    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None)
    }

    fn created(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body);
        assert_eq!(r.status, 201, "POST {path} {body}: {}", r.body);
        r.json()
    }

    /// `POST /v1/universes {name, cidr}`, asserting 201; returns the universe.
    pub fn create_universe(&self, name: &str, cidr: &str) -> Value {
        self.created("/v1/universes", &json!({"name": name, "cidr": cidr}))
    }
    /// `POST /v1/security-groups`, asserting 201; returns the group.
    pub fn create_group(&self, universe: &str, name: &str) -> Value {
        self.created("/v1/security-groups", &json!({"universe": universe, "name": name}))
    }
    /// `POST /v1/security-groups/{group}/rules`, asserting 201; returns the rule.
    pub fn add_rule(&self, group: &str, rule: &Value) -> Value {
        self.created(&format!("/v1/security-groups/{group}/rules"), rule)
    }
    /// `DELETE /v1/security-groups/{group}/rules/{rule}`, asserting 204.
    pub fn delete_rule(&self, group: &str, rule: &str) {
        let r = self.delete(&format!("/v1/security-groups/{group}/rules/{rule}"));
        assert_eq!(r.status, 204, "DELETE rule {rule} of {group}: {}", r.body);
    }
    /// The group as it is defined: `GET /v1/security-groups/{id}` without the hit counters it
    /// adds (`hits` of each rule, `hits_from`), which traffic moves. Asserts 200.
    pub fn group(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/security-groups/{id}"));
        assert_eq!(r.status, 200, "GET group {id}: {}", r.body);
        let mut g = r.json();
        if let Some(o) = g.as_object_mut() {
            o.remove("hits_from");
        }
        for dir in ["ingress", "egress"] {
            for rule in g[dir].as_array_mut().into_iter().flatten() {
                if let Some(o) = rule.as_object_mut() {
                    o.remove("hits");
                }
            }
        }
        g
    }
    /// Removes every egress rule of a group, leaving it with no rules at all in that direction.
    pub fn clear_egress(&self, group: &str) {
        let g = self.group(group);
        for rule in g["egress"].as_array().expect("egress is an array") {
            self.delete_rule(group, rule["id"].as_str().expect("rule id"));
        }
    }
    /// The `default` group of a universe (S3).
    pub fn default_group(&self, universe: &str) -> Value {
        let r = self.get(&format!("/v1/security-groups?universe={universe}"));
        assert_eq!(r.status, 200, "GET security-groups of {universe}: {}", r.body);
        r.json()
            .as_array()
            .expect("a collection is a JSON array")
            .iter()
            .find(|g| g["name"] == "default" && g["universe"] == universe)
            .cloned()
            .unwrap_or_else(|| panic!("universe {universe} has no default group: {}", r.body))
    }
    /// `PATCH /v1/endpoints/{id} {security_groups}`, asserting 200.
    pub fn set_groups(&self, endpoint: &str, groups: &[&str]) -> Value {
        let r =
            self.patch(&format!("/v1/endpoints/{endpoint}"), &json!({"security_groups": groups}));
        assert_eq!(r.status, 200, "PATCH endpoint {endpoint} {groups:?}: {}", r.body);
        r.json()
    }
    /// Makes a workload namespace and plugs it as an endpoint through this API (`POST
    /// /v1/endpoints`, which must answer 201), placed on `host` (`None`: the host serving the
    /// request). `groups` empty means "none given", so the endpoint gets `default` (S3).
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
        let ns = Netns::new("w");
        let mut body = json!({"universe": universe, "netns": ns.name(), "ip": ip});
        if let Some(host) = host {
            body["host"] = json!(host);
        }
        if !groups.is_empty() {
            body["security_groups"] = json!(groups);
        }
        let r = self.post("/v1/endpoints", &body);
        assert_eq!(r.status, 201, "POST /v1/endpoints {body}: {}", r.body);
        let ep = r.json();
        let s = |k: &str| {
            ep[k].as_str().unwrap_or_else(|| panic!("endpoint.{k} missing in {ep}")).to_owned()
        };
        let revision = r.revision().unwrap_or_else(|| panic!("no Verse-Revision: {:?}", r.headers));
        let workload = Workload {
            id: s("id"),
            ip: s("ip").parse().unwrap_or_else(|e| panic!("endpoint.ip in {ep}: {e}")),
            mac: s("mac"),
            interface: s("interface"),
            json: ep,
            ns,
        };
        (workload, revision)
    }
    /// `GET /v1/hosts`, asserting 200: `[{name, underlay_ip, revision, healthy}]`.
    pub fn hosts(&self) -> Vec<Value> {
        let r = self.get("/v1/hosts");
        assert_eq!(r.status, 200, "GET /v1/hosts: {}", r.body);
        r.json().as_array().cloned().unwrap_or_else(|| panic!("hosts is not an array: {}", r.body))
    }
    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
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
        let ns = Netns::new("tapi");
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:7070")).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.ends_with(b"}") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            let body = "{\"ok\":true}";
            write!(
                s,
                "HTTP/1.1 201 Created\r\nverse-revision: 3\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            req
        });
        let api = Api { netns: ns.name().to_owned(), port: 7070, token: Some("vt_x".into()) };
        let r = api.post("/v1/universes", &json!({"name": "u"}));
        assert_eq!((r.status, r.revision(), r.json()), (201, Some(3), json!({"ok": true})));
        let req = server.join().unwrap();
        assert!(
            req.starts_with("POST /v1/universes HTTP/1.1\r\n") && req.ends_with("{\"name\":\"u\"}"),
            "{req}"
        );
        assert!(req.contains("\r\nAuthorization: Bearer vt_x\r\n"), "{req}");
    }
}
