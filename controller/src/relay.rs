//! One view of the fleet from any host: the serving host asks the other hosts' APIs for their
//! share of a request (events, flow logs, rule counters) and merges the answers.
//!
//! Contract:
//! - Each host registers the address where the others reach its API (`advertise_api`, see
//!   `Config::api_url`); a host without one, or not healthy, is not asked and the answer says so.
//! - A relayed request names the host it is for (`host=<name>`), so the host asked answers for
//!   itself only and never relays further.
//! - It carries the caller's bearer token, so the host asked applies the caller's own access (a
//!   principal confined to a universe gets that universe's share only). A caller without a token
//!   (root on the local socket) has nothing to present: the other hosts are reported missing.
//!   Who relays sees the token anyway; who is asked sees it too: a caller who does not want a
//!   host to see its token names another host with `host=`.
//! - Nothing waits on an unreachable host longer than [`CONNECT_TIMEOUT`] to connect, and a
//!   one-shot request longer than [`REQUEST_TIMEOUT`].

use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use serde::de::DeserializeOwned;

use crate::store::HostStatus;

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
                "the host registered no API address other hosts can reach (advertise_api)"
                    .to_owned(),
            )),
            (Some(api), true) => ask.push(Peer { name: h.name.clone(), api: api.clone() }),
        }
    }
    if let Some(o) = only {
        if o != me && !hosts.iter().any(|h| h.name == o) {
            missing.push((o.to_owned(), "no such host".to_owned()));
        }
    }
    (ask, missing)
}

/// The HTTP client relays use.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build()
}

fn url(peer: &Peer, path: &str) -> String {
    format!("{}{path}", peer.api.trim_end_matches('/'))
}

/// `GET <peer><path>?<query>&host=<peer>` as `token`, the answer parsed as `T`.
pub async fn get_json<T: DeserializeOwned>(
    client: &reqwest::Client,
    peer: &Peer,
    path: &str,
    query: &[(&str, String)],
    token: &str,
) -> Result<T, String> {
    let mut q: Vec<(&str, String)> = query.iter().filter(|(k, _)| *k != "host").cloned().collect();
    q.push(("host", peer.name.clone()));
    let resp = client
        .get(url(peer, path))
        .query(&q)
        .bearer_auth(token)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{}: {e}", peer.api))?;
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
    client: reqwest::Client,
    peer: Peer,
    path: &'static str,
    query: Vec<(&'static str, String)>,
    token: String,
) -> BoxStream<'static, Result<T, String>> {
    let start = async move {
        let mut q: Vec<(&str, String)> = query.into_iter().filter(|(k, _)| *k != "host").collect();
        q.push(("host", peer.name.clone()));
        let resp = client
            .get(url(&peer, path))
            .query(&q)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("{}: {e}", peer.api))?;
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

    fn host(name: &str, api: Option<&str>, healthy: bool) -> HostStatus {
        HostStatus {
            name: name.into(),
            underlay_ip: None,
            api: api.map(str::to_owned),
            revision: 1,
            healthy,
            errors: vec![],
        }
    }

    #[test]
    fn every_other_healthy_host_with_an_address_is_asked_the_rest_is_missing() {
        let hosts = [
            host("a", Some("http://a:1"), true),
            host("b", Some("http://b:1"), true),
            host("c", None, true),
            host("d", Some("http://d:1"), false),
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
}
