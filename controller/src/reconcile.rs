//! The reconciler: makes this host's endpoint interfaces and dataplane maps match the desired
//! state, one published state at a time.
//!
//! Contract, for every state it sees (bursts coalesce: only the latest state is worked on):
//! 1. every endpoint of this host is plumbed ([`netlink::plumb`]), the `from_endpoint` program
//!    attached to its host side, and only then is the host side brought up; an endpoint that
//!    fails is logged, left out of the maps, and retried later, while the others proceed;
//! 2. the state is compiled for this host ([`compile::compile`]);
//! 3. the dataplane is moved from what it holds to the compiled form, writing only the
//!    differences ([`Dataplane::apply`]);
//! 4. if an endpoint the maps named is gone (here or on another host), every conntrack entry
//!    that names it is deleted ([`Dataplane::collect_conntrack`] with [`verdict::is_garbage`]:
//!    the flows of deleted endpoints end on every host, S7), with expired entries on the way;
//! 5. host-side interfaces of endpoints that are gone (already out of the maps after step 3) are
//!    detached and deleted;
//! 6. the state's revision is published as realized (S13), with the endpoints of step 1 and 5
//!    that failed as its errors ([`Realized`]): the revision is in force for everything else,
//!    and the failed ones are retried with backoff. A state whose step 2, 3 or 4 fails is not
//!    published; it is retried with backoff until it succeeds or a newer state arrives.
//!
//! Between rounds the same task collects conntrack garbage on a [`conntrack::Schedule`]
//! (expired entries, and any entry of an endpoint the maps no longer name), so that budgets
//! are given back; see [`crate::conntrack`].
//!
//! Nothing is cleared at start: the maps, pinned links and interfaces a previous run left keep
//! enforcing, and the first round starts from what the pinned maps hold, so a restart writes
//! nothing when nothing changed and keeps established flows.
//!
//! [`Reconciler::run`] may be cancelled at any await: every step is idempotent, and the next run
//! converges from whatever the kernel holds.
//!
//! A host with an underlay ([`Underlay::lookup`], once at start) reaches the endpoints of other
//! hosts through it: its endpoints get the underlay's MTU minus the encapsulation overhead, so
//! that every packet they send fits the underlay once wrapped.
//!
//! What the reconciler drives is a [`Target`]: this machine's kernel (netlink and the eBPF maps
//! of a [`Dataplane`]), or a simulated host's in-memory map set ([`SimMaps`], `versed
//! --simulate-hosts`). The two differ in steps 1 and 4 only (a simulated endpoint is "plumbed"
//! with a synthetic ifindex and has no interface to remove) and in what step 3 writes into
//! (both through [`MapSet`]); the store, the compiler and the bookkeeping are the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dataplane_common as dp;
use ipnetwork::{Ipv4Network, Ipv6Network};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::compile::{self, CidrIds, Ids, MapContents, RuleSlots};
use crate::conntrack::{self, Collected};
use crate::dataplane::{self, Dataplane};
use crate::model::{self, State};
use crate::netlink;
use crate::sim::SimMaps;
use crate::store::{HostError, Realized};
use crate::verdict::{self, Timeouts};

/// First retry delay after a failed round; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a round failed as a whole (one endpoint's plumbing failing does not fail the round).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the pinned maps at start failed.
    #[error("failed to read the pinned dataplane maps: {0}")]
    Read(#[source] MapSetError),
    /// The state does not compile for this host (it would not fit the maps, S12).
    #[error("failed to compile revision {revision} for host {host}: {source}")]
    Compile { revision: u64, host: String, source: model::Error },
    /// Writing the maps failed.
    #[error("failed to apply revision {revision} to the dataplane: {source}")]
    Apply { revision: u64, source: MapSetError },
    /// Listing the host-side interfaces failed.
    #[error("failed to list endpoint interfaces: {0}")]
    List(#[source] netlink::Error),
    /// Deleting the conntrack entries of deleted endpoints failed.
    #[error("failed to delete the flows of deleted endpoints (revision {revision}): {source}")]
    Flush { revision: u64, source: Box<dataplane::Error> },
}

/// Conntrack garbage collection, as `/metrics` shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcStats {
    /// Collections run (periodic, under pressure, and the flushes of deleted endpoints).
    pub runs: u64,
    pub scanned: u64,
    pub deleted: u64,
    pub restored: u64,
    /// Total wall time spent collecting.
    pub seconds: f64,
    /// The last collection.
    pub last: Collected,
}

/// Settings of connection tracking the reconciler needs.
#[derive(Clone, Debug)]
pub struct CtSettings {
    /// The idle timeouts the dataplane applies (S9), for garbage collection.
    pub timeouts: Timeouts,
    /// Longest time between two garbage collections.
    pub gc_interval: Duration,
}

/// How often the reconciler looks whether a garbage collection is due.
const GC_TICK: Duration = Duration::from_secs(1);

/// How often a host checks that the interfaces of its plumbed endpoints are still the ones it
/// made (a workload's namespace deleted behind Verse's back takes its veth with it, after the
/// kernel's own delay): a change starts a round, which reports the endpoint, without waiting
/// for the next edit.
const INTERFACE_CHECK: Duration = Duration::from_secs(2);

/// Why the underlay interface cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// No interface of that name in the daemon's namespace.
    #[error("underlay interface {iface} not found")]
    Missing { iface: String },
    /// The interface has no IPv4 address to send from and receive on.
    #[error("underlay interface {iface} has no IPv4 address")]
    NoAddress { iface: String },
    /// Asking the kernel about the interface failed.
    #[error("looking up underlay interface {iface}: {source}")]
    Netlink { iface: String, source: netlink::Error },
    /// Reading its MTU failed.
    #[error("reading the MTU of underlay interface {iface} (SIOCGIFMTU): {source}")]
    Mtu { iface: String, source: std::io::Error },
    /// Its MTU leaves too little room for a workload packet.
    #[error(
        "underlay interface {iface} has MTU {mtu}, below the {min} needed for the encapsulation \
         ({overhead} bytes) and a workload MTU that can quote a refused packet in an ICMP error"
    )]
    MtuTooSmall { iface: String, mtu: u32, min: u32, overhead: u32 },
}

