//! Raw sockets: other IP protocols, forged frames, crafted TCP connections, captures, and the
//! victim's sockets as judges of an attack.

use std::io::{self};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::*;

/// A raw IPv4 socket of protocol `proto` in `ns`, for protocols other than TCP, UDP and ICMP
/// (S7 "other protocols"). The kernel writes the IP header of what is sent; what is received
/// starts with the IP header.
pub struct RawIpSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawIpSocket {
    pub fn open(ns: &Netns, proto: u8) -> io::Result<RawIpSocket> {
        use std::os::fd::FromRawFd;
        let fd = ns.enter(|| {
            // SAFETY: socket(2) takes no pointers; the result is checked below.
            unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto))
            }
        });
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        Ok(RawIpSocket { fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } })
    }

    pub fn send_to(&self, dst: Ipv4Addr, payload: &[u8]) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            // Ignored for raw IPv4 sockets (net/ipv4/raw.c, raw_sendmsg).
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: `payload` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next packet within `timeout`: its source and its payload (after the IP header).
    pub fn recv(&self, timeout: Duration) -> io::Result<(Ipv4Addr, Vec<u8>)> {
        let packet = self.recv_packet(timeout)?;
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl {
            return Err(bad(format!("raw packet of {} bytes with IHL {ihl}", packet.len())));
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        Ok((src, packet[ihl..].to_vec()))
    }

    /// The next packet within `timeout`, IP header included.
    pub fn recv_packet(&self, timeout: Duration) -> io::Result<Vec<u8>> {
        recv_within(&self.fd, timeout, 2048)
    }
}

/// The next packet or frame on `fd` within `timeout` (`SO_RCVTIMEO`), at most `cap` bytes.
fn recv_within(fd: &impl AsRawFd, timeout: Duration, cap: usize) -> io::Result<Vec<u8>> {
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
    /// Starts seeing packets of protocol `proto` (6 TCP, 17 UDP, 1 ICMP) arriving in `ns`.
    pub fn open(ns: &Netns, proto: u8) -> Tap {
        let sock = RawIpSocket::open(ns, proto)
            .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
        Tap { sock }
    }

    /// Whether a packet from `src` arrives within `timeout` (packets from others are skipped).
    pub fn saw_from(&self, src: Ipv4Addr, timeout: Duration) -> bool {
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
        let sock = RawIpSocket::open(ns, proto)
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

/// Sends `msg` as IP protocol `proto` from `ns` to `ip` and returns the first answer from `ip`.
pub fn raw_ip_roundtrip(
    ns: &Netns,
    ip: Ipv4Addr,
    proto: u8,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    let sock = RawIpSocket::open(ns, proto)
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

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
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
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    timeout: Duration,
) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    ns.enter(|| {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let local = sockaddr_in(src.0, src.1);
        // SAFETY: `local` is a valid sockaddr_in for the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const local).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr_in(dst.0, dst.1);
        // SAFETY: as for bind.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const remote).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
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

/// The path MTU of a connected socket (`getsockopt(IP_MTU)`): what the kernel learnt from ICMP
/// "fragmentation needed" messages it accepted.
pub fn ip_mtu(sock: &impl AsRawFd) -> io::Result<u32> {
    int_option(sock, libc::IPPROTO_IP, libc::IP_MTU).map(|v| v as u32)
}

/// A connected UDP socket that reports ICMP errors about its datagrams (`IP_RECVERR`: port
/// unreachable as `ECONNREFUSED`, time exceeded as `EHOSTUNREACH`, parameter problem as
/// `EPROTO`, fragmentation needed as `EMSGSIZE`): the victim's view of an ICMP attack.
pub struct UdpProbe {
    sock: UdpSocket,
}

impl UdpProbe {
    /// Opens the socket in `ns`, connects it to `ip:port` and sends one datagram (`flow`).
    pub fn open(ns: &Netns, ip: Ipv4Addr, port: u16) -> io::Result<UdpProbe> {
        let sock = ns.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
        set_int_option(&sock, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
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
    pub src: Ipv4Addr,
    pub ty: u8,
    pub code: u8,
    /// The IPv4 datagram's length, bytes.
    pub len: usize,
}

/// Records every ICMP message delivered to a namespace (a raw ICMP socket receives a copy of
/// each), until dropped.
pub struct IcmpListener {
    seen: Arc<Mutex<Vec<IcmpSeen>>>,
    _stopper: Stopper,
}

impl IcmpListener {
    pub fn start(ns: &Netns) -> IcmpListener {
        let sock = RawIpSocket::open(ns, 1)
            .unwrap_or_else(|e| panic!("raw ICMP socket in {}: {e}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(p) = sock.recv_packet(Duration::from_millis(100)) else { continue };
                    let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
                    if ihl < 20 || p.len() < ihl + 2 {
                        continue;
                    }
                    seen.lock().expect("seen lock").push(IcmpSeen {
                        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                        ty: p[ihl],
                        code: p[ihl + 1],
                        len: p.len(),
                    });
                }
            })
        };
        IcmpListener { seen, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// What arrived from `src` so far.
    pub fn from(&self, src: Ipv4Addr) -> Vec<IcmpSeen> {
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
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    pub payload_len: usize,
}

/// The TCP segment in an Ethernet/IPv4 frame, if it is one.
pub fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let t = ip.get(ihl..total)?;
    if t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    Some(TcpSegment {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload_len: t.len().saturating_sub(doff),
    })
}
