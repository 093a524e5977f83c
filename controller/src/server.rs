//! The API's HTTP server: the listener, TLS, and the connection limits that keep any one
//! client from stalling or breaking the daemon. (Request limits, body size and rates, are
//! [`crate::limits`]'.)
//!
//! Contract:
//! - HTTP/1.1 (hyper) over TLS ([`ServerTls`]) or plain TCP ([`serve`]), or over the local
//!   unix socket ([`serve_local`]: no TLS; the peer's credentials, [`LocalPeer`], are what
//!   authenticates it). On a TLS listener, a connection whose first byte is not a TLS handshake
//!   gets a plain-text `400` saying to use `https://`, and is closed. Each request carries its
//!   peer as [`ConnectInfo`]: the `SocketAddr` over TCP, the [`LocalPeer`] on the socket.
//! - Deadlines of a connection: from its acceptance, its TLS handshake and first request head
//!   must have arrived within `header_timeout`; every later request head within
//!   `header_timeout` of its first byte (so a head sent a byte at a time is cut off); between
//!   requests it may stay idle `idle_timeout`. Past a deadline it is closed. A request being
//!   served has none here: its body has one ([`crate::limits`]) and the handlers bound their
//!   own waits.
//! - At most `max_connections` at once, per listener (the local socket has its own table: a
//!   flood over TCP never closes root's connection on the socket). A connection arriving at the cap closes the oldest one
//!   that is not serving a request; when every connection is serving one, accepting waits
//!   until one is done. Idle and slow clients therefore never lock others out and never use
//!   more file descriptors than the cap.
//! - [`raise_fd_limit`] raises the soft `RLIMIT_NOFILE` to the hard one; [`effective_cap`] keeps
//!   the cap to half of it, so the store, the dataplane and netlink always have descriptors.
//! - [`serve`] returns once `shutdown` resolves and every connection has finished the request it
//!   was serving (at most [`DRAIN_TIMEOUT`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::auth::LocalPeer;
use crate::tls::ServerTls;

/// How long [`serve`] lets connections finish their requests once asked to stop: a mutation
/// waits up to 10 s for the fleet to realize it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(12);

/// The connection limits (see the module contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Raises this process's soft limit of open files to its hard limit; returns the new soft
/// limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the valid, writable struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the valid struct passed; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// The connection cap to use: the setting, but at most half the open-file limit.
pub fn effective_cap(max_connections: usize, fd_limit: u64) -> usize {
    let half = usize::try_from(fd_limit / 2).unwrap_or(usize::MAX);
    max_connections.min(half).max(1)
}

/// What a connection is doing (the deadline it is under).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Receiving a request head (or, first, the TLS handshake): `header_timeout` from `since`.
    Head = 0,
    /// Serving a request: no deadline here.
    Busy = 1,
    /// Between requests: `idle_timeout` from `since`.
    Idle = 2,
}

/// One connection, as the table and its own task see it.
struct Conn {
    phase: AtomicU8,
    /// When the phase began, in milliseconds since the table's epoch.
    since_ms: AtomicU64,
    epoch: Instant,
    /// Woken on every change of phase (the deadline moves).
    changed: Notify,
    /// Woken to close the connection now (to make room for another).
    evict: Notify,
    /// Told to close to make room: it stays in the table, holding its descriptor, until its
    /// task has closed it.
    evicting: AtomicBool,
}