/// This host's underlay interface, as the kernel reported it at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub iface: String,
    pub ifindex: u32,
    /// The outer source of everything this host wraps; other hosts know it from the store.
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// Smallest workload MTU with an underlay: the dataplane's "fragmentation needed" quotes the
/// first 128 bytes of the refused packet, so a refused packet must be longer than that.
const MIN_ENDPOINT_MTU: u32 = 128;

impl Underlay {
    /// Looks `iface` up in the daemon's namespace: its index, first IPv4 address and MTU.
    pub async fn lookup(iface: &str) -> Result<Underlay, UnderlayError> {
        let netlink_err = |source| UnderlayError::Netlink { iface: iface.into(), source };
        let ifindex = netlink::ifindex(iface)
            .await
            .map_err(netlink_err)?
            .ok_or_else(|| UnderlayError::Missing { iface: iface.into() })?;
        let ip = netlink::ipv4_address(iface)
            .await
            .map_err(netlink_err)?
            .ok_or_else(|| UnderlayError::NoAddress { iface: iface.into() })?;
        let mtu = netlink::interface_mtu(iface)
            .map_err(|source| UnderlayError::Mtu { iface: iface.into(), source })?;
        let min = MIN_ENDPOINT_MTU + dp::ENCAP_OVERHEAD;
        if mtu < min {
            return Err(UnderlayError::MtuTooSmall {
                iface: iface.into(),
                mtu,
                min,
                overhead: dp::ENCAP_OVERHEAD,
            });
        }
        Ok(Underlay { iface: iface.into(), ifindex, ip, mtu })
    }

    /// The MTU of this host's endpoints: what is left of the underlay's after the encapsulation.
    pub fn endpoint_mtu(&self) -> u32 {
        self.mtu - dp::ENCAP_OVERHEAD
    }

    /// Fills the underlay settings of the dataplane's configuration.
    pub fn configure(&self, config: &mut dp::Config) {
        config.underlay_ifindex = self.ifindex;
        config.underlay_ip = self.ip.octets();
        config.underlay_mtu = self.mtu;
    }
}

/// Why one local endpoint could not be put in the dataplane (the round goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The state names a universe that does not exist (a corrupt state).
    #[error("endpoint {endpoint}: universe {universe} not found")]
    NoUniverse { endpoint: String, universe: String },
    /// The endpoint's IP is in no CIDR of its universe, so it has no gateway.
    #[error("endpoint {endpoint}: ip {ip} is in no CIDR of universe {universe}")]
    NoGateway { endpoint: String, ip: Ipv4Addr, universe: String },
    /// The endpoint's IPv6 address is in no IPv6 CIDR of its universe, so it has no gateway.
    #[error("endpoint {endpoint}: ipv6 {ip} is in no IPv6 CIDR of universe {universe}")]
    NoGateway6 { endpoint: String, ip: std::net::Ipv6Addr, universe: String },
    /// Making its veth pair failed.
    #[error("endpoint {endpoint}: {source}")]
    Plumb { endpoint: String, source: netlink::Error },
    /// Attaching `from_endpoint` to its host side failed.
    #[error("endpoint {endpoint}: {source}")]
    Attach { endpoint: String, source: dataplane::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a local endpoint was plumbed with; a change means plumbing it again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlumbSpec {
    interface: String,
    netns: String,
    ip: Ipv4Addr,
    mac: String,
    gateway: Ipv4Addr,
    /// Its IPv6 address and IPv6 gateway, if it has one.
    ipv6: Option<netlink::Ipv6Plumb>,
}

/// A local endpoint that this process has plumbed and attached.
#[derive(Clone, Debug)]
struct Plumbed {
    spec: PlumbSpec,
    ifindex: u32,
}

/// What one round did, beyond succeeding.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Local endpoints left out of the maps because plumbing or attaching failed, and why.
    pub failed_endpoints: Vec<HostError>,
    /// Interfaces of gone endpoints that could not be removed.
    pub failed_removals: Vec<String>,
    /// Whether the maps had to change (a restart with nothing new writes nothing).
    pub wrote_maps: bool,
}

impl Outcome {
    fn needs_retry(&self) -> bool {
        !self.failed_endpoints.is_empty() || !self.failed_removals.is_empty()
    }

    /// What the host reports it could not realize (S13): the endpoints that failed, and the
    /// gone endpoints whose interface is still there.
    fn errors(&self) -> Vec<HostError> {
        let mut errors = self.failed_endpoints.clone();
        for iface in &self.failed_removals {
            let endpoint = iface
                .strip_prefix(netlink::INTERFACE_PREFIX)
                .map_or_else(|| iface.clone(), |n| format!("ep-{n}"));
            errors.push(HostError {
                endpoint,
                code: "internal".into(),
                message: format!("interface {iface} of a deleted endpoint could not be removed"),
            });
        }
        errors
    }
}

impl EndpointError {
    /// How a client should take this failure (see [`HostError::code`]).
    pub fn code(&self) -> &'static str {
        use netlink::Error as N;
        match self {
            // The namespace does not exist on this host.
            EndpointError::Plumb { source: N::OpenNetns { source, .. }, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                "not_found"
            }
            // It is there but is no namespace.
            EndpointError::Plumb { source: N::OpenNetns { .. } | N::Setns { .. }, .. } => {
                "invalid_argument"
            }
            // Something of the same name is in the way.
            EndpointError::Plumb {
                source: N::ForeignInterface { .. } | N::PeerMismatch { .. },
                ..
            } => "conflict",
            EndpointError::Plumb { source: N::CreateVeth { source, .. }, .. } if matches!(&**source, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST) => {
                "conflict"
            }
            _ => "internal",
        }
    }
}

/// The dataplane, shared between the reconciler (the only writer) and readers of its counters
/// (`/metrics`). The lock is never held across an await.
pub type SharedDataplane = Arc<Mutex<Dataplane>>;

