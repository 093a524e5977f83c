//! Relaying across hosts (README, "Why was my packet dropped?"): any host's API answers for the
//! whole fleet by asking the other hosts' APIs with the caller's token, so the token goes only
//! where the host it is meant for can be told from anyone else. Three hosts on one etcd: host-a
//! and host-b serve their APIs over TLS and register, with the address where the others reach
//! them, the fingerprint of the certificate they serve; host-c serves plain HTTP across the
//! underlay. Through host-a's API and CLI, host-b's flow logs are read and a packet from host-a
//! to host-b is traced on both hosts with no `--host-api`; a server that presents another
//! certificate at host-b's registered address gets the handshake refused and never a byte of a
//! request (no token), and host-c's plain-HTTP address gets no connection at all.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tests::*;

/// Where every host's API is reached on the underlay (a forwarder to its loopback listener).
const UNDERLAY_PORT: u16 = 7443;

fn id(v: &Value) -> String {
    v["id"].as_str().expect("resource has an id").to_owned()
}

/// Accepts connections on `bind` inside `ns` (non-blocking, until `stop`), handing each to
/// `serve` on a thread of its own.
fn accept_loop(
    ns: &Netns,
    bind: SocketAddr,
    stop: Arc<AtomicBool>,
    serve: impl Fn(TcpStream) + Send + Sync + 'static,
) -> JoinHandle<()> {
    let listener = ns
        .enter(|| TcpListener::bind(bind))
        .unwrap_or_else(|e| panic!("listen on {bind} in {}: {e}", ns.name()));
    listener.set_nonblocking(true).expect("non-blocking listener");
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let serve = serve.clone();
                    std::thread::spawn(move || serve(c));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return,
            }
        }
    })
}

/// Listeners of the test, stopped on drop.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP forwarder on `bind` inside `ns` to `127.0.0.1:<target>` in the same namespace (TLS
/// passes through untouched); `target` may be switched meanwhile.
fn forward(
    ns: &Netns,
    bind: SocketAddr,
    target: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let name = ns.name().to_owned();
    accept_loop(ns, bind, stop, move |client| {
        let port = target.load(Ordering::Relaxed);
        let Ok(upstream) = enter_netns(&name, || TcpStream::connect((Ipv4Addr::LOCALHOST, port)))
        else {
            return;
        };
        let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
            return;
        };
        let (mut c1, mut u1) = (client, upstream);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c1, &mut u1);
            let _ = u1.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut u2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Write);
    })
}

/// What a listener of the attacker received: connections, and the bytes it could read (for a
/// TLS server, after its handshake: the plaintext of requests).
#[derive(Default)]
struct Received {
    connections: AtomicUsize,
    bytes: Mutex<Vec<u8>>,
}