impl Conn {
    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        }
    }

    fn since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Acquire))
    }

    fn set(&self, phase: Phase) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(ms, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
        self.changed.notify_one();
    }

    /// Resolves when the connection is past its deadline.
    async fn expired(&self, settings: &Settings) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let limit = match self.phase() {
                Phase::Head => Some(settings.header_timeout),
                Phase::Idle => Some(settings.idle_timeout),
                Phase::Busy => None,
            };
            match limit {
                Some(limit) => {
                    let deadline = self.since() + limit;
                    if Instant::now() >= deadline {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// Every open connection.
struct Table {
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Woken whenever a connection ends.
    freed: Notify,
    evicted: AtomicU64,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            phase: AtomicU8::new(Phase::Head as u8),
            since_ms: AtomicU64::new(0),
            epoch: self.epoch,
            changed: Notify::new(),
            evict: Notify::new(),
            evicting: AtomicBool::new(false),
        });
        conn.set(Phase::Head);
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn close(&self, id: u64) {
        if self.lock().remove(&id).is_some() {
            self.freed.notify_waiters();
        }
    }

    /// Whether one more connection fits (below `cap`). At the cap, the connection that has
    /// waited longest without serving a request is told to close, unless one already is; it
    /// leaves the table only once its task has closed its socket ([`Table::close`], which wakes
    /// `freed`), so that the connections in the table are the descriptors held: never more than
    /// `cap`, however late the closing task runs on a busy machine.
    fn make_room(&self, cap: usize) -> bool {
        let conns = self.lock();
        if conns.len() < cap {
            return true;
        }
        if conns.values().any(|c| c.evicting.load(Ordering::Acquire)) {
            return false;
        }
        let victim = conns
            .iter()
            .filter(|(_, c)| c.phase() != Phase::Busy)
            .min_by_key(|(id, c)| (c.since(), **id))
            .map(|(_, c)| c.clone());
        if let Some(conn) = victim {
            conn.evicting.store(true, Ordering::Release);
            conn.evict.notify_one();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The stream of a connection, marking the start of a request head when bytes arrive on an
/// idle connection.
struct Watched<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.conn.phase() == Phase::Idle
        {
            self.conn.set(Phase::Head);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Sets the connection idle when a request is done (or abandoned).
struct ServeGuard(Arc<Conn>);

impl Drop for ServeGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Idle);
    }
}

/// What [`run`] accepts connections from: a TCP listener or the local unix socket.
trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Who is at the other end: what the requests carry as [`ConnectInfo`].
    type Peer: Clone + std::fmt::Display + Send + Sync + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Peer)>> + Send;
    /// Serves one accepted connection until it ends.
    fn drive(
        shared: Arc<Shared>,
        stream: Self::Stream,
        peer: Self::Peer,
        conn: Arc<Conn>,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;
    async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
    async fn drive(
        shared: Arc<Shared>,
        stream: TcpStream,
        peer: SocketAddr,
        conn: Arc<Conn>,
    ) -> Result<(), String> {
        connection(&shared, stream, peer, conn).await
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Peer = LocalPeer;
    async fn accept(&self) -> std::io::Result<(UnixStream, LocalPeer)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = LocalPeer::of(&stream);
        Ok((stream, peer))
    }
    async fn drive(
        shared: Arc<Shared>,
        stream: UnixStream,
        peer: LocalPeer,
        conn: Arc<Conn>,
    ) -> Result<(), String> {
        let io = Watched { inner: stream, conn: conn.clone() };
        http(&shared, TokioIo::new(io), peer, conn).await
    }
}

/// What [`run`] shares with every connection task.
struct Shared {
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: Settings,
    table: Table,
    draining: watch::Receiver<bool>,
}

/// Serves `app` on `listener` until `shutdown` resolves (see the module contract).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<ServerTls>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) {
    run(listener, app, tls, settings, shutdown).await;
}

/// Serves `app` on the local unix socket `listener` until `shutdown` resolves, with the same
/// connection limits as over TCP (see the module contract).
pub async fn serve_local(
    listener: UnixListener,
    app: Router,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) {
    run(listener, app, None, settings, shutdown).await;
}

