//! Fleet harness: several Verse hosts joined by an IP underlay and sharing one etcd, and the
//! one etcd launcher of the tests ([`Etcd`]: the fleet's three members, or one member on
//! loopback for tests of the store alone, maybe over TLS).
//!
//! Contract (the same as the rest of the harness): every namespace, daemon, data directory and
//! interface made here is owned by a guard whose `Drop` removes it, also while a failing test
//! unwinds; names carry the per-run prefix ([`crate::unique_name`]); every wait is a bounded poll.
//!
//! The network ([`Fleet::start`]):
//!
//! ```text
//!   underlay namespace <prefix>-u: bridge br0 198.18.0.254/24, and three etcd members on
//!   198.18.0.251-253 (one process each, a real three-member cluster)
//!     ├── veth ── host namespace 1: ul0 198.18.0.1/24, versed --underlay ul0 --store etcd://…
//!     ├── veth ── host namespace 2: ul0 198.18.0.2/24, versed …
//!     ├── …
//!     └── veth ── extra underlay nodes ([`Fleet::underlay_node`]), e.g. a forger of packets
//! ```
//!
//! Every host is started with the same operator-given admin token (`--admin-token-file`,
//! [`Fleet::admin_token`]): the first host registers it in etcd, the others find it there, and
//! every host's [`Api`] sends it.
//!
//! Nothing here is connected to the machine's own namespace: the underlay is a closed bridge,
//! so no test packet can leave for the real network. Workloads are plugged through the API of
//! any host and placed on any host ([`Fleet::endpoint_via`]), as the fleet's contract allows.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{
    bad, frames, http_request, tcp_roundtrip,
    traffic::{accept_loop, accept_loop_on},
    unique_name, unique_port, wait_until, Api, Host, Netns, RawIpSocket, Stopper, TcpServer,
    TempDir, Value, Workload, ALLOWED,
};

/// The address of the underlay bridge itself in the underlay namespace.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// The addresses of the three etcd members on the underlay bridge (each member listens for
/// clients on 2379 and for its peers on 2380 of its own address).
pub const ETCD_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 251),
    Ipv4Addr::new(198, 18, 0, 252),
    Ipv4Addr::new(198, 18, 0, 253),
];

/// The name of the underlay interface in every host namespace (not `eth0`, which is the name
/// of every workload's interface).
pub const UNDERLAY_IFACE: &str = "ul0";

/// The bridge inside the underlay namespace (a private namespace, so the name cannot collide).
const BRIDGE: &str = "br0";

/// The underlay address of host `i` (counting from 0): 198.18.0.<i+1>, below the etcd members'.
pub fn underlay_ip(i: usize) -> Ipv4Addr {
    let last = u8::try_from(i + 1).ok().filter(|n| *n < 251).expect("at most 250 hosts");
    Ipv4Addr::new(198, 18, 0, last)
}

/// How long a fleet waits for etcd, the daemons and their registration.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// An etcd cluster (Debian's `etcd`, 3.4), one process per member, each with its data in a
/// temporary directory: the fleet's three members in its underlay namespace ([`Etcd::start`]),
/// or one member on the loopback of the test's own namespace for tests of the store alone
/// ([`Etcd::start_local`], no root needed), maybe serving clients over TLS only
/// ([`Etcd::start_local_tls`]). Members are killed and their directories removed on drop;
/// their logs are printed if the test fails.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<EtcdMember>,
    /// The namespace the members run in; `None`: the test's own.
    netns: Option<String>,
    /// The cluster's name (`--initial-cluster-token`), unique per run.
    token: String,
    tls: Option<EtcdCerts>,
}

#[derive(Debug)]
struct EtcdMember {
    name: String,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    // Dropped after the process is dead (see `Drop`).
    dir: TempDir,
}

/// One member as `etcdctl endpoint status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Position of the member in [`ETCD_IPS`].
    pub index: usize,
    pub member_id: u64,
    /// The member id of the leader this member knows of (0: none).
    pub leader: u64,
    pub raft_term: u64,
    pub db_size: u64,
}

/// PEM files made by a test: a CA, etcd's certificate (for 127.0.0.1) and a client's, both
/// signed by it. Each pair is (certificate, key).
#[derive(Clone, Debug)]
pub struct EtcdCerts {
    pub ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

impl EtcdCerts {
    /// A new CA and its two certificates, written to `dir` with names starting with `tag`.
    pub fn make(dir: &std::path::Path, tag: &str) -> EtcdCerts {
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("etcd CA {tag}"));
        let ca_cert = ca_params.self_signed(&ca_key).expect("a self-signed CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(format!("{tag}-{name}"));
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, name: &str| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let mut params = rcgen::CertificateParams::new(names).expect("leaf parameters");
            params.extended_key_usages = vec![usage];
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer).expect("a certificate signed by the CA");
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let server = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            "etcd",
        );
        let client = leaf(vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth, "host-a");
        EtcdCerts { ca: write("ca.pem", ca_cert.pem()), server, client }
    }
}

/// A loopback port that was free a moment ago (the kernel picks it; etcd binds it right
/// after). Used only outside a namespace of the test's own, where other tests' ports live.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

impl EtcdMember {
    fn new(i: usize, ip: Ipv4Addr, ports: (u16, u16)) -> EtcdMember {
        EtcdMember {
            name: format!("etcd-{i}"),
            ip,
            client_port: ports.0,
            peer_port: ports.1,
            child: None,
            log_path: PathBuf::new(),
            dir: TempDir::new("e"),
        }
    }

    fn client_url(&self, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(no log at {}: {e})", self.log_path.display()))
    }
}

impl Etcd {
    /// Starts the three members inside `netns` (whose bridge must hold [`ETCD_IPS`]) and waits
    /// (30 s at most) until each says it is healthy (`GET /health`: it has a leader).
    pub fn start(netns: &Netns) -> Etcd {
        let members = ETCD_IPS
            .iter()
            .enumerate()
            .map(|(i, &ip)| EtcdMember::new(i, ip, (ETCD_CLIENT_PORT, ETCD_PEER_PORT)))
            .collect();
        let name = netns.name().to_owned();
        Etcd::launch(Etcd { members, netns: Some(name.clone()), token: name, tls: None })
    }

    /// One member on 127.0.0.1 (ports the kernel picks) in the test's own namespace, for tests
    /// of the store alone; waits until it is healthy.
    pub fn start_local() -> Etcd {
        Etcd::start_local_with(false)
    }

