//! One view of the fleet from any host: the serving host asks the other hosts' APIs for their
//! share of a request (events, flow logs, rule counters, trace hops) and merges the answers.
//!
//! Contract:
//! - Each host registers the address where the others reach its API (`advertise_api`, see
//!   `Config::api_url`) and, when it serves TLS, the SHA-256 of the certificate it serves
//!   there; a host without an address, or not healthy, is not asked and the answer says so.
//! - A relayed request names the host it is for (`host=<name>`), so the host asked answers for
//!   itself only and never relays further.
//! - It carries the caller's bearer token, so the host asked applies the caller's own access (a
//!   principal confined to a universe gets that universe's share only). A caller without a token
//!   (root on the local socket) has nothing to present: the other hosts are reported missing.
//! - A token goes only where the host it is meant for can be told from anyone else
//!   ([`transport`]): over TLS to a server holding exactly the certificate that host registered
//!   (pinned: whoever answers at the registered address without that certificate's key gets
//!   the handshake refused before a byte of the request), or over plain HTTP to a loopback
//!   address (this machine). Never over plain HTTP across a network, never to a host that
//!   registered no certificate, never through a proxy, never after a redirect. A host that
//!   cannot be asked that way is reported missing, saying why.
//! - Nothing waits on an unreachable host longer than [`CONNECT_TIMEOUT`] to connect, and a
//!   one-shot request longer than [`REQUEST_TIMEOUT`].

use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use serde::de::DeserializeOwned;

use crate::store::HostStatus;
use crate::tls::ClientTls;

/// How long to wait for another host's API to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a one-shot relayed request (counters, flow logs) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest line a relayed stream may send (an event is well under 4 KiB).
const MAX_LINE: usize = 1 << 20;

/// A host to ask, and how.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub api: String,
    /// The fingerprint of the certificate it registered (`None`: plain HTTP on loopback).
    pub fingerprint: Option<String>,
}

/// How a token may travel to a host that registered `api` and `fingerprint`: `Ok(true)` over
/// TLS pinned to `fingerprint`, `Ok(false)` over plain HTTP (a loopback address only), or why
/// it may not travel there at all.
pub fn transport(api: &str, fingerprint: Option<&str>) -> Result<bool, String> {
    let url = reqwest::Url::parse(api).map_err(|e| format!("its API address {api:?}: {e}"))?;
    match url.scheme() {
        "https" => match fingerprint {
            Some(f) if crate::tls::parse_fingerprint(f).is_ok() => Ok(true),
            Some(f) => Err(format!("it registered a malformed certificate fingerprint {f:?}")),
            None => Err(format!(
                "it registered no certificate fingerprint with {api}, so nothing tells it from \
                 another server there: a token is not sent (its versed serves no TLS itself)"
            )),
        },
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(false)
            } else {
                Err(format!(
                    "its API {api} is plain HTTP across the network, where anyone on the path \
                     could read a token: a token is not sent (serve its API over TLS, \
                     [api] tls = \"on\")"
                ))
            }
        }
        other => Err(format!("its API address {api:?} has scheme {other:?}, not https")),
    }
}

/// Who must be asked for a fleet-wide answer, besides `me`: every other host, or only `only` if
/// given. Hosts that cannot be asked come back in the second list, with the reason.
pub fn peers(
    hosts: &[HostStatus],
    me: &str,
    only: Option<&str>,
) -> (Vec<Peer>, Vec<(String, String)>) {
    let mut ask = Vec::new();
    let mut missing = Vec::new();
    for h in hosts.iter().filter(|h| h.name != me && only.is_none_or(|o| o == h.name)) {
        match (&h.api, h.healthy) {
            (_, false) => missing.push((h.name.clone(), "the host is not healthy".to_owned())),
            (None, true) => missing.push((
                h.name.clone(),
                "the host registered no API address other hosts can reach (it serves no API, \
                 api.serve = false, or listens on loopback only without advertise_api)"
                    .to_owned(),
            )),
            (Some(api), true) => match transport(api, h.api_fingerprint.as_deref()) {
                Ok(tls) => ask.push(Peer {
                    name: h.name.clone(),
                    api: api.clone(),
                    fingerprint: if tls { h.api_fingerprint.clone() } else { None },
                }),
                Err(why) => missing.push((h.name.clone(), why)),
            },
        }
    }
    if let Some(o) = only {
        if o != me && !hosts.iter().any(|h| h.name == o) {
            missing.push((o.to_owned(), "no such host".to_owned()));
        }
    }
    (ask, missing)
}

/// The HTTP client that asks `peer`: TLS pinned to the certificate it registered (or plain HTTP
/// to loopback, see [`transport`]), no proxy, no redirect.
pub fn client(peer: &Peer) -> Result<reqwest::Client, String> {
    let tls = transport(&peer.api, peer.fingerprint.as_deref())?;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    if tls {
        let pinned = ClientTls { ca_file: None, fingerprint: peer.fingerprint.clone() };
        match pinned.rustls_config() {
            Ok(Some(config)) => builder = builder.use_preconfigured_tls(config),
            Ok(None) => return Err("no TLS settings for a pinned certificate".to_owned()),
            Err(e) => return Err(e.to_string()),
        }
    } else {
        builder = builder.https_only(false);
    }
    builder.build().map_err(|e| format!("{}: making the client: {e}", peer.api))
}

