//! No client can stall or break the daemon: the attacks of a client on the API's server, with
//! real sockets against a real versed. Idle connections beyond the cap, a head sent a byte at a
//! time, a burst of writes, a body over the limit, and a request with 40,000 CIDRs: each is
//! contained, and a valid edit made meanwhile succeeds quickly. Every test prints its figures.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tests::*;
use verse::model::Role;

fn port(host: &Host) -> u16 {
    host.api.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the API URL")
}

fn addr(host: &Host) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port(host)))
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Raises this test process's open-file limit to its hard limit (to hold thousands of sockets).
fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the valid struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// A valid edit, timed.
fn timed_edit(host: &Host, name: &str) -> (Response, Duration) {
    let start = Instant::now();
    let r = host
        .api
        .request(
            "POST",
            "/v1/universes",
            Some(&json!({"name": name, "cidr": "10.9.0.0/16"})),
            Duration::from_secs(30),
        )
        .expect("the edit gets an answer");
    (r, start.elapsed())
}

#[test]
fn idle_connections_twice_the_cap_neither_exhaust_descriptors_nor_stall_a_valid_edit() {
    let own_limit = raise_own_fd_limit();
    const CAP: usize = 1024; // api.max_connections, the default
                             // Deadlines long enough that only the cap closes connections here.
    let host = Host::start_with_config(Some("[api]\nheader_timeout = 120\nidle_timeout = 120\n"));
    let pid = host.versed.pid().expect("versed runs");
    let before = fd_count(pid);
    let target = addr(&host);
    assert!(own_limit > 2 * CAP as u64 + 100, "the test needs {} descriptors", 2 * CAP + 100);

    // 2x the cap, connected and silent, as fast as they go; versed's descriptors sampled all
    // along.
    let start = Instant::now();
    let mut most = before;
    let mut idle: Vec<TcpStream> = host.netns().enter(|| {
        (0..2 * CAP)
            .map(|i| {
                if i % 64 == 0 {
                    most = most.max(fd_count(pid));
                }
                TcpStream::connect_timeout(&target, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            })
            .collect()
    });
    let opened_in = start.elapsed();
    // Every connection was accepted: at the cap, the oldest idle ones were closed to make room.
    let all_accepted = wait_until(Duration::from_secs(20), || {
        idle.iter_mut().map(closed_by_server).filter(|c| *c).count() >= CAP
    });
    let closed = idle.iter_mut().map(closed_by_server).filter(|c| *c).count();
    let during = fd_count(pid);
    most = most.max(during);

    let (r, took) = timed_edit(&host, "under-load");
    assert_eq!(
        r.status,
        201,
        "a valid edit while {} idle connections are held: {}",
        2 * CAP,
        r.body
    );
    eprintln!(
        "connections held: {} opened in {opened_in:?}; closed by versed to make room: {closed}; \
         versed's descriptors: {before} before, {during} with them held, at most {most} \
         (cap {CAP}); valid edit: {} in {took:?}",
        2 * CAP,
        r.status
    );
    assert!(all_accepted, "only {closed} of the {} connections over the cap were closed", CAP);
    assert!(closed <= CAP + 8, "{closed} closed: more than the connections over the cap");
    // A connection told to close to make room stays counted until its task has closed its
    // socket, so versed never holds more than the cap, however late that task runs (a busy
    // machine once let it reach cap + 148); the slack is for the daemon's own files.
    assert!(
        most <= before + CAP + 8,
        "versed held {most} descriptors with the cap at {CAP} (it had {before})"
    );
    assert!(during >= before + CAP - 8, "the {CAP} newest connections are held: {during}");
    assert!(took < Duration::from_secs(2), "the valid edit took {took:?}");
    // The daemon is fine afterwards, and its state file was written (no EMFILE).
    drop(idle);
    assert_eq!(host.api.get("/v1/universes").json().as_array().map(Vec::len), Some(1));
    assert!(host.state_dir().join("state.json").is_file());
}

#[test]
fn a_head_sent_a_byte_at_a_time_and_an_idle_connection_are_cut_off_at_their_timeouts() {
    let host = Host::start_with_config(Some("[api]\nheader_timeout = 2\nidle_timeout = 3\n"));
    let target = addr(&host);

    // Slow loris: a head that never ends, one byte every 100 ms.
    let mut slow = host.netns().enter(|| TcpStream::connect(target)).unwrap();
    let start = Instant::now();
    let head = b"GET /v1/universes HTTP/1.1\r\nHost: verse\r\nX-Slow: ";
    let mut sent = 0usize;
    let mut cut_at = None;
    while start.elapsed() < Duration::from_secs(15) {
        let byte = head.get(sent).copied().unwrap_or(b'a');
        if slow.write_all(&[byte]).is_err() || closed_by_server(&mut slow) {
            cut_at = Some(start.elapsed());
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_at = cut_at.expect("a head trickling in for 15 s must be cut off");
    eprintln!("slow-loris head cut off after {cut_at:?} ({sent} bytes sent; header_timeout 2 s)");
    assert!(
        cut_at >= Duration::from_millis(1500) && cut_at < Duration::from_millis(4500),
        "cut off after {cut_at:?}, expected about 2 s"
    );

    // A connection that never sends anything: the same deadline.
    let mut silent = host.netns().enter(|| TcpStream::connect(target)).unwrap();
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || closed_by_server(&mut silent)));
    let silent_cut = start.elapsed();
    assert!(silent_cut < Duration::from_millis(4500), "silent connection cut after {silent_cut:?}");

    // Keep-alive: a request answered, then nothing: closed after the idle timeout.
    let mut kept = host.netns().enter(|| TcpStream::connect(target)).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: verse\r\n\r\n").unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || closed_by_server(&mut kept)));
    let idle_cut = start.elapsed();
    eprintln!("silent connection cut after {silent_cut:?}; idle keep-alive cut after {idle_cut:?} (idle_timeout 3 s)");
    assert!(
        idle_cut >= Duration::from_millis(2500) && idle_cut < Duration::from_millis(5500),
        "idle connection cut after {idle_cut:?}, expected about 3 s"
    );

    // Meanwhile the API served everyone else.
    let (r, took) = timed_edit(&host, "after-loris");
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(took < Duration::from_secs(2));
}

/// One HTTP/1.1 request from `src` (an address of the namespace) to `target`, with
/// `Authorization: Bearer <token>` when a token is given.
fn request_from(
    ns: &Netns,
    src: Ipv4Addr,
    target: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> Response {
    let stream = ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        rt.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::from((src, 0)))?;
            sock.connect(target).await?.into_std()
        })
    });
    let mut stream = stream.unwrap_or_else(|e| panic!("connect from {src}: {e}"));
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: verse\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_http_response(&raw).unwrap()
}

