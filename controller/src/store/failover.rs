//! How the etcd store reaches a cluster of several members: one member at a time, moving on
//! when it cannot be reached.
//!
//! etcd-client's own channel balances every request over every member (tower's power of two
//! choices) and keeps choosing a member whose process is gone: connecting to it fails at once,
//! so it never looks busy, and about every other request (a liveness renewal, an edit, the
//! watch) fails while one member of three is down. Here each member gets its own connection,
//! every request goes to the *pinned* member, and a request that fails in the transport
//! (connection refused, reset or timed out: no gRPC answer at all) moves the pin to the next
//! member, so that the retry every caller makes already goes to a live one. etcd forwards what a
//! follower cannot answer to the leader, so any live member serves every request.
//!
//! The pin starts at a random member, which spreads the hosts of a fleet over the members.
//! Connections are made lazily with the endpoint settings etcd-client chose (timeouts,
//! keep-alive, TLS).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use etcd_client::{BalancedChannelBuilder, Channel};
use futures::future::BoxFuture;
use http::Uri;
use tokio::sync::mpsc;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// Builds the failover channel for `etcd_client::Client::connect_with_balanced_channel`.
pub struct Failover {
    members: Arc<Members>,
}

/// A handle on the pin of a failover channel, for a caller that gave up waiting on the pinned
/// member (a timeout is no transport error: the channel cannot tell a slow member from a
/// stalled one, the caller's deadline can).
#[derive(Clone)]
pub struct Pin(Arc<Members>);

impl Failover {
    pub fn new() -> (Failover, Pin) {
        let members = Arc::new(Members {
            channels: Mutex::new(Vec::new()),
            pin: AtomicUsize::new(rand::random_range(0..1 << 16)),
            waiting: Mutex::new(Vec::new()),
        });
        (Failover { members: members.clone() }, Pin(members))
    }
}

impl Pin {
    /// The pinned member's URI (`None` before the channel knows its members).
    pub fn member(&self) -> Option<String> {
        let channels = lock(&self.0.channels);
        let pin = self.0.pin.load(Ordering::Acquire);
        channels.get(pin % channels.len().max(1)).map(|(u, _)| u.to_string())
    }

    /// Moves the pin on to the next member, because of `why`.
    pub fn move_on(&self, why: &dyn std::fmt::Display) {
        let pin = self.0.pin.load(Ordering::Acquire);
        let uri = {
            let channels = lock(&self.0.channels);
            channels.get(pin % channels.len().max(1)).map(|(u, _)| u.clone())
        };
        if let Some(uri) = uri {
            self.0.failed(pin, &uri, why);
        }
    }
}

impl BalancedChannelBuilder for Failover {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), etcd_client::Error> {
        let members = self.members;
        let (tx, mut rx) = mpsc::channel::<Change<Uri, Endpoint>>(buffer_size.max(1));
        let updating = members.clone();
        // Ends when the client (the sender) is dropped.
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                updating.change(change);
            }
        });
        let service = FailoverService { members, ready: None };
        Ok((Channel::Custom(BoxCloneSyncService::new(service)), tx))
    }
}

/// The members' connections, shared by every clone of the service.
struct Members {
    channels: Mutex<Vec<(Uri, tonic::transport::Channel)>>,
    /// The pinned member is `pin % len`; moving on is `pin + 1`.
    pin: AtomicUsize,
    /// Requests waiting for the first member to be known.
    waiting: Mutex<Vec<Waker>>,
}

impl Members {
    fn change(&self, change: Change<Uri, Endpoint>) {
        match change {
            Change::Insert(uri, endpoint) => {
                let channel = endpoint.connect_lazy();
                let mut channels = lock(&self.channels);
                channels.retain(|(u, _)| *u != uri);
                channels.push((uri, channel));
            }
            Change::Remove(uri) => lock(&self.channels).retain(|(u, _)| *u != uri),
        }
        for waker in lock(&self.waiting).drain(..) {
            waker.wake();
        }
    }

    /// The pinned member: the pin value it was chosen by, and its connection.
    fn pinned(&self, waker: &Waker) -> Option<(usize, Uri, tonic::transport::Channel)> {
        let channels = lock(&self.channels);
        if channels.is_empty() {
            lock(&self.waiting).push(waker.clone());
            return None;
        }
        let pin = self.pin.load(Ordering::Acquire);
        let (uri, channel) = &channels[pin % channels.len()];
        Some((pin, uri.clone(), channel.clone()))
    }

    /// A request to the member chosen by `pin` failed in the transport: move on to the next
    /// member, unless another request already did.
    fn failed(&self, pin: usize, uri: &Uri, error: &dyn std::fmt::Display) {
        if self
            .pin
            .compare_exchange(pin, pin.wrapping_add(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let channels = lock(&self.channels);
            let next = channels.get(pin.wrapping_add(1) % channels.len().max(1)).map(|(u, _)| u);
            tracing::warn!(member = %uri, next = ?next.map(ToString::to_string), error = %error,
                "etcd member unreachable; moving to the next member");
        }
    }
}

#[derive(Clone)]
struct FailoverService {
    members: Arc<Members>,
    /// The member `poll_ready` reserved a slot on, for the next `call`.
    ready: Option<(usize, Uri, tonic::transport::Channel)>,
}

impl Service<Request> for FailoverService {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(pinned) = self.members.pinned(cx.waker()) else {
            return Poll::Pending;
        };
        let (pin, uri, channel) = self.ready.insert(pinned);
        match channel.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                self.members.failed(*pin, uri, &e);
                self.ready = None;
                Poll::Ready(Err(e.into()))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let Some((pin, uri, mut channel)) = self.ready.take() else {
            return Box::pin(async {
                Err("the etcd channel was called before it was ready".into())
            });
        };
        let members = self.members.clone();
        let response = channel.call(request);
        Box::pin(async move {
            // An error here is the transport's (a gRPC error status is a response).
            response.await.map_err(|e| {
                members.failed(pin, &uri, &e);
                e.into()
            })
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
