//! Traffic between namespaces through ordinary sockets: probes (TCP connect, ping, UDP
//! exchange), servers that answer with a banner, long-lived connections, floods.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::raw::sockaddr;
use crate::*;

/// Whether a TCP connection from `ns` to `ip:port` is established within `timeout`.
pub fn tcp_connect(ns: &Netns, ip: impl Into<IpAddr>, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((ip.into(), port));
    ns.enter(|| TcpStream::connect_timeout(&addr, timeout)).is_ok()
}

/// Whether `ping -c1` from `ns` to `ip` gets an echo reply within `wait_s` seconds (`ping -6`
/// for an IPv6 address).
pub fn ping_wait(ns: &Netns, ip: impl Into<IpAddr>, wait_s: u32) -> bool {
    let ip = ip.into();
    let family = if ip.is_ipv6() { "-6" } else { "-4" };
    ns.exec("ping", &[family, "-c1", "-q", "-n", "-W", &wait_s.to_string(), &ip.to_string()])
        .status
        .success()
}

/// Whether one ICMP echo from `ns` to `ip` is answered within 2 s.
pub fn ping(ns: &Netns, ip: impl Into<IpAddr>) -> bool {
    ping_wait(ns, ip, 2)
}

/// How a UDP exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpOutcome {
    /// The answer's payload.
    Reply(String),
    /// An ICMP port unreachable came back (`ECONNREFUSED` on the connected socket).
    Refused,
    /// Nothing came back in time.
    Timeout,
    /// Some other error.
    Error(String),
}

