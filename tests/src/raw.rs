//! Raw sockets: other IP protocols, forged frames, crafted TCP connections, captures, and the
//! victim's sockets as judges of an attack.

use std::io::{self};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::*;

/// A raw IP socket of protocol `proto` in `ns`, for protocols other than TCP, UDP and ICMP
/// (S7 "other protocols"), or to craft what those would not send. The kernel writes the IP
/// header of what is sent; what an IPv4 socket receives starts with the IP header, what an IPv6
/// one receives does not (RFC 3542 section 3; an ICMPv6 socket computes the checksum of what it
/// sends).
pub struct RawIpSocket {
    fd: std::os::fd::OwnedFd,
    family: Family,
}

impl RawIpSocket {
    /// An IPv4 raw socket.
    pub fn open(ns: &Netns, proto: u8) -> io::Result<RawIpSocket> {
        RawIpSocket::open_for(ns, Family::V4, proto)
    }

    /// A raw socket of `family`.
    pub fn open_for(ns: &Netns, family: Family, proto: u8) -> io::Result<RawIpSocket> {
        use std::os::fd::FromRawFd;
        let domain = match family {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        };
        let fd = ns.enter(|| {
            // SAFETY: socket(2) takes no pointers; the result is checked below.
            unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) }
        });
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        Ok(RawIpSocket { fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, family })
    }

    /// Sends `payload` to `dst` (of the socket's family; the port is ignored by raw sockets).
    pub fn send_to(&self, dst: impl Into<IpAddr>, payload: &[u8]) -> io::Result<()> {
        let dst: IpAddr = dst.into();
        let (addr, len) = sockaddr(SocketAddr::from((dst, 0)));
        // SAFETY: `payload` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&raw const addr).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next packet within `timeout`: its source and its payload (after the IP header).
    pub fn recv(&self, timeout: Duration) -> io::Result<(IpAddr, Vec<u8>)> {
        if self.family == Family::V6 {
            return recv_from6(&self.fd, timeout);
        }
        let packet = self.recv_packet(timeout)?;
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl {
            return Err(bad(format!("raw packet of {} bytes with IHL {ihl}", packet.len())));
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        Ok((IpAddr::V4(src), packet[ihl..].to_vec()))
    }

    /// The next packet within `timeout`, IP header included (IPv4 sockets).
    pub fn recv_packet(&self, timeout: Duration) -> io::Result<Vec<u8>> {
        recv_within(&self.fd, timeout, 2048)
    }
}

/// `addr` as the C socket address of its family, and its length.
pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value of this plain C struct.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The next packet on the IPv6 raw socket `fd` within `timeout`: its source and its payload.
fn recv_from6(fd: &impl AsRawFd, timeout: Duration) -> io::Result<(IpAddr, Vec<u8>)> {
    set_timeout(fd, timeout)?;
    let mut buf = vec![0u8; 2048];
    // SAFETY: an all-zero sockaddr_in6 is a valid value of this plain C struct.
    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `buf`, `from` and `len` are writable for the lengths given for the whole call.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut from).cast(),
            &raw mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok((IpAddr::V6(Ipv6Addr::from(from.sin6_addr.s6_addr)), buf))
}

/// Sets `SO_RCVTIMEO` of `fd` to `timeout`.
fn set_timeout(fd: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros().max(1)),
    };
    // SAFETY: `tv` is a valid timeval for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next packet or frame on `fd` within `timeout` (`SO_RCVTIMEO`), at most `cap` bytes.
fn recv_within(fd: &impl AsRawFd, timeout: Duration, cap: usize) -> io::Result<Vec<u8>> {
    set_timeout(fd, timeout)?;
    let mut buf = vec![0u8; cap];
    // SAFETY: `buf` is writable for its whole length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The packets of one IP protocol that arrive in a namespace, whatever socket they are for, as
/// a raw socket sees them: the receiver's view, for probes whose answer could not come back even
/// if the probe arrived (a forged source address or MAC).
pub struct Tap {
    sock: RawIpSocket,
}

impl Tap {
    /// Starts seeing IPv4 packets of protocol `proto` (6 TCP, 17 UDP, 1 ICMP) arriving in `ns`.
    pub fn open(ns: &Netns, proto: u8) -> Tap {
        Tap::open_for(ns, Family::V4, proto)
    }

    /// Starts seeing packets of `family` and protocol `proto` (IPv6: 58 is ICMPv6) in `ns`.
    pub fn open_for(ns: &Netns, family: Family, proto: u8) -> Tap {
        let sock = RawIpSocket::open_for(ns, family, proto)
            .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
        Tap { sock }
    }

    /// Whether a packet from `src` arrives within `timeout` (packets from others are skipped).
    pub fn saw_from(&self, src: impl Into<IpAddr>, timeout: Duration) -> bool {
        let src = src.into();
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.sock.recv(left) {
                Ok((from, _)) if from == src => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

/// A server answering every packet of IP protocol `proto` with `<banner>:payload`, until dropped.
pub struct RawIpServer {
    _stopper: Stopper,
}

impl RawIpServer {
    pub fn start(ns: &Netns, proto: u8, banner: &str) -> RawIpServer {
        RawIpServer::start_for(ns, Family::V4, proto, banner)
    }

    /// A server of `family`'s packets of protocol `proto`.
    pub fn start_for(ns: &Netns, family: Family, proto: u8, banner: &str) -> RawIpServer {
        let sock = RawIpSocket::open_for(ns, family, proto)
            .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let banner = banner.to_owned();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((src, payload)) = sock.recv(Duration::from_millis(100)) {
                        let mut answer = format!("{banner}:").into_bytes();
                        answer.extend_from_slice(&payload);
                        let _ = sock.send_to(src, &answer);
                    }
                }
            })
        };
        RawIpServer { _stopper: Stopper { stop, thread: Some(thread) } }
    }
}