async fn run<L: Listener>(
    listener: L,
    app: Router,
    tls: Option<ServerTls>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) {
    let (drain_tx, draining) = watch::channel(false);
    let shared = Arc::new(Shared {
        app,
        tls: tls.map(|t| tokio_rustls::TlsAcceptor::from(t.config)),
        settings,
        table: Table {
            epoch: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            freed: Notify::new(),
            evicted: AtomicU64::new(0),
        },
        draining,
    });
    tokio::pin!(shutdown);
    let mut last_report = Instant::now();
    let mut reported = 0u64;
    'accept: loop {
        loop {
            let freed = shared.table.freed.notified();
            if shared.table.make_room(settings.max_connections) {
                break;
            }
            tokio::select! {
                _ = freed => {}
                _ = &mut shutdown => break 'accept,
            }
        }
        let evicted = shared.table.evicted.load(Ordering::Relaxed);
        if evicted > reported && last_report.elapsed() >= Duration::from_secs(10) {
            tracing::warn!(
                closed = evicted - reported,
                cap = settings.max_connections,
                "API connection cap reached: closed the connections idle the longest to make room"
            );
            reported = evicted;
            last_report = Instant::now();
        }
        let (stream, peer) = tokio::select! {
            accepted = Listener::accept(&listener) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was
                    // accepted: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (id, conn) = shared.table.open();
        let shared = shared.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = L::drive(shared.clone(), stream, peer.clone(), conn.clone()) => r,
                _ = conn.expired(&shared.settings) => Err(format!("closed: no request within its deadline ({:?})", conn.phase())),
                _ = conn.evict.notified() => Err("closed to make room for another connection".into()),
            };
            if let Err(why) = outcome {
                tracing::debug!(%peer, "API connection {why}");
            }
            shared.table.close(id);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let drained = async {
        loop {
            let freed = shared.table.freed.notified();
            if shared.table.len() == 0 {
                return;
            }
            freed.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!(
            open = shared.table.len(),
            "API connections still busy after {DRAIN_TIMEOUT:?}; closing them"
        );
    }
}

/// The answer to a plain HTTP request on a TLS listener.
fn tls_required() -> Vec<u8> {
    let body = r#"{"error":{"code":"tls_required","message":"this API is served over TLS: use https://"}}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One connection: TLS, then HTTP/1.1 until the client or the server closes it.
async fn connection(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
) -> Result<(), String> {
    let mut io = Watched { inner: stream, conn: conn.clone() };
    match &shared.tls {
        None => http(shared, TokioIo::new(io), peer, conn).await,
        Some(acceptor) => {
            // A TLS connection starts with a handshake record (content type 22).
            let mut first = [0u8; 1];
            let n = io.inner.peek(&mut first).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            if first[0] != 0x16 {
                let _ = io.write_all(&tls_required()).await;
                let _ = io.shutdown().await;
                return Err("closed: plain HTTP on the TLS listener".into());
            }
            let tls = acceptor.accept(io).await.map_err(|e| format!("TLS handshake: {e}"))?;
            http(shared, TokioIo::new(tls), peer, conn).await
        }
    }
}

async fn http<I, P>(shared: &Shared, io: TokioIo<I>, peer: P, conn: Arc<Conn>) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let app = shared.app.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer.clone()));
        conn.set(Phase::Busy);
        let guard = ServeGuard(conn.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(req).await;
            drop(guard);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The deadlines are this module's (see `Conn::expired`).
    builder.header_read_timeout(None).keep_alive(true);
    let serving = builder.serve_connection(io, service);
    tokio::pin!(serving);
    let mut draining = shared.draining.clone();
    tokio::select! {
        r = serving.as_mut() => return r.map_err(|e| e.to_string()),
        _ = draining.wait_for(|d| *d) => {}
    }
    // Stopping: finish the request under way, then close.
    serving.as_mut().graceful_shutdown();
    serving.await.map_err(|e| e.to_string())
}