/// The Retry-After of a 429, checked: code `rate_limited`, 1 or 2 s at 2 writes a second.
fn retry_after(r: &Response) -> u64 {
    assert_eq!(r.error_code(), "rate_limited", "{}", r.body);
    let after: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
    assert!((1..=2).contains(&after), "Retry-After {after}");
    after
}

#[test]
fn a_burst_beyond_a_principals_rate_gets_429_while_other_principals_are_served() {
    let host = Host::start_with_config(Some(
        "[api]\nwrite_rate = 2\nwrite_burst = 5\nread_rate = 50\nread_burst = 50\n",
    ));
    let target = addr(&host);
    host.netns().ip(&["addr", "add", "127.0.0.2/8", "dev", "lo"]);
    let me = Ipv4Addr::LOCALHOST;
    let other = Ipv4Addr::new(127, 0, 0, 2);
    // Two principals besides the first admin (whose writes make them).
    let (a, b) =
        (host.api.create_token(Role::Admin, None), host.api.create_token(Role::Admin, None));
    let (a, b) = (a.token, b.token);

    // 20 writes of principal a as fast as they go (invalid ones, answered 400 when served).
    let burst: Vec<Response> = (0..20)
        .map(|_| request_from(host.netns(), me, target, Some(&a), "POST", "/v1/universes", "{}"))
        .collect();
    // From another address right after, it is the same principal: limited too.
    let moved = request_from(host.netns(), other, target, Some(&a), "POST", "/v1/universes", "{}");
    let served = burst.iter().filter(|r| r.status == 400).count();
    let limited: Vec<&Response> = burst.iter().filter(|r| r.status == 429).collect();
    eprintln!(
        "burst of 20 writes of one principal (write_rate 2/s, burst 5): {served} served, {} \
         answered 429 (Retry-After {:?} s)",
        limited.len(),
        limited.iter().filter_map(|r| r.header("retry-after")).collect::<Vec<_>>()
    );
    assert_eq!(served + limited.len(), 20, "only 400s and 429s: {burst:?}");
    assert!(
        (5..=7).contains(&served),
        "the burst of 5 (and what refilled) is served, not {served}"
    );
    let afters: Vec<u64> = limited.iter().map(|r| retry_after(r)).collect();
    let after = *afters.last().expect("some 429s");
    let a_id = format!("tok-{}", a.split('_').nth(1).unwrap());
    assert!(limited[0].error_message().contains(&a_id), "names the principal: {}", limited[0].body);
    assert_eq!(moved.status, 429, "a principal's limit follows it: {}", moved.body);
    retry_after(&moved);

    // Its reads are counted apart.
    let read = request_from(host.netns(), me, target, Some(&a), "GET", "/v1/universes", "");
    assert_eq!(read.status, 200, "{}", read.body);

    // Another principal on the same address is not limited.
    let theirs = request_from(host.netns(), me, target, Some(&b), "POST", "/v1/universes", "{}");
    assert_eq!(theirs.status, 400, "another principal is not limited: {}", theirs.body);
    let valid = json!({"name": "theirs", "cidr": "10.3.0.0/16"}).to_string();
    let theirs = request_from(host.netns(), me, target, Some(&b), "POST", "/v1/universes", &valid);
    assert_eq!(theirs.status, 201, "{}", theirs.body);

    // Requests without a principal count against their address: a flood of no token, or of a
    // forged secret naming b's token id, is limited there and costs b nothing.
    let b_id = b.split('_').nth(1).expect("vt_<id>_<secret>");
    let forged = format!("vt_{b_id}_{}", "0".repeat(64));
    let flood: Vec<u16> = (0..20)
        .map(|i| {
            let t = if i % 2 == 0 { None } else { Some(forged.as_str()) };
            request_from(host.netns(), other, target, t, "POST", "/v1/universes", "{}").status
        })
        .collect();
    let refused = flood.iter().filter(|s| **s == 401).count();
    let flood_limited = flood.iter().filter(|s| **s == 429).count();
    eprintln!(
        "flood of 20 writes without a valid token from one address: {refused} answered 401, \
         {flood_limited} answered 429"
    );
    assert_eq!(refused + flood_limited, 20, "only 401s and 429s: {flood:?}");
    assert!((5..=7).contains(&refused), "the address's burst of 5 is answered 401: {flood:?}");
    let theirs = request_from(host.netns(), other, target, Some(&b), "POST", "/v1/universes", "{}");
    assert_eq!(theirs.status, 400, "b is not limited by a flood naming it: {}", theirs.body);

    // After Retry-After, the limited principal is served again.
    std::thread::sleep(Duration::from_secs(after));
    let again = request_from(host.netns(), me, target, Some(&a), "POST", "/v1/universes", "{}");
    assert_eq!(again.status, 400, "served again after Retry-After: {}", again.body);
    // The audit trail holds the refused writes, under the principal (the rate limit is
    // inside authentication) and the address's, under `unauthenticated`.
    let trail = host.api.get("/v1/audit").json();
    let records = trail.as_array().expect("the trail");
    let count = |principal: &str, status: u64| {
        records.iter().filter(|r| r["principal"] == principal && r["status"] == status).count()
    };
    assert_eq!(count(&a_id, 429), limited.len() + 1, "a's 429s are audited as a's");
    assert_eq!(count(&a_id, 400), served + 1, "and its served writes");
    let unauthenticated: Vec<u64> = records
        .iter()
        .filter(|r| r["principal"].as_str().is_some_and(|p| p.starts_with("unauthenticated")))
        .filter_map(|r| r["status"].as_u64())
        .collect();
    assert_eq!(
        unauthenticated.len(),
        20,
        "every write of the flood is audited: {unauthenticated:?}"
    );
}