    /// Like [`Etcd::start_local`], serving clients over TLS only, with client certificates
    /// required (`--client-cert-auth`), all signed by a CA made here ([`Etcd::certs`]).
    pub fn start_local_tls() -> Etcd {
        Etcd::start_local_with(true)
    }

    fn start_local_with(tls: bool) -> Etcd {
        let member = EtcdMember::new(0, Ipv4Addr::LOCALHOST, (free_port(), free_port()));
        // The certificates live in the member's directory, as long as it.
        let tls = tls.then(|| EtcdCerts::make(member.dir.path(), "good"));
        Etcd::launch(Etcd { members: vec![member], netns: None, token: unique_name("e"), tls })
    }

    fn launch(mut etcd: Etcd) -> Etcd {
        for i in 0..etcd.members.len() {
            etcd.spawn(i, "new");
        }
        etcd.wait_healthy(Duration::from_secs(30), "start-up");
        etcd
    }

    /// The CA and certificates of a cluster serving TLS ([`Etcd::start_local_tls`]).
    pub fn certs(&self) -> Option<&EtcdCerts> {
        self.tls.as_ref()
    }

    /// `--initial-cluster`: every member by name and peer URL.
    fn initial_cluster(&self) -> String {
        let peers: Vec<String> =
            self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect();
        peers.join(",")
    }

    /// `program`, run in the members' namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self, i: usize, cluster_state: &str) {
        let initial_cluster = self.initial_cluster();
        let mut cmd = self.command("etcd");
        let m = &mut self.members[i];
        m.log_path = m.dir.path().join("etcd.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", m.log_path.display()));
        let err = log.try_clone().expect("dup log fd");
        let (client, peer) = (m.client_url(self.tls.is_some()), m.peer_url());
        cmd.args(["--name", &m.name, "--data-dir"])
            .arg(m.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", cluster_state])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if let Some(c) = &self.tls {
            cmd.arg("--cert-file").arg(&c.server.0).arg("--key-file").arg(&c.server.1);
            cmd.arg("--trusted-ca-file").arg(&c.ca).arg("--client-cert-auth");
        }
        // As for versed: if the test process dies before its guards run, etcd dies with it.
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("failed to start etcd (install the Debian package etcd-server): {e}")
        });
        m.child = Some(child);
    }

    /// Waits until every running member answers `GET /health` with `"true"`.
    fn wait_healthy(&mut self, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            for m in &mut self.members {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    panic!(
                        "etcd member {} exited during {what} ({status}); log:\n{}",
                        m.name,
                        m.log()
                    );
                }
            }
            let running: Vec<usize> =
                (0..self.members.len()).filter(|&i| self.members[i].child.is_some()).collect();
            if running.iter().all(|&i| self.member_healthy(i)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd members did not all report healthy within {timeout:?} ({what}); logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether member `i` says it is healthy: `GET /health` answers `{"health":"true"}` (for a
    /// member outside a namespace or serving TLS, `etcdctl endpoint health` succeeds).
    pub fn member_healthy(&self, i: usize) -> bool {
        let m = &self.members[i];
        let Some(netns) = self.netns.as_deref().filter(|_| self.tls.is_none()) else {
            return self
                .etcdctl_command(&[m.client_url(self.tls.is_some())])
                .args(["--command-timeout=2s", "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        };
        let addr = SocketAddr::from((m.ip, m.client_port));
        http_request(netns, addr, "GET", "/health", None, Duration::from_secs(2))
            .is_ok_and(|r| r.status == 200 && r.body.contains("\"true\""))
    }

    /// Whether every running member is healthy.
    pub fn healthy(&self) -> bool {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .all(|i| self.member_healthy(i))
    }

    /// The directory holding member `i`'s data and log.
    pub fn dir(&self, i: usize) -> &std::path::Path {
        self.members[i].dir.path()
    }

    /// The client endpoint of the first running member, `IP:PORT`.
    pub fn endpoint(&self) -> SocketAddr {
        let m = self.members.iter().find(|m| m.child.is_some()).expect("an etcd member runs");
        SocketAddr::from((m.ip, m.client_port))
    }

    /// Every member's client endpoint, `IP:PORT`.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| SocketAddr::from((m.ip, m.client_port))).collect()
    }

    /// The `--store` URL of versed for this cluster: every member.
    pub fn store_url(&self) -> String {
        let list: Vec<String> = self.endpoints().iter().map(SocketAddr::to_string).collect();
        format!("etcd://{}", list.join(","))
    }

    /// The namespace the members run in (`None`: the test's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The client URLs of the running members.
    fn running_urls(&self) -> Vec<String> {
        let tls = self.tls.is_some();
        self.members.iter().filter(|m| m.child.is_some()).map(|m| m.client_url(tls)).collect()
    }

    /// `etcdctl --endpoints=...` (API v3, with the client certificate over TLS), run in etcd's
    /// namespace.
    fn etcdctl_command(&self, endpoints: &[String]) -> Command {
        let mut cmd = self.command("etcdctl");
        cmd.arg(format!("--endpoints={}", endpoints.join(",")))
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null());
        if let Some(c) = &self.tls {
            cmd.arg("--cacert").arg(&c.ca).arg("--cert").arg(&c.client.0);
            cmd.arg("--key").arg(&c.client.1);
        }
        cmd
    }

    /// `etcdctl ARGS` against every running member, run in etcd's namespace, which must
    /// succeed; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self
            .etcdctl_command(&self.running_urls())
            .args(["--command-timeout=10s"])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("failed to start etcdctl (install the Debian package etcd-client): {e}")
            });
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `etcdctl get --prefix <prefix> --keys-only`: the keys under `prefix` (for tests that
    /// look at what the store holds).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.etcdctl(&["get", "--prefix", "--keys-only", prefix])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `etcdctl endpoint status` of every running member (members that do not answer are left
    /// out).
    pub fn status(&self) -> Vec<MemberStatus> {
        let mut out = Vec::new();
        let tls = self.tls.is_some();
        for (index, m) in self.members.iter().enumerate().filter(|(_, m)| m.child.is_some()) {
            let text = self
                .etcdctl_command(&[m.client_url(tls)])
                .args(["--command-timeout=3s", "endpoint", "status", "-w", "json"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let Some(v) = text.and_then(|t| serde_json::from_str::<Value>(&t).ok()) else {
                continue;
            };
            let s = &v[0]["Status"];
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            out.push(MemberStatus {
                index,
                member_id: n(&s["header"]["member_id"]),
                leader: n(&s["leader"]),
                raft_term: n(&s["raft_term"]),
                db_size: n(&s["dbSize"]),
            });
        }
        out
    }

    /// The member every running member names as leader, by its position in [`ETCD_IPS`], once
    /// they agree (bounded by `timeout`).
    pub fn leader(&self, timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            let st = self.status();
            let running = self.members.iter().filter(|m| m.child.is_some()).count();
            found = st
                .iter()
                .find(|m| m.leader != 0 && m.member_id == m.leader)
                .filter(|l| st.len() == running && st.iter().all(|m| m.leader == l.member_id))
                .map(|l| l.index);
            found.is_some()
        });
        found
    }

    /// Kills member `i` with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        let mut child = m.child.take().expect("etcd member is not running");
        child.kill().unwrap_or_else(|e| panic!("kill etcd member {}: {e}", m.name));
        let _ = child.wait();
    }

    /// Stops member `i` with SIGSTOP, as a starved process looks from outside: its sockets stay
    /// open and accept, nothing answers. The returned guard sends SIGCONT when dropped (also on
    /// a panic), and borrows the cluster, so the member cannot be killed or reaped (its PID
    /// reused) while it is stopped.
    pub fn pause(&self, i: usize) -> PausedMember<'_> {
        let m = &self.members[i];
        let child = m.child.as_ref().expect("etcd member is not running");
        let pid = libc::pid_t::try_from(child.id()).expect("a PID fits pid_t");
        // SAFETY: kill(2) with the PID of a child this harness started and has not reaped
        // (`child` is still held); no memory is involved.
        let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP etcd member {}: {}", m.name, io::Error::last_os_error());
        PausedMember { _etcd: self, pid, name: m.name.clone() }
    }

    /// The `/verse/`-relative history of `prefix` since etcd revision `from`, as `etcdctl watch
    /// --rev` replays it: (`PUT` or `DELETE`, key) per event. A watch never ends by itself:
    /// the replay is read for `listen`, then the etcdctl this started is killed (by its PID).
    pub fn history(&self, prefix: &str, from: i64, listen: Duration) -> Vec<(String, String)> {
        let mut child = self
            .etcdctl_command(&self.running_urls())
            .args(["watch", "--prefix", &format!("--rev={from}"), prefix])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start etcdctl watch: {e}"));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        std::thread::sleep(listen);
        let _ = child.kill();
        let _ = child.wait();
        let text = reader.join().expect("the reader thread does not panic");
        // `etcdctl watch` prints each event as its type, its key and (for a put) its value,
        // one per line.
        let lines: Vec<&str> = text.lines().collect();
        let mut events = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if (*line == "PUT" || *line == "DELETE") && i + 1 < lines.len() {
                events.push(((*line).to_owned(), lines[i + 1].to_owned()));
            }
        }
        events
    }

    /// The current etcd revision (of any running member's answer).
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["get", "--prefix", "/", "--keys-only", "--limit=1", "-w", "json"]);
        let v: Value = serde_json::from_str(&out).expect("etcdctl -w json prints JSON");
        v["header"]["revision"].as_i64().expect("a revision in the header")
    }

    /// Starts member `i` again on its data directory (after [`Etcd::kill`]) and waits until
    /// the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "etcd member {i} is running");
        self.spawn(i, "existing");
        self.wait_healthy(Duration::from_secs(30), "a restart");
    }

    /// Every member's log, the last 60 lines each (etcd is chatty: the end explains a failure).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = m.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            out.push_str(&format!(
                "---- etcd log of {} (last {} lines) ----\n",
                m.name,
                tail.len()
            ));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str("---- end of etcd logs ----\n");
        out
    }
}