/// The TLS the settings ask for ([`crate::config::Config::api_transport`]): loads the given
/// certificate, or loads or generates the self-signed one (logging its fingerprint either way),
/// or `None` for plain HTTP (logged loudly when not on loopback).
pub fn tls_from_config(
    config: &crate::config::Config,
    host: &str,
) -> anyhow::Result<Option<ServerTls>> {
    use crate::config::ApiTransport;
    use anyhow::Context;
    let tls = match config.api_transport()? {
        ApiTransport::Http { insecure: false } => return Ok(None),
        ApiTransport::Http { insecure: true } => {
            tracing::warn!(
                listen = %config.listen,
                "INSECURE: the API is served over plain HTTP on an address that is not loopback \
                 (insecure_http): anyone on the path can read and change every request"
            );
            return Ok(None);
        }
        ApiTransport::TlsFiles { cert, key } => ServerTls::from_files(&cert, &key)
            .with_context(|| format!("loading the API certificate {}", cert.display()))?,
        ApiTransport::TlsSelfSigned => {
            let names = certificate_names(config.listen.ip(), host);
            let (tls, generated) = ServerTls::self_signed(&config.state_dir, &names)
                .context("loading or generating the API's self-signed certificate")?;
            if generated {
                tracing::info!(certificate = %tls.cert_path.display(), names = ?names,
                    "generated a self-signed certificate for the API");
            }
            tls
        }
    };
    tracing::info!(
        certificate = %tls.cert_path.display(),
        fingerprint = %tls.fingerprint,
        "the API is served over TLS; clients trust this certificate with `verse --ca-file {}` \
         or pin it with `verse --fingerprint {}`",
        tls.cert_path.display(),
        tls.fingerprint,
    );
    Ok(Some(tls))
}

/// What a self-signed certificate is made for: `localhost`, the loopback addresses, this host's
/// name and the machine's, and the listen address (every local address when it is the
/// unspecified one).
fn certificate_names(listen: IpAddr, host: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.push(host.to_owned());
    if let Ok(h) = crate::config::hostname() {
        names.push(h);
    }
    if listen.is_unspecified() {
        names.extend(local_addresses().iter().map(ToString::to_string));
    } else {
        names.push(listen.to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The addresses of this network namespace's interfaces (getifaddrs(3)); none if it fails.
fn local_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into the valid pointer passed; on success the list
    // is ours until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points to a sockaddr of the family it names.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: the family is AF_INET6, so the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                // Link-local addresses need a zone, which a certificate cannot name.
                if !ip.is_unicast_link_local() {
                    out.push(IpAddr::V6(ip));
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Whether `ip` is a loopback address (IPv4-mapped ones included).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_at_most_half_the_open_file_limit() {
        assert_eq!(effective_cap(1024, 20_000), 1024);
        assert_eq!(effective_cap(1024, 1024), 512);
        assert_eq!(effective_cap(1024, 0), 1);
    }

    #[test]
    fn at_the_cap_the_longest_waiting_connection_that_is_not_busy_makes_room() {
        let table = Table {
            epoch: Instant::now() - Duration::from_secs(100),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            freed: Notify::new(),
            evicted: AtomicU64::new(0),
        };
        let (a, ca) = table.open();
        std::thread::sleep(Duration::from_millis(5));
        let (b, cb) = table.open();
        std::thread::sleep(Duration::from_millis(5));
        let (c, cc) = table.open();
        ca.set(Phase::Busy);
        cc.set(Phase::Idle);
        assert!(table.make_room(4), "below the cap");
        // At the cap: `a` is busy; `b` has waited longer than `c`, so `b` is told to close,
        // and there is room only once its task has closed it.
        assert!(!table.make_room(3));
        assert!(cb.evicting.load(Ordering::Acquire) && !cc.evicting.load(Ordering::Acquire));
        assert!(!ca.evicting.load(Ordering::Acquire));
        assert!(!table.make_room(3), "one closing at a time: c is not told yet");
        assert!(!cc.evicting.load(Ordering::Acquire));
        table.close(b);
        assert!(table.make_room(3), "b's descriptor is gone");
        assert!(!table.make_room(2));
        assert!(cc.evicting.load(Ordering::Acquire));
        table.close(c);
        assert!(table.lock().contains_key(&a));
        assert!(!table.make_room(1), "only a busy connection is left");
        assert!(!ca.evicting.load(Ordering::Acquire));
        assert_eq!(table.evicted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn loopback_addresses() {
        assert!(is_loopback("127.0.0.1".parse().unwrap()));
        assert!(is_loopback("127.5.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
        assert!(!is_loopback("198.18.0.1".parse().unwrap()));
        assert!(!is_loopback("::".parse().unwrap()));
    }
}