/// Reads what `stream` sends (5 s at most) into `into`.
fn record(mut stream: impl Read, into: &Received) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        into.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// `verse --api <url> --ca-file <ca> --token <token> ARGS` inside `ns`.
fn verse_at(ns: &Netns, url: &str, ca: &Path, token: &str, args: &[&str]) -> Output {
    let ca = ca.to_str().expect("a UTF-8 path");
    let mut all = vec!["--api", url, "--ca-file", ca, "--token", token];
    all.extend_from_slice(args);
    verse_cli(ns.name(), &all)
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "verse failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn relays_reach_the_registered_certificate_only_and_never_send_a_token_in_the_clear() {
    let tls = |i: usize| {
        format!(
            "advertise_api = \"https://{}:{UNDERLAY_PORT}\"\n[api]\ntls = \"on\"\n\
             [observability]\nflow_log_interval = 10\n",
            underlay_ip(i)
        )
    };
    let plain = format!("advertise_api = \"http://{}:{UNDERLAY_PORT}\"\n", underlay_ip(2));
    let fleet = Fleet::start_with_host_configs(&[&tls(0), &tls(1), &plain]);
    let (a, b, c) = (fleet.host(0), fleet.host(1), fleet.host(2));
    let token = fleet.admin_token();
    let stop = Arc::new(AtomicBool::new(false));
    let mut listeners = Listeners { stop: stop.clone(), threads: Vec::new() };

    // host-a and host-b are reached on the underlay through a forwarder to their API.
    let target_b = Arc::new(AtomicU16::new(port_of(&b.api)));
    for (i, h, target) in
        [(0, a, Arc::new(AtomicU16::new(port_of(&a.api)))), (1, b, target_b.clone())]
    {
        let bind = SocketAddr::from((underlay_ip(i), UNDERLAY_PORT));
        listeners.threads.push(forward(h.netns(), bind, target, stop.clone()));
    }
    // At host-c's registered plain-HTTP address: a listener that records what it is sent.
    let at_c = Arc::new(Received::default());
    {
        let into = at_c.clone();
        let bind = SocketAddr::from((underlay_ip(2), UNDERLAY_PORT));
        listeners.threads.push(accept_loop(c.netns(), bind, stop.clone(), move |s| {
            into.connections.fetch_add(1, Ordering::Relaxed);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            record(s, &into);
        }));
    }

    let url_a = a.api.url().replace("http://", "https://");
    let ca_a = a.state_dir().join("tls/api.crt");
    let at_a = |args: &[&str]| verse_at(a.netns(), &url_a, &ca_a, &token, args);
    let healthy = || {
        let out = at_a(&["-o", "json", "host", "list"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|hs| {
                // Healthy (alive) and registered (its address recorded: a host keeps its
                // liveness record before its registration, an edit, is in etcd), so that no
                // registration edit races the test's own.
                hs.as_array().is_some_and(|hs| {
                    hs.len() == 3
                        && hs
                            .iter()
                            .all(|h| h["healthy"] == Value::Bool(true) && h["api"].is_string())
                })
            })
    };
    assert!(wait_until(Duration::from_secs(30), healthy), "the fleet is healthy");
    // Each TLS host registered the fingerprint of the certificate it serves; host-c none.
    let hosts = json_of(&at_a(&["-o", "json", "host", "list"]));
    let host_b = hosts.as_array().unwrap().iter().find(|h| h["name"] == "host-b").unwrap();
    let b_cert = std::fs::read_to_string(b.state_dir().join("tls/api.crt")).unwrap();
    let b_der = pem_der(&b_cert);
    assert_eq!(host_b["api_fingerprint"], verse::tls::fingerprint(&b_der), "{hosts:#}");
    assert_eq!(host_b["api"], format!("https://{}:{UNDERLAY_PORT}", underlay_ip(1)));
    let host_c = hosts.as_array().unwrap().iter().find(|h| h["name"] == "host-c").unwrap();
    assert!(host_c.get("api_fingerprint").is_none(), "{hosts:#}");

    // A universe with an endpoint on host-a and one on host-b with flow logs on; the default
    // group admits its own members.
    let uni = id(&json_of(&at_a(&[
        "-o",
        "json",
        "universe",
        "create",
        "relay",
        "--cidr",
        "10.46.0.0/24",
    ])));
    let mk = |host: &str, ip: &str| {
        let ns = Netns::new("w");
        let ep = json_of(&at_a(&[
            "-o",
            "json",
            "endpoint",
            "create",
            "--universe",
            &uni,
            "--netns",
            ns.name(),
            "--ip",
            ip,
            "--host",
            host,
            "--flow-logs",
        ]));
        (ns, ep)
    };
    let (ns_x, x) = mk("host-a", "10.46.0.10");
    let (ns_y, y) = mk("host-b", "10.46.0.20");
    let _sink = ns_y.enter(|| UdpSocket::bind("10.46.0.20:7000")).unwrap();
    let sock = ns_x.enter(|| UdpSocket::bind("10.46.0.10:7100")).unwrap();
    let sent = wait_until(Duration::from_secs(20), || {
        sock.send_to(b"across", ("10.46.0.20", 7000)).is_ok() && {
            let out = at_a(&["-o", "json", "flow-logs", "--endpoint", &id(&y)]);
            out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout)
                    .is_ok_and(|rs| rs.as_array().is_some_and(|rs| !rs.is_empty()))
        }
    }) || wait_until(Duration::from_secs(25), || {
        let out = at_a(&["-o", "json", "flow-logs", "--endpoint", &id(&y)]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|rs| rs.as_array().is_some_and(|rs| !rs.is_empty()))
    });
    // host-b's records of its endpoint, read through host-a's CLI and API (relayed with the
    // caller's token over TLS pinned to host-b's registered certificate).
    let records = json_of(&at_a(&["-o", "json", "flow-logs", "--endpoint", &id(&y)]));
    assert!(sent, "records of host-b's endpoint through host-a: {records:#}");
    let rec = &records[0];
    assert_eq!(rec["host"], "host-b", "{rec:#}");
    assert_eq!(rec["endpoint"], id(&y).as_str(), "{rec:#}");
    assert_eq!(rec["action"], "ACCEPT", "{rec:#}");
    assert_eq!(
        (rec["srcaddr"].clone(), rec["dstport"].clone()),
        (json!("10.46.0.10"), json!(7000))
    );
    let table = at_a(&["flow-logs", "--endpoint", &id(&y)]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(String::from_utf8_lossy(&table.stdout).contains("ACCEPT"), "{}", stderr(&table));

    // The trace of a packet from host-a to host-b, both hops, with no --host-api: host-a's API
    // relays host-b's part to host-b.
    let x_id = id(&x);
    let trace_x_to_y =
        ["trace", "--from", &x_id, "--to", "10.46.0.20", "--protocol", "udp", "--port", "7000"];
    let traced = json_of(&at_a(&[&["-o", "json"][..], &trace_x_to_y].concat()));
    let hops = traced["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 2, "{traced:#}");
    assert_eq!(
        (hops[0]["host"].clone(), hops[0]["verdict"]["action"].clone()),
        (json!("host-a"), json!("wrap"))
    );
    assert_eq!(
        (hops[1]["host"].clone(), hops[1]["verdict"]["action"].clone()),
        (json!("host-b"), json!("deliver"))
    );
    assert_eq!(traced["untraced"], json!([]), "{traced:#}");

    // host-c's plain-HTTP address was never contacted: a token is not sent in the clear.
    let events =
        at_a(&["-o", "json", "monitor", "--host", "host-c", "--recent", "10", "--no-follow"]);
    let text = format!("{}{}", String::from_utf8_lossy(&events.stdout), stderr(&events));
    assert!(text.contains("plain HTTP"), "host-c is reported, and why: {text}");

    // Another server at host-b's registered address, with a certificate of its own: the
    // handshake is refused and it reads not a byte of any request.
    let dir = TempDir::new("imp");
    let (imp, _) = verse::tls::ServerTls::self_signed(dir.path(), &[underlay_ip(1).to_string()])
        .expect("a certificate of the impostor's own");
    assert_ne!(imp.fingerprint, verse::tls::fingerprint(&b_der));
    let at_imp = Arc::new(Received::default());
    let imp_port = unique_port();
    {
        let into = at_imp.clone();
        let config = imp.config.clone();
        let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, imp_port));
        listeners.threads.push(accept_loop(b.netns(), bind, stop.clone(), move |s| {
            into.connections.fetch_add(1, Ordering::Relaxed);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else { return };
            let mut tls = rustls::StreamOwned::new(conn, s);
            record(&mut tls, &into);
            let _ = tls.flush();
        }));
    }
    target_b.store(imp_port, Ordering::Relaxed);
    let out = at_a(&["-o", "json", "flow-logs", "--endpoint", &id(&y)]);
    assert!(
        !out.status.success(),
        "an impostor's answer is not taken: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr(&out).contains("host-b"), "{}", stderr(&out));
    assert!(stderr(&out).contains("fingerprint"), "the certificate is named: {}", stderr(&out));
    let out = at_a(&trace_x_to_y);
    assert!(!out.status.success(), "host-b's hop is not traced by an impostor");
    assert!(
        at_imp.connections.load(Ordering::Relaxed) >= 1,
        "the relay did go to host-b's registered address"
    );
    std::thread::sleep(Duration::from_millis(500));
    let got = at_imp.bytes.lock().unwrap().clone();
    assert!(got.is_empty(), "the impostor read: {:?}", String::from_utf8_lossy(&got));
    assert!(!String::from_utf8_lossy(&got).contains(&token));
    assert_eq!(at_c.connections.load(Ordering::Relaxed), 0, "host-c's address got no connection");
    assert!(at_c.bytes.lock().unwrap().is_empty());

    // host-b's own API again: the relay works again.
    target_b.store(port_of(&b.api), Ordering::Relaxed);
    let again = at_a(&["-o", "json", "flow-logs", "--endpoint", &id(&y)]);
    assert!(again.status.success(), "{}", stderr(&again));
    drop(listeners);
    drop((ns_x, ns_y));
}

/// The port of an API's loopback listener.
fn port_of(api: &Api) -> u16 {
    api.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("http://127.0.0.1:PORT")
}

/// The DER of the first certificate of a PEM text.
fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .as_ref()
        .to_vec()
}