/// Sends `msg` from `ns` (optionally from `src`) to `ip:port` over UDP and waits for one answer.
pub fn udp_exchange(
    ns: &Netns,
    src: Option<IpAddr>,
    ip: impl Into<IpAddr>,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> UdpOutcome {
    let ip = ip.into();
    let any = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let bind = SocketAddr::from((src.unwrap_or(any), 0));
    let sock = match ns.enter(|| UdpSocket::bind(bind)) {
        Ok(s) => s,
        Err(e) => return UdpOutcome::Error(format!("bind {bind}: {e}")),
    };
    let run = || -> io::Result<String> {
        sock.connect(SocketAddr::from((ip, port)))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(msg.as_bytes())?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match run() {
        Ok(s) => UdpOutcome::Reply(s),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => UdpOutcome::Refused,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            UdpOutcome::Timeout
        }
        Err(e) => UdpOutcome::Error(e.to_string()),
    }
}

/// The answer of a [`UdpServer`] to `msg` sent from `ns`, or `None` if none came in `timeout`.
pub fn udp_roundtrip(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    match udp_exchange(ns, None, ip, port, msg, timeout) {
        UdpOutcome::Reply(s) => Some(s),
        _ => None,
    }
}

/// Stops and joins a server thread on drop.
#[derive(Debug)]
pub(crate) struct Stopper {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Option<JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The accept loop of a TCP server in `ns` on `port` (every address), polling every 10 ms until
/// its [`Stopper`] is dropped: each connection goes to `accept`, which starts the thread that
/// serves it (and is told to stop with the same flag); the stopper joins them all.
pub(crate) fn accept_loop(
    ns: &Netns,
    port: u16,
    accept: impl FnMut(TcpStream, Arc<AtomicBool>) -> JoinHandle<()> + Send + 'static,
) -> Stopper {
    accept_loop_on(ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, accept)
}

/// [`accept_loop`] on address `ip` of the namespace only.
pub(crate) fn accept_loop_on(
    ns: &Netns,
    ip: IpAddr,
    port: u16,
    mut accept: impl FnMut(TcpStream, Arc<AtomicBool>) -> JoinHandle<()> + Send + 'static,
) -> Stopper {
    let addr = SocketAddr::from((ip, port));
    let listener = ns
        .enter(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind TCP {addr} in {}: {e}", ns.name()));
    listener.set_nonblocking(true).expect("non-blocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => conns.push(accept(stream, stop.clone())),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        })
    };
    Stopper { stop, thread: Some(thread) }
}

/// A TCP server in a namespace that answers every line `msg\n` with `<banner>:msg\n`, on every
/// connection, until dropped.
#[derive(Debug)]
pub struct TcpServer {
    pub port: u16,
    accepted: Arc<AtomicU32>,
    _stopper: Stopper,
}

impl TcpServer {
    pub fn start(ns: &Netns, port: u16, banner: &str) -> TcpServer {
        TcpServer::start_on(ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, banner)
    }

    /// A server on address `ip` of the namespace only (an IPv6 address, say: every IPv4
    /// address is [`TcpServer::start`]'s).
    pub fn start_on(ns: &Netns, ip: IpAddr, port: u16, banner: &str) -> TcpServer {
        let accepted = Arc::new(AtomicU32::new(0));
        let banner = banner.to_owned();
        let counter = accepted.clone();
        let stopper = accept_loop_on(ns, ip, port, move |stream, stop| {
            counter.fetch_add(1, Ordering::SeqCst);
            let banner = banner.clone();
            std::thread::spawn(move || serve_lines(stream, &banner, &stop))
        });
        TcpServer { port, accepted, _stopper: stopper }
    }

    /// Connections accepted so far. The accept loop polls (every 10 ms), so a connection a
    /// client has just opened may be counted a moment later: poll with [`wait_until`].
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Starts a [`TcpServer`] whose banner is the namespace's name.
pub fn tcp_listen(ns: &Netns, port: u16) -> TcpServer {
    TcpServer::start(ns, port, ns.name())
}

fn serve_lines(mut stream: TcpStream, banner: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let mut answer = format!("{banner}:").into_bytes();
                    answer.extend_from_slice(&line);
                    if stream.write_all(&answer).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server in a namespace that answers every datagram `msg` with `<banner>:msg` and
/// records the source of each, until dropped.
#[derive(Debug)]
pub struct UdpServer {
    pub port: u16,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    _stopper: Stopper,
}

/// Starts a [`UdpServer`].
pub fn udp_echo(ns: &Netns, port: u16, banner: &str) -> UdpServer {
    UdpServer::start(ns, port, banner)
}

impl UdpServer {
    pub fn start(ns: &Netns, port: u16, banner: &str) -> UdpServer {
        UdpServer::start_on(ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), port, banner)
    }

    /// A server on address `ip` of the namespace only (see [`TcpServer::start_on`]).
    pub fn start_on(ns: &Netns, ip: IpAddr, port: u16, banner: &str) -> UdpServer {
        let addr = SocketAddr::from((ip, port));
        let sock = ns
            .enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind UDP {addr} in {}: {e}", ns.name()));
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("UDP read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let banner = banner.to_owned();
        let thread = {
            let stop = stop.clone();
            let sources = sources.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        sources.lock().expect("sources lock").push(from);
                        let mut answer = format!("{banner}:").into_bytes();
                        answer.extend_from_slice(&buf[..n]);
                        let _ = sock.send_to(&answer, from);
                    }
                }
            })
        };
        UdpServer { port, sources, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// Sources of the datagrams received so far.
    pub fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().expect("sources lock").clone()
    }
}

/// A long-lived TCP connection from a namespace to a [`TcpServer`], exchanging lines on demand.
#[derive(Debug)]
pub struct TcpConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    pub fn open(
        ns: &Netns,
        ip: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> io::Result<TcpConn> {
        let addr = SocketAddr::from((ip.into(), port));
        let stream = ns.enter(|| TcpStream::connect_timeout(&addr, timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(TcpConn { stream, reader })
    }

    /// The connection's local (source) port.
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends `msg` as one line and returns the server's answer line (without the newline).
    pub fn exchange(&mut self, msg: &str, timeout: Duration) -> io::Result<String> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(line.trim_end_matches('\n').to_owned())
    }
}

/// One line exchanged over a fresh TCP connection: the server's answer, or `None`.
pub fn tcp_roundtrip(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    let mut conn = TcpConn::open(ns, ip, port, timeout).ok()?;
    conn.exchange(msg, timeout).ok()
}

/// Sends `flows` distinct UDP flows from `ns` to `dst`, `per_flow` datagrams each (every flow
/// of a batch once, then again), as fast as `sendmmsg(2)` goes, from one thread pinned to each
/// CPU: a flood of new flows. Flow `i` goes from port `first_sport + i / 60000` to port
/// `1 + i % 60000`. Returns the datagrams the kernel accepted (a full queue refuses some).
pub fn udp_flood(
    ns: &Netns,
    dst: impl Into<IpAddr>,
    first_sport: u16,
    flows: u32,
    per_flow: u32,
) -> u64 {
    let dst = dst.into();
    let any = if dst.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    const PER_SPORT: u32 = 60_000;
    const BATCH: u32 = 256;
    let sports = flows.div_ceil(PER_SPORT);
    // SAFETY: sysconf has no preconditions.
    let cpus =
        usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
    let sockets: Vec<(u16, UdpSocket)> = (0..sports)
        .map(|k| {
            let sport = first_sport + u16::try_from(k).expect("few source ports");
            let bind = SocketAddr::from((any, sport));
            let sock = ns
                .enter(|| UdpSocket::bind(bind))
                .unwrap_or_else(|e| panic!("bind UDP {bind} in {}: {e}", ns.name()));
            (sport, sock)
        })
        .collect();
    let sent = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for cpu in 0..cpus {
            let (sockets, sent) = (&sockets, &sent);
            scope.spawn(move || {
                // SAFETY: an all-zero cpu_set_t is empty; CPU_SET writes within it; pid 0 is
                // the calling thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                for (k, (_, sock)) in sockets.iter().enumerate() {
                    let in_this = (flows - k as u32 * PER_SPORT).min(PER_SPORT);
                    // This thread's share of the destination ports of this socket.
                    let share: Vec<u16> = (0..in_this)
                        .filter(|i| *i as usize % cpus == cpu)
                        .map(|i| u16::try_from(1 + i).expect("ports"))
                        .collect();
                    for batch in share.chunks(BATCH as usize) {
                        for _ in 0..per_flow {
                            sent.fetch_add(send_batch(sock, dst, batch), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    sent.load(Ordering::Relaxed)
}

/// One `sendmmsg(2)` of a one-byte datagram to each port of `ports` at `dst`; returns how many
/// the kernel took.
fn send_batch(sock: &UdpSocket, dst: IpAddr, ports: &[u16]) -> u64 {
    let mut payload = [b'f'];
    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        ports.iter().map(|p| sockaddr(SocketAddr::from((dst, *p)))).collect();
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: 1 };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|(a, len)| {
            // SAFETY: an all-zero mmsghdr is a valid value of this plain C struct.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = *len;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0usize;
    while done < msgs.len() {
        // SAFETY: every header points at a live address and the one-byte iovec, valid for the
        // call; `done < len`.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr().add(done),
                (msgs.len() - done) as u32,
                0,
            )
        };
        if n <= 0 {
            // A refused datagram (ENOBUFS, or an ICMP error reported back): skip it.
            done += 1;
        } else {
            done += n as usize;
        }
    }
    msgs.len() as u64
}

/// Short timeouts for probes that are expected to fail, long ones for those that must succeed.
pub const DENIED: Duration = Duration::from_millis(1000);
pub const ALLOWED: Duration = Duration::from_secs(3);

/// A stream socket a client reads with a timeout: the API's TCP port or its local socket.
pub trait TimedRead: Read {
    fn read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl TimedRead for UnixStream {
    fn read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Whether the server has closed `s` (a read sees the end of the stream or a reset).
pub fn closed_by_server<S: TimedRead>(s: &mut S) -> bool {
    s.read_timeout(Some(Duration::from_millis(5))).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself, over a plain veth pair with no Verse at all: if this fails, the
    /// namespace tests' failures say nothing about Verse.
    #[test]
    fn traffic_helpers_work_over_a_plain_veth() {
        let a = Netns::new("ta");
        let b = Netns::new("tb");
        let va = unique_name("va");
        let vb = unique_name("vb");
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                &vb,
                "netns",
                b.name(),
            ],
        );
        a.ip(&["addr", "add", "198.18.7.1/24", "dev", &va]);
        b.ip(&["addr", "add", "198.18.7.2/24", "dev", &vb]);
        a.ip(&["link", "set", &va, "up"]);
        b.ip(&["link", "set", &vb, "up"]);
        let ip_b: Ipv4Addr = "198.18.7.2".parse().unwrap();
        let _tcp = TcpServer::start(&b, 7000, "b");
        let udp = UdpServer::start(&b, 7001, "b");
        assert!(wait_until(Duration::from_secs(5), || ping(&a, ip_b)));
        assert!(tcp_connect(&a, ip_b, 7000, ALLOWED));
        assert!(!tcp_connect(&a, ip_b, 7999, ALLOWED), "nothing listens on 7999");
        assert_eq!(tcp_roundtrip(&a, ip_b, 7000, "x", ALLOWED).as_deref(), Some("b:x"));
        assert_eq!(udp_roundtrip(&a, ip_b, 7001, "y", ALLOWED).as_deref(), Some("b:y"));
        assert_eq!(udp.sources().len(), 1);
        assert_eq!(udp_exchange(&a, None, ip_b, 7999, "z", ALLOWED), UdpOutcome::Refused);
        assert!(!ping(&a, "198.18.7.3".parse::<Ipv4Addr>().unwrap()));
        let mut conn = TcpConn::open(&a, ip_b, 7000, ALLOWED).unwrap();
        for i in 0..3 {
            assert_eq!(conn.exchange(&i.to_string(), ALLOWED).unwrap(), format!("b:{i}"));
        }
        let _raw = RawIpServer::start(&b, 253, "b");
        assert_eq!(raw_ip_roundtrip(&a, ip_b, 253, "r", ALLOWED).as_deref(), Some("b:r"));
        assert_eq!(
            raw_ip_roundtrip(&a, ip_b, 254, "r", DENIED),
            None,
            "nobody answers protocol 254"
        );
        b.ip(&["link", "set", &vb, "down"]);
        assert_eq!(udp_exchange(&a, None, ip_b, 7001, "w", DENIED), UdpOutcome::Timeout);
    }
}

/// The address family a test body runs over: a policy test of IPv4 is run for IPv6 by the same
/// body with this parameter, not copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, for a test that runs its body over each in turn.
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// `w`'s address in this family (IPv6: `w` must be dual stack).
    pub fn addr(self, w: &crate::Workload) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(w.ip),
            Family::V6 => IpAddr::V6(w.ipv6.expect("a dual-stack endpoint")),
        }
    }

    /// An IPv4 address or CIDR as this family writes it: itself over IPv4; over IPv6 its
    /// counterpart, so that one body written with IPv4 text runs over both families. `10.A.B.C`
    /// is `fd00:0:A:B::C` (the digits as written), `0.0.0.0/0` is `::/0`, and the prefixes
    /// /16, /24 and /32 are /48, /64 and /128 (a /16 universe is a /48 one: AWS allows /44 to
    /// /64).
    pub fn text(self, v4: &str) -> String {
        if self == Family::V4 {
            return v4.to_owned();
        }
        if v4 == "0.0.0.0/0" {
            return "::/0".to_owned();
        }
        let (ip, len) = match v4.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (v4, None),
        };
        let o: Vec<&str> = ip.split('.').collect();
        assert!(o.len() == 4 && o[0] == "10", "{v4}: an address of 10.0.0.0/8 expected");
        let addr: std::net::Ipv6Addr =
            format!("fd00:0:{}:{}::{}", o[1], o[2], o[3]).parse().expect("an IPv6 address");
        match len {
            None => addr.to_string(),
            Some(len) => {
                let len6 = match len {
                    "16" => 48,
                    "24" => 64,
                    "32" => 128,
                    _ => panic!("{v4}: /16, /24 or /32 expected"),
                };
                format!("{addr}/{len6}")
            }
        }
    }

    /// The unspecified address of this family, for a server listening on every address of it.
    pub fn any(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The protocol name of this family's ICMP in a rule: `icmp` or `icmpv6`.
    pub fn icmp(self) -> &'static str {
        match self {
            Family::V4 => "icmp",
            Family::V6 => "icmpv6",
        }
    }

    /// The IP protocol number of this family's ICMP: 1, or 58 (ICMPv6).
    pub fn icmp_proto(self) -> u8 {
        match self {
            Family::V4 => 1,
            Family::V6 => 58,
        }
    }

    /// This family's ICMP echo request type: 8 or 128.
    pub fn echo_request(self) -> i64 {
        match self {
            Family::V4 => 8,
            Family::V6 => 128,
        }
    }
}