#[test]
fn a_body_over_the_limit_gets_413_before_it_is_read_or_as_soon_as_it_is_over() {
    let host = Host::start(); // api.max_body_bytes: 1 MiB
    let target = addr(&host);
    const LIMIT: usize = 1 << 20;
    // A body is only ever read for a principal within its rate: these are the admin's.
    let auth = format!("Authorization: Bearer {}\r\n", host.api.token().expect("the admin token"));

    // Announced too long: refused from the head, before any of it is sent.
    let mut s = host.netns().enter(|| TcpStream::connect(target)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/universes HTTP/1.1\r\nHost: verse\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 * LIMIT
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_http_response(&raw).expect("an HTTP answer");
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.error_code(), "payload_too_large");
    assert!(r.error_message().contains("body"), "{}", r.body);

    // Chunked, no length announced: refused once more than the limit has arrived.
    let mut s = host.netns().enter(|| TcpStream::connect(target)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let head = format!("POST /v1/universes HTTP/1.1\r\nHost: verse\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..40 {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if writer.write_all(&framed).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let _ = sender.join();
    let r = parse_http_response(&raw).expect("an HTTP answer");
    assert_eq!(r.status, 413, "{}", r.body);

    // Just under the limit: read whole and judged by the handler (a name too long is a 400).
    let name = "n".repeat(LIMIT - 100);
    let r = host.api.post("/v1/universes", &json!({"name": name, "cidr": "10.0.0.0/16"}));
    assert_eq!(r.status, 400, "{}", &r.body[..r.body.len().min(200)]);
    assert!(r.error_message().starts_with("name:"));
    // And the daemon serves on.
    let (r, _) = timed_edit(&host, "after-413");
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn forty_thousand_cidrs_are_validated_quickly_and_do_not_delay_a_concurrent_edit() {
    let host = Host::start();
    let small = host.api.create_universe("small", "10.200.0.0/16");
    let small_id = small["id"].as_str().unwrap().to_owned();
    // 40,000 disjoint /30s in 10.0.0.0/12, shuffled by a fixed stride.
    let cidrs: Vec<String> = (0..40_000u32)
        .map(|i| (i * 7919) % 40_000)
        .map(|i| format!("{}/30", Ipv4Addr::from(0x0a00_0000 + i * 4)))
        .collect();
    let body = json!({"name": "big", "cidrs": cidrs});
    assert!(body.to_string().len() < 1 << 20, "fits the default body limit");

    // Small edits every 20 ms while the big one is in flight; each timed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let editor = {
        let api = host.api.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut times = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                let r = api
                    .request(
                        "POST",
                        "/v1/security-groups",
                        Some(&json!({"universe": small_id, "name": format!("g{i}")})),
                        Duration::from_secs(60),
                    )
                    .expect("an answer");
                assert_eq!(r.status, 201, "{}", r.body);
                times.push((start, start.elapsed()));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            times
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let r =
        host.api.request("POST", "/v1/universes", Some(&body), Duration::from_secs(120)).unwrap();
    let big_took = start.elapsed();
    let big_end = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let times = editor.join().expect("the small editor");
    assert_eq!(r.status, 201, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(r.json()["cidrs"].as_array().map(Vec::len), Some(40_000));
    // The small edits that started while the big one was in flight.
    let during: Vec<Duration> =
        times.iter().filter(|(s, _)| *s >= start && *s < big_end).map(|(_, d)| *d).collect();
    let worst = during.iter().max().copied().unwrap_or_default();
    let typical = {
        let mut all: Vec<Duration> = times.iter().map(|(_, d)| *d).collect();
        all.sort();
        all[all.len() / 2]
    };
    eprintln!(
        "40,000-CIDR universe created in {big_took:?}; {} small edits during it, the slowest \
         {worst:?} (median of all {} small edits: {typical:?})",
        during.len(),
        times.len()
    );
    assert!(big_took < Duration::from_secs(3), "the 40,000-CIDR request took {big_took:?}");
    assert!(!during.is_empty(), "small edits ran while the big one was in flight");
    assert!(worst < Duration::from_secs(1), "a small edit waited {worst:?}");
}