/// `e` and every error under it: reqwest's own message does not say why a connection failed
/// (a refused certificate, a timeout), its sources do.
fn why(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

fn url(peer: &Peer, path: &str) -> String {
    format!("{}{path}", peer.api.trim_end_matches('/'))
}

/// `GET <peer><path>?<query>&host=<peer>` as `token`, the answer parsed as `T`.
pub async fn get_json<T: DeserializeOwned>(
    peer: &Peer,
    path: &str,
    query: &[(&str, String)],
    token: &str,
) -> Result<T, String> {
    let mut q: Vec<(&str, String)> = query.iter().filter(|(k, _)| *k != "host").cloned().collect();
    q.push(("host", peer.name.clone()));
    let client = client(peer)?;
    let resp = client
        .get(url(peer, path))
        .query(&q)
        .bearer_auth(token)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{}: {}", peer.api, why(&e)))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("{}: reading the answer: {e}", peer.api))?;
    if !status.is_success() {
        return Err(format!("{} answered {status}: {}", peer.api, String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{}: unexpected answer: {e}", peer.api))
}

/// `GET <peer><path>?<query>&host=<peer>` as `token`: the answer's lines, parsed as `T`, as
/// they come. A failure ends the stream with an `Err` saying why.
pub fn lines<T: DeserializeOwned + Send + 'static>(
    peer: Peer,
    path: &'static str,
    query: Vec<(&'static str, String)>,
    token: String,
) -> BoxStream<'static, Result<T, String>> {
    let start = async move {
        let mut q: Vec<(&str, String)> = query.into_iter().filter(|(k, _)| *k != "host").collect();
        q.push(("host", peer.name.clone()));
        let client = client(&peer)?;
        let resp = client
            .get(url(&peer, path))
            .query(&q)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("{}: {}", peer.api, why(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("{} answered {status}: {body}", peer.api));
        }
        Ok((resp, peer.api))
    };
    stream::once(start)
        .flat_map(|started| match started {
            Err(e) => stream::iter([Err(e)]).boxed(),
            Ok((resp, api)) => read_lines::<T>(resp, api).boxed(),
        })
        .boxed()
}

/// The lines of a response body as they arrive.
fn read_lines<T: DeserializeOwned + Send + 'static>(
    resp: reqwest::Response,
    api: String,
) -> impl futures::Stream<Item = Result<T, String>> + Send {
    struct S {
        resp: reqwest::Response,
        buf: Vec<u8>,
        api: String,
        done: bool,
    }
    stream::unfold(S { resp, buf: Vec::new(), api, done: false }, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(i) = s.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = s.buf.drain(..=i).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let item = serde_json::from_slice::<T>(line)
                    .map_err(|e| format!("{}: a line that is no record: {e}", s.api));
                if item.is_err() {
                    s.done = true;
                }
                return Some((item, s));
            }
            if s.buf.len() > MAX_LINE {
                s.done = true;
                let e = format!("{}: a line longer than {MAX_LINE} bytes", s.api);
                return Some((Err(e), s));
            }
            match s.resp.chunk().await {
                Ok(Some(chunk)) => s.buf.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(e) => {
                    s.done = true;
                    let e = format!("{}: the stream broke: {e}", s.api);
                    return Some((Err(e), s));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "SHA256:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB";

    fn host(name: &str, api: Option<&str>, healthy: bool) -> HostStatus {
        HostStatus {
            name: name.into(),
            underlay_ip: None,
            api: api.map(str::to_owned),
            api_fingerprint: Some(PIN.to_owned()),
            revision: 1,
            healthy,
            errors: vec![],
        }
    }

    #[test]
    fn every_other_healthy_host_with_an_address_is_asked_the_rest_is_missing() {
        let hosts = [
            host("a", Some("https://a:1"), true),
            host("b", Some("https://b:1"), true),
            host("c", None, true),
            host("d", Some("https://d:1"), false),
        ];
        let (ask, missing) = peers(&hosts, "a", None);
        assert_eq!(ask.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(missing.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["c", "d"]);
        let (ask, missing) = peers(&hosts, "a", Some("a"));
        assert!(ask.is_empty() && missing.is_empty(), "a host asked for itself relays nothing");
        let (ask, missing) = peers(&hosts, "a", Some("b"));
        assert_eq!((ask.len(), missing.len()), (1, 0));
        let (ask, missing) = peers(&hosts, "a", Some("zz"));
        assert_eq!((ask.len(), missing[0].0.as_str()), (0, "zz"));
    }

    #[test]
    fn a_token_travels_only_over_tls_pinned_to_the_registered_certificate_or_over_loopback() {
        assert_eq!(transport("https://198.18.0.2:7070", Some(PIN)), Ok(true));
        assert!(transport("https://198.18.0.2:7070", None).unwrap_err().contains("fingerprint"));
        assert!(transport("https://198.18.0.2:7070", Some("AB:CD")).is_err());
        assert!(transport("http://198.18.0.2:7070", Some(PIN)).unwrap_err().contains("plain HTTP"));
        assert!(transport("http://node2:7070", None).is_err());
        assert_eq!(transport("http://127.0.0.1:7070", None), Ok(false));
        assert_eq!(transport("http://[::1]:7070", None), Ok(false));
        assert_eq!(transport("http://localhost:7070", None), Ok(false));
        assert!(transport("ftp://198.18.0.2", Some(PIN)).is_err());
        let mut plain = host("p", Some("http://198.18.0.9:7070"), true);
        plain.api_fingerprint = None;
        let mut unpinned = host("u", Some("https://198.18.0.8:7070"), true);
        unpinned.api_fingerprint = None;
        let hosts = [host("a", Some("https://a:1"), true), plain, unpinned];
        let (ask, missing) = peers(&hosts, "a", None);
        assert!(ask.is_empty(), "{ask:?}");
        assert_eq!(missing.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["p", "u"]);
        let pinned = host("b", Some("https://b:1"), true);
        let (ask, _) = peers(&[pinned], "a", None);
        assert_eq!(ask[0].fingerprint.as_deref(), Some(PIN));
    }
}