/// An etcd member stopped by [`Etcd::pause`]; dropping this resumes it.
#[derive(Debug)]
pub struct PausedMember<'a> {
    _etcd: &'a Etcd,
    pid: libc::pid_t,
    name: String,
}

impl Drop for PausedMember<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child the borrowed `Etcd` still holds (it cannot be
        // reaped while this guard lives); no memory is involved.
        let rc = unsafe { libc::kill(self.pid, libc::SIGCONT) };
        if rc != 0 {
            eprintln!("SIGCONT etcd member {}: {}", self.name, io::Error::last_os_error());
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() || std::env::var_os("VERSE_TEST_SHOW_LOG").is_some() {
            eprintln!("{}", self.logs());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------------

/// Several hosts running `versed` with the etcd store and an underlay interface, joined by a
/// bridge. Field order is drop order: the daemons die (and their namespaces, with the underlay
/// veths, go) first, then etcd, then the underlay namespace.
pub struct Fleet {
    hosts: Vec<Host>,
    /// The bridge-side end of each host's underlay veth, in the underlay namespace.
    ports: Vec<String>,
    etcd: Etcd,
    underlay: Netns,
    /// The MTU every underlay veth gets when plugged (both ends).
    mtu: u32,
    /// Holds `admin.token`, the operator's admin token every host is started with.
    secrets: TempDir,
}

impl Fleet {
    /// `n` hosts named `host-a`, `host-b`, … (see [`Fleet::start_named`]).
    pub fn start(n: usize) -> Fleet {
        assert!((1..=26).contains(&n), "between 1 and 26 hosts");
        let names: Vec<String> =
            (0..n).map(|i| format!("host-{}", (b'a' + i as u8) as char)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Fleet::start_named(&names)
    }

    /// One host per name: the underlay namespace with its bridge and etcd, then for each host
    /// a namespace with `ul0` (198.18.0.<i+1>/24) on the bridge and `versed --store etcd://…
    /// --underlay ul0 --host <name>`. Returns once every host answers its API and every host's
    /// `GET /v1/hosts` lists every host healthy (30 s at most).
    pub fn start_named(names: &[&str]) -> Fleet {
        Fleet::start_named_with_mtu(names, 1500)
    }

    /// `n` hosts as [`Fleet::start`], on an underlay whose every link has `mtu` before any
    /// daemon starts (versed derives its endpoints' MTU from its underlay's when it starts, so
    /// [`Fleet::set_underlay_mtu`] after the start does not change it).
    pub fn start_with_underlay_mtu(n: usize, mtu: u32) -> Fleet {
        assert!((1..=26).contains(&n), "between 1 and 26 hosts");
        let names: Vec<String> =
            (0..n).map(|i| format!("host-{}", (b'a' + i as u8) as char)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Fleet::start_named_with_mtu(&names, mtu)
    }

    /// `n` hosts as [`Fleet::start`], each daemon started with the settings file `config`
    /// (TOML text). Returns once every daemon answers, without waiting for the fleet to be
    /// healthy: with TLS on, the plain-HTTP [`Api`](crate::Api) cannot ask; the caller waits.
    pub fn start_with_config(n: usize, config: &str) -> Fleet {
        assert!((1..=26).contains(&n), "between 1 and 26 hosts");
        let names: Vec<String> =
            (0..n).map(|i| format!("host-{}", (b'a' + i as u8) as char)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut fleet = Fleet::network();
        fleet.start_hosts(&names, Some(config));
        fleet
    }

    /// One host per settings file of `configs` (TOML text), named `host-a`, `host-b`, …, host
    /// `i` at [`underlay_ip`]`(i)`, as [`Fleet::start_with_config`] (no wait for health).
    pub fn start_with_host_configs(configs: &[&str]) -> Fleet {
        assert!((1..=26).contains(&configs.len()), "between 1 and 26 hosts");
        let mut fleet = Fleet::network();
        for (i, config) in configs.iter().enumerate() {
            let name = format!("host-{}", (b'a' + i as u8) as char);
            fleet.start_hosts(&[&name], Some(config));
        }
        fleet
    }

    /// Starts a daemon per name on the fleet's network and etcd, with `config`.
    fn start_hosts(&mut self, names: &[&str], config: Option<&str>) {
        let store = self.etcd.store_url();
        let token_file = self.admin_token_file();
        let token_file = token_file.to_str().expect("a UTF-8 temporary path");
        for name in names {
            let ns = Netns::new("h");
            let port = self.plug(&ns, underlay_ip(self.hosts.len()));
            self.ports.push(port);
            let args =
                ["--store", &store, "--underlay", UNDERLAY_IFACE, "--admin-token-file", token_file];
            let host = Host::start_in(ns, name, config, &args);
            self.hosts.push(host);
        }
    }

    fn start_named_with_mtu(names: &[&str], mtu: u32) -> Fleet {
        let mut fleet = Fleet::network();
        fleet.mtu = mtu;
        fleet.start_hosts(names, None);
        // Asked of every host: a host always lists itself healthy (it answers), so only the
        // others' lists show that its liveness record is in etcd.
        let all_healthy = wait_until(START_TIMEOUT, || {
            (0..fleet.hosts.len()).all(|via| {
                fleet.host_statuses_via(via).is_some_and(|hs| {
                    names.iter().all(|n| {
                        hs.iter().any(|h| h["name"] == *n && h["healthy"] == Value::Bool(true))
                    })
                })
            })
        });
        assert!(
            all_healthy,
            "not every host is listed healthy by every host's GET /v1/hosts within \
             {START_TIMEOUT:?}: {:?}",
            (0..fleet.hosts.len()).map(|via| fleet.host_statuses_via(via)).collect::<Vec<_>>()
        );
        fleet
    }

    /// The underlay namespace with its bridge and the three etcd members, and no host yet.
    pub fn network() -> Fleet {
        let underlay = Netns::new("u");
        underlay.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        for ip in std::iter::once(BRIDGE_IP).chain(ETCD_IPS) {
            underlay.ip(&["addr", "add", &format!("{ip}/24"), "dev", BRIDGE]);
        }
        underlay.ip(&["link", "set", BRIDGE, "up"]);
        let etcd = Etcd::start(&underlay);
        let secrets = TempDir::new("k");
        let token = crate::random_token();
        let file = secrets.path().join("admin.token");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
            writeln!(f, "{token}").unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        }
        Fleet { hosts: Vec::new(), ports: Vec::new(), etcd, underlay, mtu: 1500, secrets }
    }

    /// The file of the operator's admin token that every host is started with.
    pub fn admin_token_file(&self) -> PathBuf {
        self.secrets.path().join("admin.token")
    }

    /// The operator's admin token (valid on every host).
    pub fn admin_token(&self) -> String {
        fs::read_to_string(self.admin_token_file()).expect("the admin token file").trim().to_owned()
    }

    /// Connects `ns` to the bridge: `ul0` with `ip`/24 in `ns`, a port with a unique name in
    /// the underlay namespace, both at the fleet's underlay MTU. Returns the port's name.
    fn plug(&self, ns: &Netns, ip: Ipv4Addr) -> String {
        let port = unique_name("p");
        // Both ends are created directly in their namespaces, so `ul0` never exists in (or
        // collides with anything of) the machine's own namespace.
        crate::run_ok(
            "ip",
            &[
                "link",
                "add",
                UNDERLAY_IFACE,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                self.underlay.name(),
            ],
        );
        // The bridge's own MTU follows its ports' (it was never set by hand).
        let mtu = self.mtu.to_string();
        self.underlay.ip(&["link", "set", &port, "mtu", &mtu, "master", BRIDGE, "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", UNDERLAY_IFACE]);
        ns.ip(&["link", "set", UNDERLAY_IFACE, "mtu", &mtu, "up"]);
        port
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i` (counting from 0): its namespace, daemon and API.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Host `i`, mutably (to stop and restart its daemon).
    pub fn host_mut(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The API of host `i`.
    pub fn api(&self, i: usize) -> &Api {
        &self.hosts[i].api
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The etcd cluster, mutably (to kill and restart members).
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        &mut self.etcd
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Plugs a new workload as an endpoint placed on host `on`, asking the API of host `via`.
    pub fn endpoint_via(
        &self,
        via: usize,
        on: usize,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> Workload {
        self.api(via).create_endpoint(Some(self.host(on).name()), universe, ip, groups)
    }

    /// Plugs a new workload as an endpoint placed on host `on`, through the API of the next
    /// host (so every such call also exercises placement by another host's API).
    pub fn endpoint(&self, on: usize, universe: &str, ip: &str, groups: &[&str]) -> Workload {
        self.endpoint_via((on + 1) % self.len(), on, universe, ip, groups)
    }

    /// A dual-stack workload with IPv4 `ip` and IPv6 `ipv6` in `groups` (none: the universe's
    /// default group), placed on host `on` through the API of the next host.
    pub fn endpoint6(
        &self,
        on: usize,
        universe: &str,
        (ip, ipv6): (&str, &str),
        groups: &[&str],
    ) -> Workload {
        let (w, _) = self.api((on + 1) % self.len()).plug(verse::model::CreateEndpoint {
            universe: universe.into(),
            host: Some(self.host(on).name().to_owned()),
            ip: ip.into(),
            ipv6: Some(ipv6.into()),
            security_groups: (!groups.is_empty())
                .then(|| groups.iter().map(|g| (*g).to_owned()).collect()),
            ..Default::default()
        });
        assert_eq!(w.json["host"], self.host(on).name(), "placed where asked: {}", w.json);
        w
    }

    /// A dual-stack workload ([`Api::create_dual_endpoint`]: `ip` and its IPv6 counterpart)
    /// placed on host `on` through the API of the next host.
    pub fn dual_endpoint(&self, on: usize, universe: &str, ip: &str, groups: &[&str]) -> Workload {
        let via = (on + 1) % self.len();
        let w =
            self.api(via).create_dual_endpoint(Some(self.host(on).name()), universe, ip, groups);
        assert_eq!(w.json["host"], self.host(on).name(), "placed where asked: {}", w.json);
        w
    }

    /// `GET /v1/hosts` asked of host `via`, or `None` if it does not answer.
    fn host_statuses_via(&self, via: usize) -> Option<Vec<Value>> {
        let hosts = self.hosts[via].api.client().list_hosts().ok()?;
        serde_json::to_value(hosts).ok().and_then(|v| v.as_array().cloned())
    }

    /// The entry of host `name` in `GET /v1/hosts` asked of host `via`.
    pub fn host_status(&self, via: usize, name: &str) -> Option<Value> {
        self.api(via).hosts().into_iter().find(|h| h["name"] == name)
    }

    /// Waits (bounded by `timeout`) until `GET /v1/hosts` (asked of host `via`) lists every
    /// host of the fleet healthy with a realized revision of at least `revision` (an API that
    /// does not answer has not).
    pub fn wait_realized(&self, via: usize, revision: u64, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let Some(hs) = self.host_statuses_via(via) else { return false };
            self.hosts.iter().all(|host| {
                hs.iter().any(|h| {
                    h["name"] == host.name()
                        && h["healthy"] == Value::Bool(true)
                        && h["revision"].as_u64().is_some_and(|r| r >= revision)
                })
            })
        })
    }

    /// Sets the MTU of the whole underlay: both ends of every host's veth (the bridge follows
    /// its ports). Endpoints made before keep their MTU, so traffic must discover the path MTU.
    pub fn set_underlay_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        for (host, port) in self.hosts.iter().zip(&self.ports) {
            self.underlay.ip(&["link", "set", port, "mtu", &mtu]);
            host.netns().ip(&["link", "set", UNDERLAY_IFACE, "mtu", &mtu]);
        }
    }

    /// A namespace that is not a host, plugged into the underlay bridge as `ul0` with `ip`
    /// (a machine on the hosts' network that Verse does not know, or a forger of packets).
    /// Deleting the namespace (dropping it) unplugs it.
    pub fn underlay_node(&self, ip: Ipv4Addr) -> Netns {
        let ns = Netns::new("n");
        self.plug(&ns, ip);
        ns
    }
}

// ---------------------------------------------------------------------------------------------
// Edits under etcd faults
// ---------------------------------------------------------------------------------------------

/// The fixture of the tests that break etcd under a fleet while it is edited: three hosts, a
/// universe with the groups `clients` and `web`, a client endpoint in `clients` on host 0 and a
/// server in `web` on host 2. Each edit ([`RuleEditor::add`]) admits `clients` to `web` on one
/// more TCP port, through the API of any host; what was acknowledged must then be on every host
/// ([`RuleBurst::missing`]) and pass traffic ([`RuleBurst::assert_last_rules_pass`]).
///
/// Field order is drop order: the workloads go before the fleet.
pub struct RuleBurst {
    pub client: Workload,
    pub server: Workload,
    /// The id of the group `clients`.
    pub clients: String,
    /// The id of the group `web`, whose ingress rules the edits add.
    pub web: String,
    pub fleet: Fleet,
}

/// One acknowledged edit of a [`RuleBurst`]: the rule it added, on which port, through which
/// host, at which revision, when.
#[derive(Clone, Debug)]
pub struct Acked {
    pub rule: String,
    pub port: u16,
    pub via: usize,
    pub revision: u64,
    pub at: Instant,
}

/// The edits of a [`RuleBurst`] through one host's API.
#[derive(Clone, Debug)]
pub struct RuleEditor {
    api: Api,
    via: usize,
    clients: String,
    web: String,
}

impl RuleEditor {
    /// Admits `clients` to `web` on TCP `port`: what was acknowledged, or why not.
    pub fn add(&self, port: u16) -> Result<Acked, String> {
        let rule = verse::model::CreateRule {
            direction: "ingress".into(),
            protocol: "tcp".into(),
            from_port: Some(port.into()),
            to_port: Some(port.into()),
            group: Some(self.clients.clone()),
            ..Default::default()
        };
        let via = self.via;
        match self.api.client().add_rule(&self.web, &rule) {
            Ok((rule, revision)) => {
                Ok(Acked { rule: rule.id, port, via, revision, at: Instant::now() })
            }
            Err(e) => Err(format!("via {via}: {e}")),
        }
    }
}

impl RuleBurst {
    /// Starts the fleet and makes the universe `name` on `/24` `net` (`10.7.0`: the server is
    /// `.10`, the client `.20`).
    pub fn start(name: &str, net: &str) -> RuleBurst {
        let fleet = Fleet::start(3);
        let api = fleet.api(0);
        let id = |v: Value| v["id"].as_str().expect("resource has an id").to_owned();
        let uni = id(api.create_universe(name, &format!("{net}.0/24")));
        let clients = id(api.create_group(&uni, "clients"));
        let web = id(api.create_group(&uni, "web"));
        let client = fleet.endpoint(0, &uni, &format!("{net}.20"), &[&clients]);
        let server = fleet.endpoint(2, &uni, &format!("{net}.10"), &[&web]);
        RuleBurst { client, server, clients, web, fleet }
    }

    /// What edits through the API of host `via`, to be moved into a thread of its own.
    pub fn editor(&self, via: usize) -> RuleEditor {
        RuleEditor {
            api: self.fleet.api(via).clone(),
            via,
            clients: self.clients.clone(),
            web: self.web.clone(),
        }
    }

    /// What each host's API lacks of `acked` (empty: every host shows every acknowledged
    /// rule), a host that does not answer included.
    pub fn missing(&self, acked: &[Acked]) -> Vec<String> {
        let mut missing = Vec::new();
        for via in 0..self.fleet.len() {
            match self.fleet.api(via).client().get_group(&self.web) {
                Ok(g) => {
                    for a in acked.iter().filter(|a| !g.ingress.iter().any(|r| r.id == a.rule)) {
                        missing.push(format!("host {via} lacks rule {} (via {})", a.rule, a.via));
                    }
                }
                Err(e) => missing.push(format!("host {via}: get group: {e}")),
            }
        }
        missing
    }

    /// Realized means in the dataplane: the last rule acknowledged through each API admits the
    /// client on host 0 to the server on host 2.
    pub fn assert_last_rules_pass(&self, acked: &[Acked]) {
        for via in 0..self.fleet.len() {
            let Some(last) = acked.iter().filter(|a| a.via == via).max_by_key(|a| a.revision)
            else {
                continue;
            };
            let _srv = TcpServer::start(&self.server.ns, last.port, "web");
            assert_eq!(
                tcp_roundtrip(&self.client.ns, self.server.ip, last.port, "x", ALLOWED).as_deref(),
                Some("web:x"),
                "rule {} (port {}, acked via host {via}) does not pass traffic",
                last.rule,
                last.port
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated hosts
// ---------------------------------------------------------------------------------------------

/// `versed --simulate-hosts N` in the underlay namespace, joined to the fleet's etcd: N hosts
/// running the real control plane over in-memory maps (see the README, "Scale"), named
/// `<prefix>0001` …, with underlay addresses in 198.19.0.0/16 that nothing routes. Killed on
/// drop (their leases then lapse); its log is printed if the test fails.
pub struct Simulation {
    child: Option<Child>,
    netns: String,
    port: u16,
    hosts: usize,
    prefix: String,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Fleet {
    /// Starts `hosts` simulated hosts named `<prefix>0001` … on the fleet's etcd, sharing
    /// `connections` etcd clients (0: one each), and waits (bounded by `timeout`) until every one
    /// is started and listed healthy by `GET /v1/hosts` of host 0 (if the fleet has hosts).
    pub fn simulate(
        &self,
        hosts: usize,
        prefix: &str,
        connections: usize,
        timeout: Duration,
    ) -> Simulation {
        let dir = TempDir::new("m");
        let port = unique_port();
        let log_path = dir.path().join("simulation.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let err = log.try_clone().expect("dup log fd");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.underlay.name()])
            .arg(crate::binary("versed"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--store", &self.etcd.store_url()])
            .args(["--simulate-hosts", &hosts.to_string(), "--simulate-prefix", prefix])
            .args(["--simulate-connections", &connections.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // A thousand hosts logging every round would measure the log more than the hosts.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        crate::die_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("failed to start the simulation: {e}"));
        let mut sim = Simulation {
            child: Some(child),
            netns: self.underlay.name().to_owned(),
            port,
            hosts,
            prefix: prefix.to_owned(),
            log_path,
            _dir: dir,
        };
        let started = wait_until(timeout, || {
            if let Some(status) = sim.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the simulation exited ({status}); log:\n{}", sim.log());
            }
            sim.report_quiet().is_some_and(|r| r["started"].as_u64() == Some(hosts as u64))
        });
        assert!(
            started,
            "the simulated hosts did not all start within {timeout:?}: {:?}",
            sim.summary()
        );
        if !self.hosts.is_empty() {
            let names = sim.names();
            let healthy = wait_until(timeout, || {
                let listed = self.api(0).hosts();
                names.iter().all(|n| {
                    listed.iter().any(|h| h["name"] == *n && h["healthy"] == Value::Bool(true))
                })
            });
            assert!(healthy, "not every simulated host is listed healthy within {timeout:?}");
        }
        sim
    }

    /// Waits (bounded by `timeout`) until `GET /v1/hosts` of host `via` lists every host of
    /// `names` healthy with a realized revision of at least `revision`.
    pub fn wait_names_realized(
        &self,
        via: usize,
        names: &[String],
        revision: u64,
        timeout: Duration,
    ) -> bool {
        wait_until(timeout, || {
            let listed = self.api(via).hosts();
            names.iter().all(|n| {
                listed.iter().any(|h| {
                    h["name"] == *n
                        && h["healthy"] == Value::Bool(true)
                        && h["revision"].as_u64().is_some_and(|r| r >= revision)
                })
            })
        })
    }
}

impl Simulation {
    /// The simulated hosts' names, `<prefix>0001` ….
    pub fn names(&self) -> Vec<String> {
        (1..=self.hosts).map(|i| format!("{}{i:04}", self.prefix)).collect()
    }

    /// `GET /v1/simulation`: per host its realized revision, map entries, map writes and what
    /// its watch received; the process's memory (see `verse::sim::SimReport`).
    pub fn report(&self) -> Value {
        self.report_quiet()
            .unwrap_or_else(|| panic!("the simulation does not answer; log:\n{}", self.log()))
    }

    fn report_quiet(&self) -> Option<Value> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let r =
            http_request(&self.netns, addr, "GET", "/v1/simulation", None, Duration::from_secs(10))
                .ok()?;
        (r.status == 200).then(|| r.json())
    }

    /// The report without the per-host part.
    pub fn summary(&self) -> Option<Value> {
        let mut r = self.report_quiet()?;
        r.as_object_mut()?.remove("per_host");
        Some(r)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The simulation's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(no log at {}: {e})", self.log_path.display()))
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("VERSE_TEST_SHOW_LOG").is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- simulation log (last {} lines) ----", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("---- end of simulation log ----");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forged encapsulated packets
// ---------------------------------------------------------------------------------------------

/// `VXLAN_PORT` of the wire format (UDP destination port of encapsulated traffic).
pub use dataplane_common::VXLAN_PORT;

/// An encapsulated packet as the wire format describes it (VXLAN with the Group Policy
/// extension), carrying one inner UDP datagram over IPv4 or IPv6 (the family of its inner
/// addresses). Built by hand so a test can forge any
/// field: the outer source, the VNI, the group policy id, the inner addresses.
#[derive(Clone, Debug)]
pub struct VxlanGbp {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    /// Group Policy ID: the sender's identity.
    pub group: u16,
    pub vni: u32,
    /// VXLAN flags byte: G (0x80) | I (0x08) in a well-formed packet.
    pub flags: u8,
    pub inner_dst_mac: [u8; 6],
    pub inner_src_mac: [u8; 6],
    pub inner_src: IpAddr,
    pub inner_dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl VxlanGbp {
    /// A well-formed packet (VXLAN flags G|I) of identity `group` in universe `vni`, from host
    /// `outer.0` to host `outer.1`, carrying a UDP datagram from port 40000 of `src` to port
    /// `dst_port` of the workload at `dst` (address, MAC): what a host would send, for the
    /// attack tests to forge and vary. The inner source MAC is made up; the receiving host
    /// rewrites it.
    pub fn datagram(
        outer: (Ipv4Addr, Ipv4Addr),
        group: u16,
        vni: u32,
        src: impl Into<IpAddr>,
        dst: (impl Into<IpAddr>, &str),
        dst_port: u16,
        payload: &[u8],
    ) -> VxlanGbp {
        VxlanGbp {
            outer_src: outer.0,
            outer_dst: outer.1,
            group,
            vni,
            flags: 0x88,
            inner_dst_mac: frames::mac_bytes(dst.1),
            inner_src_mac: [0x02, 0, 0, 0, 0, 0x01],
            inner_src: src.into(),
            inner_dst: dst.0.into(),
            src_port: 40000,
            dst_port,
            payload: payload.to_vec(),
        }
    }

    /// The whole outer IPv4 packet (header included), checksums computed.
    pub fn packet(&self) -> Vec<u8> {
        let (ports, payload) = ((self.src_port, self.dst_port), &self.payload);
        let (ethertype, inner_ip) = match (self.inner_src, self.inner_dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let udp = frames::udp(ports.0, ports.1, payload);
                (frames::ETH_IPV4, frames::ipv4_with(s.octets(), d.octets(), 17, 0, false, &udp))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let (s, d) = (s.octets(), d.octets());
                (
                    frames::ETH_IPV6,
                    frames::ipv6(s, d, 17, &frames::udp6(s, d, ports.0, ports.1, payload)),
                )
            }
            (s, d) => panic!("inner addresses of two families: {s} -> {d}"),
        };
        let inner = frames::ethernet(self.inner_dst_mac, self.inner_src_mac, ethertype, &inner_ip);
        let sport = 49152u16 + (self.src_port % 16384);
        encapsulated(
            (self.outer_src, self.outer_dst),
            sport,
            self.flags,
            self.group,
            self.vni,
            &inner,
        )
    }

    /// Sends the packet from `ns` through a raw IP socket (`IPPROTO_RAW`: the packet carries
    /// its own IP header, so its outer source can be any address).
    pub fn send_from(&self, ns: &Netns) -> io::Result<()> {
        send_encapsulated(ns, &self.packet())
    }
}

/// The inner Ethernet frame `inner` as a host puts it on the underlay, as a whole outer IPv4
/// packet (header included, DF): from host `outer.0` to host `outer.1`, UDP from `sport` to
/// [`VXLAN_PORT`], VXLAN-GBP with `flags`, `group` (the Group Policy ID) and `vni`. What
/// [`VxlanGbp::packet`] wraps its datagram in; the IPv6 attack tests wrap IPv6 frames with it.
pub fn encapsulated(
    outer: (Ipv4Addr, Ipv4Addr),
    sport: u16,
    flags: u8,
    group: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let vxlan = [&frames::vxlan_gbp(flags, group, vni)[..], inner].concat();
    let outer_udp = frames::udp(sport, VXLAN_PORT, &vxlan);
    frames::ipv4_with(outer.0.octets(), outer.1.octets(), 17, 0, true, &outer_udp)
}

/// Sends the outer IPv4 packet `packet` (header included, see [`encapsulated`]) from `ns`
/// through a raw IP socket, so that its outer source can be any address.
pub fn send_encapsulated(ns: &Netns, packet: &[u8]) -> io::Result<()> {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    RawIpSocket::open(ns, libc::IPPROTO_RAW as u8)?.send_to(dst, packet)
}

/// What the headers of an encapsulated frame on the underlay say (see [`vxlan_seen`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSeen {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    /// Group Policy ID: the identity the sender claims.
    pub group: u16,
    pub vni: u32,
    pub inner_src: IpAddr,
    pub inner_dst: IpAddr,
}

/// Reads an Ethernet frame captured on the underlay as VXLAN-GBP (UDP to [`VXLAN_PORT`]) carrying
/// an inner IPv4 or IPv6 packet, if it is one: what a machine that can watch the underlay
/// learns.
pub fn vxlan_seen(frame: &[u8]) -> Option<VxlanSeen> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if udp.len() < 8 + 8 + 14 + 20 || u16::from_be_bytes([udp[2], udp[3]]) != VXLAN_PORT {
        return None;
    }
    let vxlan = &udp[8..16];
    let inner = &udp[16 + 14..];
    let (inner_src, inner_dst) = match udp[16 + 12..16 + 14] {
        [0x08, 0x00] => (
            IpAddr::from(<[u8; 4]>::try_from(&inner[12..16]).ok()?),
            IpAddr::from(<[u8; 4]>::try_from(&inner[16..20]).ok()?),
        ),
        [0x86, 0xdd] => (
            IpAddr::from(<[u8; 16]>::try_from(inner.get(8..24)?).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(inner.get(24..40)?).ok()?),
        ),
        _ => return None,
    };
    Some(VxlanSeen {
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        outer_dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        group: u16::from_be_bytes([vxlan[2], vxlan[3]]),
        vni: u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
        inner_src,
        inner_dst,
    })
}

// ---------------------------------------------------------------------------------------------
// Bulk transfers
// ---------------------------------------------------------------------------------------------

/// A TCP server that reads every connection to its end and answers with the number of bytes
/// it received (decimal, one line), until dropped.
pub struct BulkSink {
    pub port: u16,
    _stopper: Stopper,
}

impl BulkSink {
    pub fn start(ns: &Netns, port: u16) -> BulkSink {
        let stopper =
            accept_loop(ns, port, |stream, stop| std::thread::spawn(move || sink(stream, &stop)));
        BulkSink { port, _stopper: stopper }
    }

    /// [`BulkSink::start`] on address `ip` of the namespace only (an IPv6 one, say).
    pub fn start_on(ns: &Netns, ip: IpAddr, port: u16) -> BulkSink {
        let stopper = accept_loop_on(ns, ip, port, |stream, stop| {
            std::thread::spawn(move || sink(stream, &stop))
        });
        BulkSink { port, _stopper: stopper }
    }
}

fn sink(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.write_all(format!("{total}\n").as_bytes());
                return;
            }
            Ok(n) => total += n as u64,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Sends `bytes` bytes from `ns` to a [`BulkSink`] at `ip:port` on one TCP connection and
/// returns how many the sink says it received. `timeout` bounds the whole transfer.
pub fn bulk_send(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    bytes: u64,
    timeout: Duration,
) -> io::Result<u64> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((ip.into(), port));
    let mut stream = ns.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent: u64 = 0;
    while sent < bytes {
        let left = deadline.checked_duration_since(Instant::now()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("sent {sent} of {bytes} bytes in {timeout:?}"),
            )
        })?;
        stream.set_write_timeout(Some(left))?;
        let n = chunk.len().min(usize::try_from(bytes - sent).unwrap_or(usize::MAX));
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let left = deadline.checked_duration_since(Instant::now()).unwrap_or(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    answer.trim().parse().map_err(|e| bad(format!("sink answered {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ping;

    /// The fleet's network without Verse: nodes on the bridge reach each other and etcd, and
    /// the MTU helper changes what fits. If this fails, fleet tests' failures say nothing
    /// about Verse.
    #[test]
    fn underlay_bridge_and_etcd_work_without_verse() {
        let net = Fleet::network();
        let a = net.underlay_node(underlay_ip(0));
        let b = net.underlay_node(underlay_ip(1));
        assert!(wait_until(Duration::from_secs(5), || ping(&a, underlay_ip(1))));
        // Every etcd member answers a node on the bridge, and they agree on one leader.
        for addr in net.etcd().endpoints() {
            let health =
                http_request(b.name(), addr, "GET", "/health", None, Duration::from_secs(5))
                    .expect("an etcd member answers from a node on the bridge");
            assert_eq!(health.status, 200, "{addr}: {}", health.body);
        }
        assert!(net.etcd().leader(Duration::from_secs(10)).is_some(), "{:?}", net.etcd().status());
        assert_eq!(net.etcd().status().len(), 3);
        // A forged packet leaves with the outer source it claims and arrives as VXLAN.
        let listener = b
            .enter(|| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, VXLAN_PORT)))
            .expect("bind 4789");
        listener.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let forged = VxlanGbp {
            outer_src: Ipv4Addr::new(198, 18, 0, 77),
            outer_dst: underlay_ip(1),
            group: 7,
            vni: 42,
            flags: 0x88,
            inner_dst_mac: [2, 0, 0, 0, 0, 1],
            inner_src_mac: [2, 0, 0, 0, 0, 2],
            inner_src: Ipv4Addr::new(10, 0, 0, 2).into(),
            inner_dst: Ipv4Addr::new(10, 0, 0, 3).into(),
            src_port: 1,
            dst_port: 2,
            payload: b"forged".to_vec(),
        };
        forged.send_from(&a).expect("send a forged packet");
        let mut buf = [0u8; 2048];
        let (n, from) = listener.recv_from(&mut buf).expect("the forged packet arrives");
        assert_eq!(from.ip(), std::net::IpAddr::V4(Ipv4Addr::new(198, 18, 0, 77)));
        assert_eq!(&buf[..n], &forged.packet()[28..], "VXLAN header and inner frame intact");
        // Bulk transfers count every byte.
        let _sink = BulkSink::start(&b, 5001);
        let got = bulk_send(&a, underlay_ip(1), 5001, 3_000_000, Duration::from_secs(20))
            .expect("bulk transfer over the bridge");
        assert_eq!(got, 3_000_000);
        // Nothing else is reachable: the underlay is closed.
        let routes = String::from_utf8_lossy(&a.ip(&["route", "show"]).stdout).into_owned();
        assert!(!routes.contains("default"), "a node has a default route: {routes}");
        assert!(net.etcd().keys("/").is_empty(), "a fresh etcd is empty");
        // A 1400-byte don't-fragment ping passes at MTU 1500 and not at 1300.
        let big = |ns: &Netns| {
            ns.exec("ping", &["-c1", "-W1", "-M", "do", "-s", "1372", &underlay_ip(1).to_string()])
                .status
                .success()
        };
        assert!(big(&a));
        a.ip(&["link", "set", UNDERLAY_IFACE, "mtu", "1300"]);
        assert!(!big(&a));
    }

    #[test]
    fn vxlan_gbp_packets_follow_the_wire_format() {
        let p = VxlanGbp {
            outer_src: Ipv4Addr::new(198, 18, 0, 2),
            outer_dst: Ipv4Addr::new(198, 18, 0, 3),
            group: 0x1234,
            vni: 0x00ab_cdef,
            flags: 0x88,
            inner_dst_mac: [2, 0, 0, 0, 0, 1],
            inner_src_mac: [2, 0, 0, 0, 0, 2],
            inner_src: Ipv4Addr::new(10, 0, 0, 2).into(),
            inner_dst: Ipv4Addr::new(10, 0, 0, 3).into(),
            src_port: 1000,
            dst_port: 2000,
            payload: b"hi".to_vec(),
        }
        .packet();
        assert_eq!(p.len(), 20 + 8 + 8 + 14 + 20 + 8 + 2);
        assert_eq!(frames::checksum(&p[..20]), 0, "outer IPv4 checksum");
        assert_eq!(p[6] & 0x40, 0x40, "DF");
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), VXLAN_PORT);
        assert!(u16::from_be_bytes([p[20], p[21]]) >= 49152);
        assert_eq!(&p[28..36], &[0x88, 0, 0x12, 0x34, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(&p[48..50], &[0x08, 0x00], "inner ethertype");
        assert_eq!(frames::checksum(&p[50..70]), 0, "inner IPv4 checksum");
        assert_eq!(&p[p.len() - 2..], b"hi");
    }
}