/// A simulated host's maps, shared between its reconciler (the only writer) and whoever reports
/// on the simulation.
pub type SharedSimMaps = Arc<Mutex<SimMaps>>;

/// Why reading or writing a map set failed.
pub type MapSetError = Box<dyn std::error::Error + Send + Sync>;

/// The maps the reconciler writes: the kernel's ([`Dataplane`]) or a simulated host's
/// ([`SimMaps`]). Same contract as [`Dataplane::read`] and [`Dataplane::apply`].
pub trait MapSet {
    /// What the maps hold.
    fn read(&self) -> Result<MapContents, MapSetError>;
    /// Writes the difference between `current` (what the maps hold) and `desired`.
    fn apply(&mut self, current: &MapContents, desired: &MapContents) -> Result<(), MapSetError>;
}

impl MapSet for Dataplane {
    fn read(&self) -> Result<MapContents, MapSetError> {
        Ok(Dataplane::read(self)?)
    }
    fn apply(&mut self, current: &MapContents, desired: &MapContents) -> Result<(), MapSetError> {
        Ok(Dataplane::apply(self, current, desired)?)
    }
}

/// What the reconciler drives (see the module docs).
pub enum Target {
    /// This machine: endpoint interfaces through netlink, the maps of the eBPF dataplane.
    Kernel(SharedDataplane),
    /// A simulated host: no interfaces, endpoints numbered from [`SIM_FIRST_IFINDEX`], the
    /// maps in memory.
    Simulated(SharedSimMaps),
}

/// The first synthetic ifindex of a simulated host's endpoints.
pub const SIM_FIRST_IFINDEX: u32 = 1000;

/// The state of the revision the reconciler last realized (what `verse trace` evaluates).
pub type RealizedState = Arc<Mutex<Arc<State>>>;

/// Keeps this host's interfaces and dataplane in line with the desired state.
pub struct Reconciler {
    /// Set to each state once it is realized.
    realized_state: Option<RealizedState>,
    /// Flow logs, told of every conntrack entry garbage collection deletes.
    flow_logs: Option<Arc<crate::flowlogs::FlowLogs>>,
    target: Target,
    host: String,
    mtu: u32,
    /// CIDR class ids and rule counter slots, kept stable from round to round.
    ids: Ids,
    /// What the maps hold: read from the pins at start, then what the last apply wrote.
    applied: MapContents,
    /// An apply failed part way and reading the maps back failed too: `applied` may not be what
    /// they hold, so the next round reads them before it diffs against them.
    unread: bool,
    /// Local endpoints plumbed and attached by this process, by endpoint id.
    plumbed: HashMap<String, Plumbed>,
    /// The next synthetic ifindex of a simulated host.
    next_sim_ifindex: u32,
    /// The endpoints in the maps, by host-side ifindex, as of the last round (for events).
    local: watch::Sender<Arc<BTreeMap<u32, String>>>,
    ct: CtSettings,
    gc: conntrack::Schedule,
    gc_stats: Arc<Mutex<GcStats>>,
    /// Endpoints gone from the maps whose conntrack entries are not deleted yet.
    flush_pending: usize,
    /// Entries `applied` holds (`MapContents::entries`), for `/metrics`.
    entries: Arc<AtomicU64>,
}

impl Reconciler {
    /// Starts from what the pinned maps hold (nothing is cleared), numbering CIDR classes and
    /// rule counter slots as they are numbered there, so the first round writes only real
    /// differences and every rule's count stays in its slot.
    /// `gc_stats` receives what every garbage collection did.
    pub fn new(
        dataplane: SharedDataplane,
        host: String,
        mtu: u32,
        ct: CtSettings,
        gc_stats: Arc<Mutex<GcStats>>,
    ) -> Result<Reconciler> {
        Reconciler::with_target(Target::Kernel(dataplane), host, mtu, ct, gc_stats)
    }

    /// The reconciler of a simulated host, starting from what `maps` hold. It has no conntrack
    /// table (no packets), so it collects nothing.
    pub fn simulated(maps: SharedSimMaps, host: String) -> Result<Reconciler> {
        let ct = CtSettings { timeouts: Timeouts::default(), gc_interval: Duration::from_secs(30) };
        Reconciler::with_target(Target::Simulated(maps), host, 1500, ct, Arc::default())
    }

    fn with_target(
        target: Target,
        host: String,
        mtu: u32,
        ct: CtSettings,
        gc_stats: Arc<Mutex<GcStats>>,
    ) -> Result<Reconciler> {
        let applied = with_maps(&target, |m| m.read()).map_err(Error::Read)?;
        let ids = seed_ids(&applied);
        let local = watch::channel(Arc::new(BTreeMap::new())).0;
        let gc = conntrack::Schedule::new(ct.gc_interval);
        let entries = Arc::new(AtomicU64::new(applied.entries() as u64));
        Ok(Reconciler {
            realized_state: None,
            flow_logs: None,
            target,
            host,
            mtu,
            ids,
            applied,
            unread: false,
            plumbed: HashMap::new(),
            next_sim_ifindex: SIM_FIRST_IFINDEX,
            local,
            ct,
            gc,
            gc_stats,
            flush_pending: 0,
            entries,
        })
    }

    /// Follows the local endpoints the maps hold: host-side ifindex -> endpoint id, published
    /// after every round that wrote the maps.
    pub fn local_endpoints(&self) -> watch::Receiver<Arc<BTreeMap<u32, String>>> {
        self.local.subscribe()
    }

    /// The entries the maps hold as of the last round (`MapContents::entries`: what the
    /// reconciler wrote; conntrack aside).
    pub fn map_entries(&self) -> Arc<AtomicU64> {
        self.entries.clone()
    }

    /// The same reconciler, also keeping each realized state in `slot`.
    pub fn with_realized_state(mut self, slot: RealizedState) -> Reconciler {
        self.realized_state = Some(slot);
        self
    }

    /// The same reconciler, telling `logs` of the conntrack entries it deletes.
    pub fn with_flow_logs(mut self, logs: Arc<crate::flowlogs::FlowLogs>) -> Reconciler {
        self.flow_logs = Some(logs);
        self
    }