/// Sends `msg` as IP protocol `proto` from `ns` to `ip` (of either family) and returns the first
/// answer from `ip`.
pub fn raw_ip_roundtrip(
    ns: &Netns,
    ip: impl Into<IpAddr>,
    proto: u8,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    let ip: IpAddr = ip.into();
    let family = if ip.is_ipv6() { Family::V6 } else { Family::V4 };
    let sock = RawIpSocket::open_for(ns, family, proto)
        .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
    sock.send_to(ip, msg.as_bytes()).ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match sock.recv(left) {
            Ok((src, payload)) if src == ip => {
                return Some(String::from_utf8_lossy(&payload).into_owned())
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Sends one raw Ethernet frame (`frame` starts with the destination MAC) out of `iface` in `ns`
/// through an `AF_PACKET` socket, as a workload that forges packets would.
pub fn send_frame(ns: &Netns, iface: &str, frame: &[u8]) -> io::Result<()> {
    let iface = std::ffi::CString::new(iface).map_err(|e| bad(format!("interface name: {e}")))?;
    ns.enter(|| {
        // SAFETY: `iface` is a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that is filled in below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex =
            i32::try_from(ifindex).map_err(|e| bad(format!("ifindex {ifindex}: {e}")))?;
        addr.sll_halen = 6;
        let dst =
            frame.get(..6).ok_or_else(|| bad("a frame starts with a 6-byte destination MAC"))?;
        addr.sll_addr[..6].copy_from_slice(dst);
        // SAFETY: `frame` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// `setsockopt(fd, level, name, &value)` for an integer option.
fn set_int_option(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the length given, for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt(fd, level, name)` for an integer option.
fn int_option(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid and writable for the whole call.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A TCP connection from `ns`, from the given local address and port (`SO_REUSEADDR`, so a
/// port in TIME_WAIT can be taken again), to `dst`, established within `timeout`. A test uses it
/// to open a connection on exactly the ports of a flow it attacks.
pub fn tcp_connect_from(
    ns: &Netns,
    src: (impl Into<IpAddr>, u16),
    dst: (impl Into<IpAddr>, u16),
    timeout: Duration,
) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (src_ip, dst_ip): (IpAddr, IpAddr) = (src.0.into(), dst.0.into());
    let (src, dst) = (SocketAddr::from((src_ip, src.1)), SocketAddr::from((dst_ip, dst.1)));
    let domain = if src.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    ns.enter(|| {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let (local, len) = sockaddr(src);
        // SAFETY: `local` is a valid socket address for the length given.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let (remote, len) = sockaddr(dst);
        // SAFETY: as for bind.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd for the whole call.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connection not established"));
        }
        let err = int_option(&fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    })
}

/// The path MTU of a connected TCP socket (`getsockopt(IP_MTU)`, `IPV6_MTU` over IPv6): what
/// the kernel learnt from ICMP "fragmentation needed" (ICMPv6 "packet too big") messages it
/// accepted.
pub fn ip_mtu(sock: &TcpStream) -> io::Result<u32> {
    let v6 = sock.local_addr()?.is_ipv6();
    let (level, name) =
        if v6 { (libc::IPPROTO_IPV6, libc::IPV6_MTU) } else { (libc::IPPROTO_IP, libc::IP_MTU) };
    int_option(sock, level, name).map(|v| v as u32)
}

/// A connected UDP socket that reports ICMP errors about its datagrams (`IP_RECVERR`: port
/// unreachable as `ECONNREFUSED`, time exceeded as `EHOSTUNREACH`, parameter problem as
/// `EPROTO`, fragmentation needed as `EMSGSIZE`; over IPv6 `IPV6_RECVERR`, the ICMPv6
/// counterparts as the same): the victim's view of an ICMP attack.
pub struct UdpProbe {
    sock: UdpSocket,
}

impl UdpProbe {
    /// Opens the socket in `ns`, connects it to `ip:port` and sends one datagram (`flow`).
    pub fn open(ns: &Netns, ip: impl Into<IpAddr>, port: u16) -> io::Result<UdpProbe> {
        let ip = ip.into();
        let any = if ip.is_ipv6() {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let sock = ns.enter(|| UdpSocket::bind((any, 0)))?;
        if ip.is_ipv6() {
            set_int_option(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
        } else {
            set_int_option(&sock, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
        }
        sock.connect((ip, port))?;
        sock.send(b"flow")?;
        Ok(UdpProbe { sock })
    }

    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The error (errno) the socket reports within `timeout`, `None` if it reports none. A
    /// datagram received instead fails the test: probes talk to silent peers.
    pub fn error(&self, timeout: Duration) -> Option<i32> {
        self.sock.set_read_timeout(Some(timeout)).expect("UDP read timeout");
        let mut buf = [0u8; 2048];
        match self.sock.recv(&mut buf) {
            Ok(n) => panic!("the probe's peer answered {n} bytes; it must stay silent"),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                None
            }
            Err(e) => e.raw_os_error(),
        }
    }
}

/// One ICMP message a namespace received, as an [`IcmpListener`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: IpAddr,
    pub ty: u8,
    pub code: u8,
    /// The IP datagram's length, bytes (IPv6: its 40-byte header and its payload).
    pub len: usize,
}

/// Records every ICMP (ICMPv6) message delivered to a namespace (a raw ICMP socket receives a
/// copy of each), until dropped.
pub struct IcmpListener {
    seen: Arc<Mutex<Vec<IcmpSeen>>>,
    _stopper: Stopper,
}

impl IcmpListener {
    /// Records ICMP over IPv4.
    pub fn start(ns: &Netns) -> IcmpListener {
        IcmpListener::start_for(ns, Family::V4)
    }

    /// Records ICMP of `family` (ICMPv6 over IPv6).
    pub fn start_for(ns: &Netns, family: Family) -> IcmpListener {
        let sock = RawIpSocket::open_for(ns, family, family.icmp_proto())
            .unwrap_or_else(|e| panic!("raw ICMP socket in {}: {e}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((src, m)) = sock.recv(Duration::from_millis(100)) else { continue };
                    if m.len() < 2 {
                        continue;
                    }
                    let header = if src.is_ipv6() { 40 } else { 20 };
                    let len = header + m.len();
                    seen.lock().expect("seen lock").push(IcmpSeen {
                        src,
                        ty: m[0],
                        code: m[1],
                        len,
                    });
                }
            })
        };
        IcmpListener { seen, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// What arrived from `src` so far.
    pub fn from(&self, src: impl Into<IpAddr>) -> Vec<IcmpSeen> {
        let src = src.into();
        self.seen.lock().expect("seen lock").iter().filter(|m| m.src == src).cloned().collect()
    }
}

/// Every frame an interface sends or receives (`AF_PACKET`, `ETH_P_ALL`), from the moment it
/// is opened: a test reads sequence numbers or identities off the wire, as an attacker who can
/// watch that wire would.
pub struct PacketCapture {
    fd: std::os::fd::OwnedFd,
}

impl PacketCapture {
    pub fn open(ns: &Netns, iface: &str) -> io::Result<PacketCapture> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let name = std::ffi::CString::new(iface).map_err(|e| bad(format!("interface: {e}")))?;
        let all = (libc::ETH_P_ALL as u16).to_be();
        ns.enter(|| {
            // SAFETY: `name` is NUL-terminated and outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: socket(2) takes no pointers; the result is checked below.
            let fd = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all))
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all-zero is valid and filled in below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = i32::try_from(ifindex).map_err(|e| bad(format!("{e}")))?;
            // SAFETY: `addr` is a valid sockaddr_ll for the length given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(PacketCapture { fd })
        })
    }

    /// The next frame within `timeout`, or `None`.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        recv_within(&self.fd, timeout, 65536).ok()
    }

    /// The first frame (from now on, in order) for which `pred` holds, within `timeout`.
    pub fn find(&self, timeout: Duration, mut pred: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let frame = self.next(left)?;
            if pred(&frame) {
                return Some(frame);
            }
        }
    }
}

/// A TCP segment as [`tcp_segment`] reads it off an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    pub payload_len: usize,
}

/// The TCP segment in an Ethernet/IPv4 frame, or an Ethernet/IPv6 one whose fixed header names
/// TCP, if it is one.
pub fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    let ip = frame.get(14..)?;
    let (src, dst, t) = match frame.get(12..14)? {
        [0x08, 0x00] if ip.len() >= 20 && ip[0] >> 4 == 4 && ip[9] == 6 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?);
            (src, dst, ip.get(ihl..total)?)
        }
        [0x86, 0xdd] if ip.len() >= 40 && ip[0] >> 4 == 6 && ip[6] == 6 => {
            let total = (40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))).min(ip.len());
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
            (src, dst, ip.get(40..total)?)
        }
        _ => return None,
    };
    if t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    Some(TcpSegment {
        src,
        dst,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload_len: t.len().saturating_sub(doff),
    })
}
