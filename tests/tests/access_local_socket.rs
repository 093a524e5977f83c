//! The local unix socket of a real `versed` (S15): root on the host gets in without a token, as
//! `local-root`, an admin; any other user cannot connect (the socket is mode 0600), and if the
//! socket's mode were loosened, the daemon still refuses a peer that is not uid 0 (it reads the
//! peer's credentials from the socket). Over TCP the same request without a token is a 401.
//! The first admin token is in the state directory, mode 0600, in a directory only root can
//! enter. The socket is served with the same connection limits as TCP: the cap and the
//! deadlines hold there too.
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::*;

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// `verse --api unix:<socket> ARGS` as `uid`, with nothing from the caller's environment.
fn verse_on_socket(socket: &Path, uid: u32, args: &[&str]) -> Output {
    let config = TempDir::new("c");
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(bin_dir().join("verse"));
    for var in ["VERSE_API", "VERSE_TOKEN", "VERSE_CONTEXT", "VERSE_CONFIG"] {
        cmd.env_remove(var);
    }
    cmd.env("XDG_CONFIG_HOME", config.path())
        .arg("--api")
        .arg(format!("unix:{}", socket.display()))
        .args(args);
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run verse")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn root_gets_in_on_the_local_socket_and_no_one_else_does() {
    assert!(is_root(), "this test runs as root (cargo xtask test)");
    let host = Host::start();
    let socket = host.versed.socket();
    assert_eq!(mode(&socket), 0o600, "the socket is root's only");
    assert_eq!(mode(host.state_dir()), 0o700, "the state directory is root's only");
    assert_eq!(mode(&host.state_dir().join("admin.token")), 0o600);

    // Root, no token: local-root, an admin.
    let out = verse_on_socket(
        &socket,
        0,
        &["-o", "json", "universe", "create", "blue", "--cidr", "10.7.0.0/24"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trail = host.api.get("/v1/audit").json();
    let last = trail.as_array().unwrap().last().cloned().unwrap();
    assert_eq!(last["principal"], "local-root");
    assert!(last["source"].as_str().unwrap().starts_with("unix (uid 0, pid "), "{last}");

    // The same request over TCP without a token: 401.
    let r = host.api.with_token(None).get("/v1/universes");
    assert_eq!(r.status, 401, "{}", r.body);

    // Another user, with the directory opened up so that only the socket's own mode stands in
    // the way: it cannot connect.
    std::fs::set_permissions(host.state_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = verse_on_socket(&socket, NOBODY, &["universe", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "nobody got in: {err}");
    assert!(err.contains("Permission denied"), "{err}");

    // Even with the socket opened to all (a mistake), the daemon refuses a peer that is not
    // root: it asks the socket who is calling.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = verse_on_socket(&socket, NOBODY, &["universe", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "nobody got in: {err}");
    assert!(err.contains("root only") && err.contains("65534"), "{err}");
    let out =
        verse_on_socket(&socket, NOBODY, &["universe", "create", "x", "--cidr", "10.8.0.0/24"]);
    assert_eq!(out.status.code(), Some(1));
    // That refusal is in the trail, with the peer's uid.
    let trail = host.api.get("/v1/audit").json();
    let last = trail.as_array().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last["status"].as_u64(), last["principal"].as_str()),
        (Some(401), Some("unauthenticated"))
    );
    assert!(last["source"].as_str().unwrap().starts_with("unix (uid 65534"), "{last}");
    assert_eq!(last["detail"], "local_socket_not_root");
    std::fs::set_permissions(host.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();

    // A restarted daemon replaces its socket, root's only again, and keeps its admin token.
    let mut host = host;
    host.versed.restart();
    assert_eq!(mode(&socket), 0o600);
    let out = verse_on_socket(&socket, 0, &["-o", "json", "universe", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(host.api.get("/v1/universes").status, 200, "the admin token still works");
}

#[test]
fn the_local_socket_has_the_connection_cap_and_deadlines_of_tcp() {
    const CAP: usize = 16;
    let host = Host::start_with_config(Some(&format!(
        "[api]\nmax_connections = {CAP}\nheader_timeout = 2\nidle_timeout = 3\n"
    )));
    let socket = host.versed.socket();
    let pid = host.versed.pid().expect("versed runs");
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let before = fds();

    // Twice the cap, connected and silent: the oldest are closed to make room, and root still
    // gets in.
    let mut idle: Vec<UnixStream> = (0..2 * CAP)
        .map(|i| UnixStream::connect(&socket).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert!(
        wait_until(Duration::from_secs(2), || {
            idle.iter_mut().map(closed_by_server).filter(|c| *c).count() >= CAP
        }),
        "connections over the cap are closed"
    );
    let closed = idle.iter_mut().map(closed_by_server).filter(|c| *c).count();
    assert!(closed <= CAP + 1, "{closed} closed: only those over the cap (and one for the next)");
    assert!(fds() <= before + CAP + 8, "versed holds {} descriptors (had {before})", fds());
    let out = verse_on_socket(&socket, 0, &["-o", "json", "universe", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(idle);

    // A head sent a byte at a time is cut off at header_timeout.
    let mut slow = UnixStream::connect(&socket).unwrap();
    let head = b"GET /v1/universes HTTP/1.1\r\nHost: verse\r\nX-Slow: ";
    let start = Instant::now();
    let mut cut_at = None;
    for i in 0..150 {
        let byte = head.get(i).copied().unwrap_or(b'a');
        if slow.write_all(&[byte]).is_err() || closed_by_server(&mut slow) {
            cut_at = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_at = cut_at.expect("a head trickling in for 15 s must be cut off");
    eprintln!("local socket: slow head cut off after {cut_at:?} (header_timeout 2 s)");
    assert!(
        cut_at >= Duration::from_millis(1500) && cut_at < Duration::from_millis(4500),
        "cut off after {cut_at:?}, expected about 2 s"
    );

    // A keep-alive connection, served, then idle: closed after idle_timeout.
    let mut kept = UnixStream::connect(&socket).unwrap();
    kept.write_all(b"GET /v1/universes HTTP/1.1\r\nHost: verse\r\n\r\n").unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "root is served");
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || closed_by_server(&mut kept)));
    let idle_cut = start.elapsed();
    assert!(
        idle_cut >= Duration::from_millis(2500) && idle_cut < Duration::from_millis(5500),
        "idle connection cut after {idle_cut:?}, expected about 3 s"
    );
}