    /// What the pinned maps held at start (from a previous run): endpoints, routes to remote
    /// ones and policy entries, all counted.
    pub fn inherited(&self) -> usize {
        let a = &self.applied;
        a.endpoints.len() + a.routes.len() + a.policy.len() + a.cidrs.len()
    }

    /// Reconciles every state `states` publishes and publishes each realized revision on
    /// `realized`, until `states` closes or `stop` changes; a round under way is finished first.
    /// See the module contract.
    pub async fn run(
        mut self,
        mut states: watch::Receiver<Arc<State>>,
        realized: watch::Sender<Realized>,
        mut stop: watch::Receiver<()>,
    ) {
        let mut backoff = RETRY_MIN;
        let mut gc_tick = tokio::time::interval(GC_TICK);
        gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut interface_tick = tokio::time::interval(INTERFACE_CHECK);
        interface_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `borrow_and_update` takes the latest state only: a burst of edits is one round.
            let state = states.borrow_and_update().clone();
            let round = std::time::Instant::now();
            let reconciled = self.reconcile(&state).await;
            crate::phases::since(crate::phases::Phase::Reconcile, round);
            let retry_at = match reconciled {
                Ok(outcome) => {
                    if let Some(slot) = &self.realized_state {
                        *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            state.clone();
                    }
                    let report = Realized { errors: outcome.errors(), ..Realized::of(&state) };
                    let previous = realized.send_replace(report.clone());
                    // Retries of a realized revision that change nothing are not news.
                    let news = previous != report || outcome.wrote_maps;
                    if news {
                        tracing::info!(
                            revision = state.revision,
                            endpoints = self.applied.endpoints.len(),
                            policy_entries = self.applied.policy.len(),
                            cidr_classes = self.applied.cidrs.len(),
                            wrote_maps = outcome.wrote_maps,
                            "revision realized"
                        );
                    }
                    if outcome.needs_retry() {
                        tracing::warn!(
                            revision = state.revision,
                            failed_endpoints = ?outcome.failed_endpoints.iter().map(|e| &e.endpoint).collect::<Vec<_>>(),
                            failed_removals = ?outcome.failed_removals,
                            retry_in = ?backoff,
                            "revision realized, except for some endpoints"
                        );
                        Some(next_retry(&mut backoff))
                    } else {
                        backoff = RETRY_MIN;
                        None
                    }
                }
                Err(e) => {
                    tracing::error!(revision = state.revision, error = %e, retry_in = ?backoff, "reconcile failed");
                    Some(next_retry(&mut backoff))
                }
            };
            loop {
                tokio::select! {
                    changed = states.changed() => {
                        if changed.is_err() {
                            tracing::info!("the store closed; the reconciler stops");
                            return;
                        }
                    }
                    _ = sleep_until(retry_at), if retry_at.is_some() => {}
                    _ = stop.changed() => {
                        tracing::info!("asked to stop; the reconciler stops");
                        return;
                    }
                    _ = gc_tick.tick() => {
                        self.collect_if_due();
                        continue;
                    }
                    _ = interface_tick.tick() => {
                        if !self.interfaces_changed().await {
                            continue;
                        }
                    }
                }
                break;
            }
        }
    }

    /// The kernel's dataplane, unless this host is simulated (which has no conntrack).
    fn kernel(&self) -> Option<SharedDataplane> {
        match &self.target {
            Target::Kernel(dataplane) => Some(dataplane.clone()),
            Target::Simulated(_) => None,
        }
    }

    /// Runs a garbage collection of conntrack if the schedule says it is due. A failure is
    /// logged; the next tick tries again.
    pub fn collect_if_due(&mut self) {
        let Some(dataplane) = self.kernel() else {
            return;
        };
        let owners = lock(&dataplane).ct_owners();
        if !self.gc.due(Instant::now().into_std(), now_ns(), &owners) {
            return;
        }
        if let Err(e) = self.collect(&owners) {
            tracing::error!(error = %e, "conntrack garbage collection failed");
        }
    }

    /// Whether an interface of a plumbed endpoint is gone or was made anew (another ifindex)
    /// since it was plumbed (the kernel only: a simulated host's interfaces are the
    /// reconciler's). A failed listing is no change: the next round lists them again anyway.
    async fn interfaces_changed(&self) -> bool {
        if self.kernel().is_none() || self.plumbed.is_empty() {
            return false;
        }
        match netlink::verse_interfaces().await {
            Ok(existing) => {
                self.plumbed.values().any(|p| existing.get(&p.spec.interface) != Some(&p.ifindex))
            }
            Err(e) => {
                tracing::debug!(error = %e, "listing the endpoint interfaces failed");
                false
            }
        }
    }

    /// One garbage collection: expired entries, and those naming an endpoint the maps do not
    /// (see [`verdict::is_garbage`]). `owners` are the counters read before (for the schedule's
    /// notion of pressure).
    fn collect(
        &mut self,
        owners: &std::collections::BTreeMap<u32, dp::CtOwner>,
    ) -> Result<Collected, dataplane::Error> {
        let Some(dataplane) = self.kernel() else {
            return Ok(Collected::default());
        };
        let start = Instant::now().into_std();
        let now = now_ns();
        let live = self.applied.serials();
        let timeouts = self.ct.timeouts;
        let alive = |serial: u64| live.contains(&serial);
        let garbage = |e: &dp::CtEntry| verdict::is_garbage(e, now, &timeouts, &alive);
        // The earliest expiry among the entries of owners under pressure: when to look again.
        let mut due: Option<u64> = None;
        let pressed: BTreeSet<u32> =
            owners.iter().filter(|(_, o)| self.gc.pressed(o)).map(|(s, _)| *s).collect();
        let mut kept = |e: &dp::CtEntry| {
            if pressed.contains(&e.owner_slot) {
                let at = e.last_seen_ns.saturating_add(timeouts.of(e.state));
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        };
        let logs = self.flow_logs.clone();
        let mut gone = |k: &crate::conntrack::Flow, v: &dp::CtValue| {
            if let Some(l) = &logs {
                l.gone(k, v);
            }
        };
        let report =
            lock(&dataplane).collect_conntrack_reporting(&garbage, &mut kept, &mut gone)?;
        self.gc.done(start, &report, due);
        let mut stats = self.gc_stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stats.runs += 1;
        stats.scanned += report.scanned;
        stats.deleted += report.deleted;
        stats.restored += report.restored;
        stats.seconds += report.duration.as_secs_f64();
        stats.last = report;
        tracing::debug!(
            scanned = report.scanned,
            deleted = report.deleted,
            restored = report.restored,
            took = ?report.duration,
            "conntrack garbage collected"
        );
        Ok(report)
    }

    /// One round for `state` (steps 1–4 of the module contract; the caller publishes).
    pub async fn reconcile(&mut self, state: &State) -> Result<Outcome> {
        let mut outcome = Outcome::default();
        // This host's endpoints, from the index (a walk over every endpoint of the fleet grew
        // each round with the fleet).
        let indexed = state.indexed();
        let local: Vec<&model::Endpoint> = match &indexed {
            std::borrow::Cow::Borrowed(s) => host_endpoints(s, &self.host),
            std::borrow::Cow::Owned(_) => {
                state.endpoints.values().filter(|e| e.host == self.host).collect()
            }
        };

        // 1. Plumb and attach. Endpoints gone from the state are forgotten here and their
        //    interfaces removed in step 4, after the maps no longer name them. An endpoint whose
        //    interface vanished or was made anew behind our back (its namespace was deleted,
        //    say) is forgotten too, so it is plumbed again or, failing that, left out of the maps.
        let existing = match &self.target {
            Target::Kernel(_) => netlink::verse_interfaces().await.map_err(Error::List)?,
            // A simulated endpoint's "interface" lives as long as the reconciler says.
            Target::Simulated(_) => {
                self.plumbed.values().map(|p| (p.spec.interface.clone(), p.ifindex)).collect()
            }
        };
        let host = &self.host;
        self.plumbed.retain(|id, p| {
            state.endpoints.get(id).is_some_and(|e| &e.host == host)
                && existing.get(&p.spec.interface) == Some(&p.ifindex)
        });
        for ep in &local {
            if let Err(e) = self.ensure_plumbed(state, ep).await {
                tracing::error!(interface = %ep.interface, netns = %ep.netns, error = %e,
                    "endpoint left out of the dataplane");
                self.plumbed.remove(&ep.id);
                outcome.failed_endpoints.push(HostError {
                    endpoint: ep.id.clone(),
                    code: e.code().into(),
                    message: e.to_string(),
                });
            }
        }

        // 2. Compile, with only the endpoints that are plumbed and attached.
        let plumbed = &self.plumbed;
        let ifindex = |ep: &model::Endpoint| plumbed.get(&ep.id).map(|p| p.ifindex);
        let compiling = std::time::Instant::now();
        let desired =
            compile::compile(state, &self.host, &ifindex, &mut self.ids).map_err(|source| {
                Error::Compile { revision: state.revision, host: self.host.clone(), source }
            });
        crate::phases::since(crate::phases::Phase::Compile, compiling);
        let desired = desired?;

        // 3. Write the differences, against what the maps hold.
        if self.unread {
            let now = with_maps(&self.target, |maps| maps.read()).map_err(Error::Read)?;
            self.ids = merge_ids(seed_ids(&now), &self.ids);
            self.applied = now;
            self.unread = false;
        }
        if desired != self.applied {
            let applied = &self.applied;
            let failed = with_maps(&self.target, |maps| {
                let source = maps.apply(applied, &desired).err()?;
                // The maps now hold something between the two states: read them back so the
                // next attempt diffs against the truth, and keep every CIDR class id and rule
                // slot they still hold reserved, so that none is given to another class or rule
                // while the maps still carry it for the old one.
                Some((source, maps.read()))
            });
            if let Some((source, now)) = failed {
                match now {
                    Ok(now) => {
                        self.ids = merge_ids(seed_ids(&now), &self.ids);
                        self.applied = now;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "failed to read the maps back after a failed apply");
                        self.unread = true;
                    }
                }
                return Err(Error::Apply { revision: state.revision, source });
            }
            let gone = self.applied.serials().difference(&desired.serials()).count();
            self.flush_pending += gone;
            self.applied = desired;
            outcome.wrote_maps = true;
        }
        self.entries.store(self.applied.entries() as u64, Ordering::Relaxed);
        let in_maps: BTreeMap<u32, String> = self
            .plumbed
            .iter()
            .filter(|(_, p)| self.applied.endpoints.contains_key(&p.ifindex))
            .map(|(id, p)| (p.ifindex, id.clone()))
            .collect();
        self.local.send_if_modified(|cur| {
            if **cur == in_maps {
                return false;
            }
            *cur = Arc::new(in_maps);
            true
        });

        // 4. The flows of endpoints that are gone, on this host, before the revision counts as
        //    realized (a failed flush is retried with the round). A simulated host has none.
        if self.flush_pending > 0 {
            if let Some(dataplane) = self.kernel() {
                let owners = lock(&dataplane).ct_owners();
                let report = self.collect(&owners).map_err(|source| Error::Flush {
                    revision: state.revision,
                    source: Box::new(source),
                })?;
                tracing::info!(
                    endpoints = self.flush_pending,
                    deleted = report.deleted,
                    took = ?report.duration,
                    "deleted the conntrack entries of endpoints that are gone"
                );
            }
            self.flush_pending = 0;
        }

        // 5. (The kernel only.) Remove the interfaces of endpoints that are gone, and link pins
        //    whose interface
        //    went away by itself (its namespace was deleted, say).
        let Target::Kernel(dataplane) = &self.target else {
            return Ok(outcome);
        };
        let wanted: BTreeSet<&str> = local.iter().map(|e| e.interface.as_str()).collect();
        let pinned = lock(dataplane).pinned_links();
        match pinned {
            Ok(pinned) => {
                for iface in pinned
                    .iter()
                    .filter(|i| !wanted.contains(i.as_str()) && !existing.contains_key(*i))
                {
                    if let Err(e) = lock(dataplane).detach_endpoint(iface) {
                        tracing::warn!(interface = %iface, error = %e, "failed to remove a stale link pin");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "failed to list the pinned links"),
        }
        for iface in existing.into_keys() {
            if wanted.contains(iface.as_str()) {
                continue;
            }
            if let Err(e) = lock(dataplane).detach_endpoint(&iface) {
                tracing::warn!(interface = %iface, error = %e, "failed to detach the program of a gone endpoint");
            }
            match netlink::unplumb(&iface).await {
                Ok(()) => {
                    tracing::info!(interface = %iface, "removed the interface of a gone endpoint")
                }
                Err(e) => {
                    tracing::error!(interface = %iface, error = %e, "failed to remove the interface of a gone endpoint");
                    outcome.failed_removals.push(iface);
                }
            }
        }
        Ok(outcome)
    }

    /// Plumbs and attaches `ep` unless this process already did so with the same settings.
    async fn ensure_plumbed(
        &mut self,
        state: &State,
        ep: &model::Endpoint,
    ) -> Result<(), EndpointError> {
        let universe = state.universes.get(&ep.universe).ok_or_else(|| {
            EndpointError::NoUniverse { endpoint: ep.id.clone(), universe: ep.universe.clone() }
        })?;
        let gateway = model::gateway(universe, ep.ip).ok_or_else(|| EndpointError::NoGateway {
            endpoint: ep.id.clone(),
            ip: ep.ip,
            universe: universe.id.clone(),
        })?;
        let ipv6 = match ep.ipv6 {
            None => None,
            Some(ip) => Some(netlink::Ipv6Plumb {
                ip,
                gateway: model::gateway6(universe, ip).ok_or_else(|| {
                    EndpointError::NoGateway6 {
                        endpoint: ep.id.clone(),
                        ip,
                        universe: universe.id.clone(),
                    }
                })?,
            }),
        };
        let spec = PlumbSpec {
            interface: ep.interface.clone(),
            netns: ep.netns.clone(),
            ip: ep.ip,
            mac: ep.mac.clone(),
            gateway,
            ipv6,
        };
        if self.plumbed.get(&ep.id).is_some_and(|p| p.spec == spec) {
            return Ok(());
        }
        let dataplane = match &self.target {
            Target::Kernel(dataplane) => dataplane,
            Target::Simulated(_) => {
                let ifindex = self.next_sim_ifindex;
                self.next_sim_ifindex += 1;
                self.plumbed.insert(ep.id.clone(), Plumbed { spec, ifindex });
                return Ok(());
            }
        };
        let ifindex = netlink::plumb(ep, self.mtu, gateway, ipv6)
            .await
            .map_err(|source| EndpointError::Plumb { endpoint: ep.id.clone(), source })?;
        // Idempotent: after a restart the pinned link is found, kept, and its program swapped
        // atomically for the one loaded now.
        lock(dataplane)
            .attach_endpoint(&ep.interface)
            .map_err(|source| EndpointError::Attach { endpoint: ep.id.clone(), source })?;
        // Only now, with the program in place, may the workload's packets reach this namespace.
        netlink::set_up(&ep.interface)
            .await
            .map_err(|source| EndpointError::Plumb { endpoint: ep.id.clone(), source })?;
        tracing::info!(endpoint = %ep.id, interface = %ep.interface, ifindex, netns = %ep.netns, ip = %ep.ip,
            "endpoint plumbed");
        self.plumbed.insert(ep.id.clone(), Plumbed { spec, ifindex });
        Ok(())
    }
}

/// The conntrack clock: `CLOCK_MONOTONIC_COARSE`, which the dataplane stamps entries with
/// (`bpf_ktime_get_coarse_ns`).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn next_retry(backoff: &mut Duration) -> Instant {
    let at = Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(RETRY_MAX);
    at
}

/// The endpoints of `host` in an indexed `state`.
fn host_endpoints<'a>(state: &'a State, host: &str) -> Vec<&'a model::Endpoint> {
    state
        .idx
        .host_endpoints
        .get(host)
        .into_iter()
        .flatten()
        .filter_map(|id| state.endpoints.get(id))
        .filter(|e| e.host == host)
        .collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Locks the shared dataplane (or a simulated host's maps). A holder that panicked left the
/// kernel maps as they were (every write is one syscall), and the reconciler diffs against what
/// it reads, so a poisoned lock is still usable.
fn lock<T>(maps: &Mutex<T>) -> MutexGuard<'_, T> {
    maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` on the maps `target` writes, locked.
fn with_maps<R>(target: &Target, f: impl FnOnce(&mut dyn MapSet) -> R) -> R {
    match target {
        Target::Kernel(dataplane) => f(&mut *lock(dataplane)),
        Target::Simulated(maps) => f(&mut *lock(maps)),
    }
}

/// The numberings the maps hold: CIDR classes ([`seed_cidr_ids`]) and rule counter slots
/// ([`seed_rule_slots`]).
pub fn seed_ids(maps: &MapContents) -> Ids {
    Ids {
        cidrs: seed_cidr_ids(maps),
        rule_slots: seed_rule_slots(maps),
        cidrs6: seed_cidr6_ids(maps),
    }
}

/// The rule counter slots the policy entries carry (`MapContents::rules`, read from the values
/// of `VERSE_POLICY`): after a restart every rule keeps the slot its count is in. A rule seen
/// with two slots keeps the smaller; the compiler gives a fresh one to whatever it does not
/// trust.
pub fn seed_rule_slots(maps: &MapContents) -> RuleSlots {
    let mut slots = RuleSlots::default();
    for (&slot, &rule) in &maps.rules {
        if rule != 0 {
            slots.ids.entry(rule).or_insert(slot);
        }
    }
    slots
}

/// `held` (what the maps hold) plus what `compiled` numbered that `held` lacks, unless the id or
/// slot is already taken in `held` (see `StableIds::merged_with`).
fn merge_ids(held: Ids, compiled: &Ids) -> Ids {
    Ids {
        cidrs: held.cidrs.merged_with(&compiled.cidrs),
        rule_slots: held.rule_slots.merged_with(&compiled.rule_slots),
        cidrs6: held.cidrs6.merged_with(&compiled.cidrs6),
    }
}

/// The CIDR class numbering that `VERSE_CIDRS` holds: key (vni, CIDR), value `CIDR_FLAG | id`.
/// Entries that cannot be Verse's (a prefix shorter than the VNI) are skipped; the compiler
/// renumbers whatever it does not trust.
pub fn seed_cidr_ids(maps: &MapContents) -> CidrIds {
    let mut ids = CidrIds::default();
    for (&(prefix_len, key), &value) in &maps.cidrs {
        let Some((vni, addr, prefix)) = dp::CidrKey::decode(prefix_len, &key) else {
            continue;
        };
        let Ok(cidr) = Ipv4Network::new(Ipv4Addr::from(addr), prefix) else {
            continue;
        };
        ids.ids.insert((vni, cidr), value & !dp::peer::CIDR_FLAG);
    }
    ids
}

/// The IPv6 CIDR class numbering that `VERSE_CIDRS6` holds, as [`seed_cidr_ids`] reads
/// `VERSE_CIDRS`.
pub fn seed_cidr6_ids(maps: &MapContents) -> compile::CidrIds6 {
    let mut ids = compile::CidrIds6::default();
    for (&(prefix_len, key), &value) in &maps.ipv6.cidrs {
        let Some((vni, addr, prefix)) = dp::Cidr6Key::decode(prefix_len, &key) else {
            continue;
        };
        let Ok(cidr) = Ipv6Network::new(Ipv6Addr::from(addr), prefix) else {
            continue;
        };
        ids.ids.insert((vni, cidr), value & !dp::peer::CIDR_FLAG);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{endpoint, universe};

    #[test]
    fn cidr_ids_are_seeded_from_the_map_layout_the_compiler_writes() {
        let mut maps = MapContents::default();
        let vni = 7u32;
        maps.cidrs.insert(
            (48, dp::CidrKey { vni: vni.to_be_bytes(), addr: [10, 1, 0, 0] }),
            dp::peer::CIDR_FLAG | 3,
        );
        maps.cidrs.insert(
            (56, dp::CidrKey { vni: vni.to_be_bytes(), addr: [192, 168, 1, 0] }),
            dp::peer::CIDR_FLAG | 9,
        );
        // Not a Verse entry: shorter than the VNI.
        maps.cidrs.insert((8, dp::CidrKey::default()), 1);
        let ids = seed_cidr_ids(&maps);
        assert_eq!(ids.ids.len(), 2);
        assert_eq!(ids.ids[&(7, "10.1.0.0/16".parse().unwrap())], 3);
        assert_eq!(ids.ids[&(7, "192.168.1.0/24".parse().unwrap())], 9);
    }

    #[test]
    fn ipv6_cidr_ids_are_seeded_from_the_map_layout_the_compiler_writes() {
        let mut maps = MapContents::default();
        let net: Ipv6Network = "fd00:ab::/48".parse().unwrap();
        let (len, key) = dp::Cidr6Key::encode(7, net.network().octets(), 48);
        maps.ipv6.cidrs.insert((len, key), dp::peer::CIDR_FLAG | 4);
        // Not a Verse entry: shorter than the VNI.
        maps.ipv6.cidrs.insert((8, dp::Cidr6Key::default()), 1);
        let ids = seed_ids(&maps);
        assert_eq!(ids.cidrs6.ids, BTreeMap::from([((7, net), 4)]));
        assert!(ids.cidrs.ids.is_empty(), "the IPv4 classes are numbered apart");
    }

    #[test]
    fn merged_cidr_ids_never_give_a_held_id_to_another_class() {
        let a: Ipv4Network = "10.1.0.0/16".parse().unwrap();
        let b: Ipv4Network = "10.2.0.0/16".parse().unwrap();
        let c: Ipv4Network = "10.3.0.0/16".parse().unwrap();
        let held = CidrIds { ids: [((1, a), 5)].into_iter().collect() };
        let compiled = CidrIds { ids: [((1, b), 5), ((1, c), 6)].into_iter().collect() };
        let merged = held.merged_with(&compiled);
        assert_eq!(merged.ids, [((1, a), 5), ((1, c), 6)].into_iter().collect());
    }

    /// After a restart the allocator is rebuilt from the slots the policy entries carry: the
    /// same state compiles to the same slots (nothing to write, counts stay), and a rule added
    /// then takes a slot no held rule has.
    #[tokio::test]
    async fn rule_slots_are_rebuilt_from_the_maps_after_a_restart() {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        endpoint(&mut s, &u.id, "sim-0001", "10.1.0.5", &[]);
        let g = s.groups.values().find(|g| g.universe == u.id).unwrap().id.clone();
        let add = |s: &mut State, port: u16| {
            let req = serde_json::from_value(serde_json::json!({"direction": "ingress",
                "protocol": "tcp", "from_port": port, "to_port": port, "cidr": "0.0.0.0/0"}))
            .unwrap();
            let id = s.add_rule(&g, req).unwrap().id;
            s.revision += 1;
            id
        };
        let gone = add(&mut s, 80);
        add(&mut s, 81);
        let maps: SharedSimMaps = Arc::new(Mutex::new(SimMaps::new()));
        let mut r = Reconciler::simulated(maps.clone(), "sim-0001".into()).unwrap();
        r.reconcile(&s).await.unwrap();
        // Free the slot of one rule, so that a fresh numbering would differ from the held one.
        s.delete_rule(&g, &gone).unwrap();
        s.revision += 1;
        r.reconcile(&s).await.unwrap();
        let held = lock(&maps).maps().rules.clone();

        let seeded = seed_rule_slots(&lock(&maps).maps().clone());
        assert_eq!(seeded.ids, r.ids.rule_slots.ids, "the maps hold the allocator's slots");
        let mut restarted = Reconciler::simulated(maps.clone(), "sim-0001".into()).unwrap();
        assert!(!restarted.reconcile(&s).await.unwrap().wrote_maps, "nothing moved");
        assert_eq!(lock(&maps).maps().rules, held);
        let new = model::rule_bits(&add(&mut s, 82)).unwrap();
        restarted.reconcile(&s).await.unwrap();
        let now = lock(&maps).maps().rules.clone();
        let slot = now.iter().find(|(_, r)| **r == new).map(|(s, _)| *s).unwrap();
        assert!(!held.contains_key(&slot), "a new rule never shares a held slot");
        for (slot, rule) in &held {
            assert_eq!(now.get(slot), Some(rule), "held rules keep their slots");
        }
    }

    /// An apply that fails part way, and a read-back that fails too, leave maps `applied` does
    /// not describe: the next round reads them first, so the entries the failed apply wrote (here
    /// hosts in `VERSE_HOSTS`, whose wrapped traffic the dataplane then takes as a fleet host's)
    /// are removed once the state no longer wants them, not left behind because the stale
    /// bookkeeping already matched that state.
    #[tokio::test]
    async fn after_a_failed_apply_and_a_failed_read_back_the_next_round_reads_the_maps() {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        s.hosts.insert("sim-0001".into(), model::HostRecord::at("sim-0001", None));
        endpoint(&mut s, &u.id, "sim-0001", "10.1.0.5", &[]);
        s.revision += 1;
        let maps: SharedSimMaps = Arc::new(Mutex::new(SimMaps::new()));
        let mut r = Reconciler::simulated(maps.clone(), "sim-0001".into()).unwrap();
        r.reconcile(&s).await.unwrap();
        let before = s.clone();
        let wanted = lock(&maps).maps().clone();
        assert!(wanted.hosts.is_empty());

        // Three remote hosts with an endpoint in the universe; the apply fails after the hosts.
        let mut more = s.clone();
        for n in 1..=3u8 {
            let name = format!("far-{n}");
            let underlay = Ipv4Addr::new(198, 19, 0, n);
            more.hosts.insert(name.clone(), model::HostRecord::at(&name, Some(underlay)));
            endpoint(&mut more, &u.id, &name, &format!("10.1.1.{n}"), &[]);
        }
        more.revision += 1;
        lock(&maps).failing_applies = 1;
        lock(&maps).failing_reads.set(1);
        let err = r.reconcile(&more).await.unwrap_err();
        assert!(matches!(err, Error::Apply { .. }), "{err}");
        assert_eq!(lock(&maps).maps().hosts.len(), 3, "the failed apply wrote the hosts");

        let mut back = before;
        back.revision = more.revision + 1;
        r.reconcile(&back).await.unwrap();
        assert_eq!(lock(&maps).maps(), &wanted, "nothing the failed apply wrote is left");
        assert_eq!(lock(&maps).maps(), &r.applied);
    }

    #[test]
    fn merged_rule_slots_never_give_a_held_slot_to_another_rule() {
        let held =
            Ids { rule_slots: RuleSlots { ids: BTreeMap::from([(0xa, 1)]) }, ..Ids::default() };
        let compiled = Ids {
            rule_slots: RuleSlots { ids: BTreeMap::from([(0xb, 1), (0xc, 2)]) },
            ..Ids::default()
        };
        let merged = merge_ids(held, &compiled);
        assert_eq!(merged.rule_slots.ids, BTreeMap::from([(0xa, 1), (0xc, 2)]));
    }

    /// Two endpoints on the simulated host, one elsewhere: the simulated host's maps get its own
    /// endpoints under synthetic ifindexes, a route to the remote one through its host's
    /// underlay, and lose the entries of an endpoint once it is deleted.
    #[tokio::test]
    async fn a_simulated_host_realizes_the_state_in_its_in_memory_maps() {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        for (name, last) in [("sim-0001", 1), ("sim-0002", 2)] {
            let underlay = Some(Ipv4Addr::new(198, 19, 0, last));
            s.hosts.insert(name.into(), model::HostRecord::at(name, underlay));
        }
        let mut ids = Vec::new();
        for (host, ip) in
            [("sim-0001", "10.1.0.5"), ("sim-0001", "10.1.0.6"), ("sim-0002", "10.1.0.7")]
        {
            ids.push(endpoint(&mut s, &u.id, host, ip, &[]).id);
        }
        s.revision += 1;

        let maps: SharedSimMaps = Arc::new(Mutex::new(SimMaps::new()));
        let mut r = Reconciler::simulated(maps.clone(), "sim-0001".into()).unwrap();
        let outcome = r.reconcile(&s).await.unwrap();
        assert!(outcome.wrote_maps && !outcome.needs_retry(), "{outcome:?}");
        let held = lock(&maps).maps().clone();
        let ifindexes: Vec<u32> = held.endpoints.keys().copied().collect();
        assert_eq!(ifindexes, [SIM_FIRST_IFINDEX, SIM_FIRST_IFINDEX + 1]);
        assert_eq!(held.routes.len(), 3);
        let remote = held.routes[&dp::RouteKey { vni: u.vni, ip: [10, 1, 0, 7] }];
        assert_eq!((remote.ifindex, remote.underlay), (0, [198, 19, 0, 2]));
        assert_eq!(held.hosts.keys().collect::<Vec<_>>(), [&[198, 19, 0, 2]]);
        assert_eq!(held, r.applied, "the reconciler's bookkeeping is what the maps hold");

        // The same state again writes nothing.
        assert!(!r.reconcile(&s).await.unwrap().wrote_maps);
        s.delete_endpoint(&ids[0]).unwrap();
        s.revision += 1;
        assert!(r.reconcile(&s).await.unwrap().wrote_maps);
        let held = lock(&maps).maps().clone();
        let kept = r.plumbed[&ids[1]].ifindex;
        assert_eq!(held.endpoints.keys().copied().collect::<Vec<_>>(), [kept]);
        assert!(!held.routes.contains_key(&dp::RouteKey { vni: u.vni, ip: [10, 1, 0, 5] }));
        let counts = lock(&maps).counts();
        assert_eq!(counts.applies, 2);
        assert!(counts.removed >= 2, "{counts:?}");
    }
}
