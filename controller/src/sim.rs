//! Simulated hosts: many hosts of a fleet in one process, each running the real control plane
//! (its own etcd watch and liveness lease, the compiler, the reconciler, realized-revision
//! reports) with the kernel replaced by an in-memory map set, so that a fleet of a thousand
//! hosts can join one etcd from one machine (`versed --simulate-hosts N`, see the README,
//! "Scale").
//!
//! Contract:
//! - [`SimMaps`] holds what a host's eBPF maps would hold and applies the differences the
//!   reconciler asks for as [`Dataplane::apply`](crate::dataplane::Dataplane::apply) does: puts
//!   of what is new or changed first, removals after, each map bounded by its capacity in
//!   `dataplane_common::capacity` (a put into a full map fails, as the kernel's would, and
//!   leaves what was written so far). It counts every entry written and removed.
//! - [`SimFleet::start`] starts hosts `<prefix>0001` … `<prefix>N`, host `i` with the underlay
//!   address `198.19.0.0 + i` ([`sim_underlay_ip`], from a range no test routes). Each host opens
//!   its own [`Store`] (its own watch of the prefix, its own lease), registers itself, and runs a
//!   [`Reconciler`] on [`SimMaps`] whose realized revisions it reports, exactly as `versed`
//!   wires a real host. Hosts share `connections` etcd clients (gRPC connections) round-robin;
//!   each still has its own watch stream and lease keep-alive stream on it.
//! - [`SimFleet::report`] tells, per host, the revision realized, the map entries held and
//!   written, and what its watch received ([`WatchStats`]), and the process's resident memory;
//!   [`router`] serves it as `GET /v1/simulation` (and `GET /healthz`).
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane_common as dp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::compile::{policy_kinds_after, policy_kinds_before, MapContents};
use crate::reconcile::{MapSet, MapSetError, Reconciler, SharedSimMaps};
use crate::store::{self, EtcdOptions, Realized, Store, WatchStats};

/// What a simulated host's maps hold, and how many entries it has written and removed.
#[derive(Debug, Default)]
pub struct SimMaps {
    maps: MapContents,
    counts: MapCounts,
    /// Unit tests: reads that fail before the maps answer again (a kernel map can fail a read).
    #[cfg(test)]
    pub(crate) failing_reads: std::cell::Cell<u32>,
    /// Unit tests: applies that fail once they have written the hosts and VNIs (a kernel put can
    /// fail part way: out of memory, say).
    #[cfg(test)]
    pub(crate) failing_applies: u32,
}

/// Work done on a simulated host's maps since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCounts {
    /// Calls of `apply` (rounds that changed something).
    pub applies: u64,
    /// Entries put (new or changed).
    pub written: u64,
    /// Entries removed.
    pub removed: u64,
}

/// Why a put into a simulated map failed: the map is full, as a kernel map would be.
#[derive(Debug, thiserror::Error)]
#[error("map {name} is full ({capacity} entries): cannot add {entry}")]
pub struct MapFull {
    pub name: &'static str,
    pub capacity: u32,
    pub entry: String,
}

impl SimMaps {
    /// Empty maps, as a host that never ran.
    pub fn new() -> SimMaps {
        SimMaps::default()
    }

    /// What the maps hold.
    pub fn maps(&self) -> &MapContents {
        &self.maps
    }

    /// Entries held, over every map.
    pub fn entries(&self) -> usize {
        self.maps.entries()
    }

    pub fn counts(&self) -> MapCounts {
        self.counts
    }
}

impl MapSet for SimMaps {
    fn read(&self) -> Result<MapContents, MapSetError> {
        #[cfg(test)]
        if self.failing_reads.get() > 0 {
            self.failing_reads.set(self.failing_reads.get() - 1);
            return Err(std::io::Error::other("the test made this read fail").into());
        }
        Ok(self.maps.clone())
    }

    /// The order of [`Dataplane::apply`](crate::dataplane::Dataplane::apply): puts into hosts,
    /// VNIs, CIDR classes, policy, routes, endpoints; then removals in the reverse order.
    fn apply(&mut self, current: &MapContents, desired: &MapContents) -> Result<(), MapSetError> {
        self.counts.applies += 1;
        let (m, c) = (&mut self.maps, &mut self.counts);
        use dp::{capacity as cap, map_names as names};
        put_changed(&mut m.hosts, &current.hosts, &desired.hosts, names::HOSTS, cap::HOSTS, c)?;
        put_new(&mut m.vnis, &current.vnis, &desired.vnis, names::VNIS, cap::VNIS, c)?;
        #[cfg(test)]
        if self.failing_applies > 0 {
            self.failing_applies -= 1;
            return Err(std::io::Error::other("the test made this apply fail").into());
        }
        put_changed(&mut m.cidrs, &current.cidrs, &desired.cidrs, names::CIDRS, cap::CIDRS, c)?;
        let (cur6, want6) = (&current.ipv6, &desired.ipv6);
        put_changed(&mut m.ipv6.cidrs, &cur6.cidrs, &want6.cidrs, names::CIDRS6, cap::CIDRS6, c)?;
        // A rule's counter slot (zeroed in the kernel) before the first entry naming it.
        for (&slot, &rule) in &desired.rules {
            if current.rules.get(&slot) == Some(&rule) {
                continue;
            }
            if slot == 0 || slot >= cap::RULE_HITS {
                let entry = format!("slot {slot} (rule {rule:08x})");
                let full = MapFull { name: names::RULE_HITS, capacity: cap::RULE_HITS, entry };
                return Err(full.into());
            }
            m.rules.insert(slot, rule);
            c.written += 1;
        }
        // The kinds of peer of both states' entries, before the entries.
        for (identity, kinds) in policy_kinds_before(current, desired) {
            m.set_kinds(identity, kinds);
            c.written += 1;
        }
        put_changed(
            &mut m.policy,
            &current.policy,
            &desired.policy,
            names::POLICY,
            cap::POLICY,
            c,
        )?;
        // The IPv6 entries share the one trie (the compiler checked both together, S12).
        let room = cap::POLICY.saturating_sub(m.policy.len() as u32);
        put_changed(&mut m.ipv6.policy, &cur6.policy, &want6.policy, names::POLICY, room, c)?;
        put_changed(
            &mut m.routes,
            &current.routes,
            &desired.routes,
            names::ROUTES,
            cap::ROUTES,
            c,
        )?;
        put_changed(
            &mut m.ipv6.routes,
            &cur6.routes,
            &want6.routes,
            names::ROUTES6,
            cap::ROUTES6,
            c,
        )?;
        // The conntrack budget slots (S14), written before the endpoints that use them.
        put_changed(
            &mut m.ct_owners,
            &current.ct_owners,
            &desired.ct_owners,
            names::CT_OWNERS,
            cap::CT_OWNERS,
            c,
        )?;
        // Endpoints below the slot count live in the slot array, the others in the hash.
        let slots = cap::ENDPOINT_SLOTS;
        put_changed(
            &mut m.endpoints,
            &current.endpoints,
            &desired.endpoints,
            names::ENDPOINTS,
            slots,
            c,
        )?;
        remove_gone(
            &mut m.endpoints,
            current.endpoints.keys(),
            |k| desired.endpoints.contains_key(k),
            c,
        );
        remove_gone(
            &mut m.ct_owners,
            current.ct_owners.keys(),
            |k| desired.ct_owners.contains_key(k),
            c,
        );
        remove_gone(&mut m.routes, current.routes.keys(), |k| desired.routes.contains_key(k), c);
        let routes6 = &desired.ipv6.routes;
        remove_gone(&mut m.ipv6.routes, current.ipv6.routes.keys(), |k| routes6.contains_key(k), c);
        remove_gone(&mut m.policy, current.policy.keys(), |k| desired.policy.contains_key(k), c);
        let policy6 = &desired.ipv6.policy;
        remove_gone(&mut m.ipv6.policy, current.ipv6.policy.keys(), |k| policy6.contains_key(k), c);
        // Only the kinds the entries left name (an array slot of 0 holds nothing).
        for (identity, kinds) in policy_kinds_after(current, desired) {
            m.set_kinds(identity, kinds);
            if kinds == 0 {
                c.removed += 1;
            } else {
                c.written += 1;
            }
        }
        remove_gone(&mut m.rules, current.rules.keys(), |k| desired.rules.contains_key(k), c);
        remove_gone(&mut m.cidrs, current.cidrs.keys(), |k| desired.cidrs.contains_key(k), c);
        let cidrs6 = &desired.ipv6.cidrs;
        remove_gone(&mut m.ipv6.cidrs, current.ipv6.cidrs.keys(), |k| cidrs6.contains_key(k), c);
        remove_gone_set(&mut m.vnis, current.vnis.difference(&desired.vnis), c);
        remove_gone(&mut m.hosts, current.hosts.keys(), |k| desired.hosts.contains_key(k), c);
        Ok(())
    }
}

/// Puts every entry of `desired` that `current` lacks or holds with another value.
fn put_changed<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy>(
    map: &mut BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
    capacity: u32,
    counts: &mut MapCounts,
) -> Result<(), MapFull> {
    for (key, value) in desired {
        if current.get(key) == Some(value) {
            continue;
        }
        if !map.contains_key(key) && map.len() >= capacity as usize {
            return Err(MapFull { name, capacity, entry: format!("{key:?}") });
        }
        map.insert(*key, *value);
        counts.written += 1;
    }
    Ok(())
}

/// Puts every key of `desired` that `current` lacks.
fn put_new<K: Ord + Copy + std::fmt::Debug>(
    set: &mut BTreeSet<K>,
    current: &BTreeSet<K>,
    desired: &BTreeSet<K>,
    name: &'static str,
    capacity: u32,
    counts: &mut MapCounts,
) -> Result<(), MapFull> {
    for key in desired.difference(current) {
        if !set.contains(key) && set.len() >= capacity as usize {
            return Err(MapFull { name, capacity, entry: format!("{key:?}") });
        }
        set.insert(*key);
        counts.written += 1;
    }
    Ok(())
}

/// Removes the keys of `current` that `keep` refuses (absent ones are fine, as in the kernel).
fn remove_gone<'a, K: Ord + 'a, V>(
    map: &mut BTreeMap<K, V>,
    current: impl Iterator<Item = &'a K>,
    keep: impl Fn(&K) -> bool,
    counts: &mut MapCounts,
) {
    for key in current.filter(|k| !keep(k)) {
        map.remove(key);
        counts.removed += 1;
    }
}

fn remove_gone_set<'a, K: Ord + 'a>(
    set: &mut BTreeSet<K>,
    gone: impl Iterator<Item = &'a K>,
    counts: &mut MapCounts,
) {
    for key in gone {
        set.remove(key);
        counts.removed += 1;
    }
}

/// The underlay address of simulated host `i` (counting from 1): `198.19.0.0 + i`, in
/// 198.19.0.0/16, which nothing routes (RFC 2544 benchmarking space).
pub fn sim_underlay_ip(i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    let i = u32::try_from(i).unwrap_or(u32::MAX).min(0xFFFE);
    Ipv4Addr::from(base + i)
}

/// How many hosts a simulation may hold (the addresses of 198.19.0.0/16 but the first and last).
pub const MAX_SIM_HOSTS: usize = 0xFFFE;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How many hosts.
    pub hosts: usize,
    /// Host names are this prefix and a four-digit number from 0001.
    pub prefix: String,
    /// How to reach etcd (every host the same way).
    pub etcd: EtcdOptions,
    /// etcd clients shared by the hosts, round-robin (0: one per host, as real hosts have).
    pub connections: usize,
    /// Hosts starting at once.
    pub start_concurrency: usize,
}

/// One simulated host.
struct SimHost {
    name: String,
    underlay_ip: Ipv4Addr,
    store: Store,
    maps: SharedSimMaps,
    realized: watch::Receiver<Realized>,
    /// Held so the reconciler runs until the fleet is dropped.
    _stop: watch::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SimHost {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One host in a [`SimReport`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SimHostReport {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// The revision its reconciler realized last.
    pub revision: u64,
    /// Entries its maps hold.
    pub map_entries: usize,
    pub maps: MapCounts,
    /// What its store's watch received.
    pub watch: WatchStats,
}

/// What a simulation reports (`GET /v1/simulation` of `versed --simulate-hosts`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SimReport {
    /// Hosts asked for.
    pub hosts: usize,
    /// Hosts started so far (registered and reconciling).
    pub started: usize,
    /// Seconds it took to start them all (`None` while starting).
    pub start_seconds: Option<f64>,
    /// Resident memory of the process before the first host started and now, bytes.
    pub rss_before_bytes: u64,
    pub rss_bytes: u64,
    /// etcd clients (gRPC channels) the hosts share.
    pub connections: usize,
    pub per_host: Vec<SimHostReport>,
}

/// Many simulated hosts (see the module contract). Dropping it stops every host: their
/// watches end and their leases lapse.
pub struct SimFleet {
    options: SimOptions,
    hosts: Arc<Mutex<Vec<SimHost>>>,
    rss_before: u64,
    start_seconds: Arc<Mutex<Option<f64>>>,
    connections: usize,
    starter: JoinHandle<()>,
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.starter.abort();
    }
}

/// Why a simulation could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid simulation: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl SimFleet {
    /// Connects the etcd clients and starts the hosts in the background, `start_concurrency` at
    /// a time; [`SimFleet::report`] tells how far it got. A host that fails to start is retried
    /// (with the store's own backoff) until it starts.
    pub async fn start(options: SimOptions) -> Result<SimFleet, SimError> {
        if options.hosts == 0 || options.hosts > MAX_SIM_HOSTS {
            return Err(SimError::Invalid(format!(
                "{} hosts: between 1 and {MAX_SIM_HOSTS}",
                options.hosts
            )));
        }
        let rss_before = rss_bytes();
        let connections = if options.connections == 0 {
            options.hosts
        } else {
            options.connections.min(options.hosts)
        };
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            clients.push(store::etcd::connect(&options.etcd).await?);
        }
        let hosts = Arc::new(Mutex::new(Vec::with_capacity(options.hosts)));
        let start_seconds = Arc::new(Mutex::new(None));
        let starter =
            tokio::spawn(start_all(options.clone(), clients, hosts.clone(), start_seconds.clone()));
        Ok(SimFleet { options, hosts, rss_before, start_seconds, connections, starter })
    }

    /// Where the simulation is: see [`SimReport`].
    pub fn report(&self) -> SimReport {
        let hosts = lock(&self.hosts);
        let per_host = hosts
            .iter()
            .map(|h| {
                let maps = lock(&h.maps);
                SimHostReport {
                    name: h.name.clone(),
                    underlay_ip: h.underlay_ip,
                    revision: h.realized.borrow().revision,
                    map_entries: maps.entries(),
                    maps: maps.counts(),
                    watch: h.store.watch_stats(),
                }
            })
            .collect();
        SimReport {
            hosts: self.options.hosts,
            started: hosts.len(),
            start_seconds: *lock(&self.start_seconds),
            rss_before_bytes: self.rss_before,
            rss_bytes: rss_bytes(),
            connections: self.connections,
            per_host,
        }
    }
}

async fn start_all(
    options: SimOptions,
    clients: Vec<etcd_client::Client>,
    hosts: Arc<Mutex<Vec<SimHost>>>,
    start_seconds: Arc<Mutex<Option<f64>>>,
) {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let workers: Vec<_> = (0..options.start_concurrency.max(1))
        .map(|_| {
            let (options, clients, hosts, next) =
                (options.clone(), clients.clone(), hosts.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i > options.hosts {
                        return;
                    }
                    let client = clients[(i - 1) % clients.len()].clone();
                    let host = start_host(&options, i, client).await;
                    lock(&hosts).push(host);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    lock(&hosts).sort_by(|a, b| a.name.cmp(&b.name));
    let seconds = started.elapsed().as_secs_f64();
    *lock(&start_seconds) = Some(seconds);
    tracing::info!(hosts = options.hosts, seconds, "every simulated host started");
}

/// Starts simulated host `i`, retrying until it is registered.
async fn start_host(options: &SimOptions, i: usize, client: etcd_client::Client) -> SimHost {
    let name = format!("{}{i:04}", options.prefix);
    let underlay_ip = sim_underlay_ip(i);
    let mut delay = Duration::from_millis(100);
    loop {
        match try_start_host(options, &name, underlay_ip, client.clone()).await {
            Ok(host) => return host,
            Err(e) => {
                tracing::warn!(host = %name, error = %e, retry_in = ?delay, "simulated host failed to start; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The wiring of `versed` (src/bin/versed.rs) for one host, with [`SimMaps`] for the kernel.
async fn try_start_host(
    options: &SimOptions,
    name: &str,
    underlay_ip: Ipv4Addr,
    client: etcd_client::Client,
) -> Result<SimHost, SimError> {
    // A simulated host answers no API: its store follows only what this host needs (the
    // hosts, its placements, the universes with an endpoint here: `store::etcd`, scope).
    let etcd = EtcdOptions { scope: Some(name.to_owned()), ..options.etcd.clone() };
    let store = Store::open_etcd_with_client(etcd, client).await?;
    let maps: SharedSimMaps = Arc::new(Mutex::new(SimMaps::new()));
    let reconciler = Reconciler::simulated(maps.clone(), name.to_owned())
        .map_err(|e| SimError::Invalid(e.to_string()))?;
    store.register_host(name, Some(underlay_ip)).await?;
    let (realized_tx, realized_rx) = watch::channel(Realized::default());
    let states = store.subscribe();
    let reporting = {
        let store = store.clone();
        let name = name.to_owned();
        let mut realized = realized_rx.clone();
        tokio::spawn(async move {
            loop {
                let report = realized.borrow_and_update().clone();
                store.report(&name, report);
                if realized.changed().await.is_err() {
                    break;
                }
            }
        })
    };
    let (stop_tx, stop_rx) = watch::channel(());
    let reconciling = tokio::spawn(reconciler.run(states, realized_tx, stop_rx));
    Ok(SimHost {
        name: name.to_owned(),
        underlay_ip,
        store,
        maps,
        realized: realized_rx,
        _stop: stop_tx,
        tasks: vec![reconciling, reporting],
    })
}

/// `GET /healthz` and `GET /v1/simulation` (the [`SimReport`], JSON).
pub fn router(fleet: Arc<SimFleet>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/v1/simulation",
        get(move || {
            let fleet = fleet.clone();
            async move { axum::Json(fleet.report()) }
        }),
    )
}

/// Resident memory of this process, bytes (`/proc/self/statm`), 0 if unreadable.
pub fn rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = text.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(n: u8) -> (dp::RouteKey, dp::Route) {
        (
            dp::RouteKey { vni: 1, ip: [10, 0, 0, n] },
            dp::Route {
                ifindex: 0,
                identity: 1,
                mac: [2, 0, 0, 0, 0, n],
                _pad: [0; 2],
                underlay: [1; 4],
                slot: 0,
                serial: u64::from(n),
            },
        )
    }

    #[test]
    fn sim_maps_apply_the_differences_and_count_them() {
        let mut sim = SimMaps::new();
        let mut a = MapContents::default();
        a.routes.extend([route(1), route(2)]);
        a.vnis.insert(1);
        a.hosts.insert([198, 19, 0, 1], 1);
        sim.apply(&MapContents::default(), &a).unwrap();
        assert_eq!(sim.maps(), &a);
        assert_eq!(sim.counts(), MapCounts { applies: 1, written: 4, removed: 0 });
        let mut b = a.clone();
        b.routes.remove(&route(1).0);
        b.routes.insert(route(2).0, dp::Route { identity: 9, ..route(2).1 });
        b.routes.extend([route(3)]);
        sim.apply(&a, &b).unwrap();
        assert_eq!(sim.maps(), &b);
        assert_eq!(sim.counts(), MapCounts { applies: 2, written: 6, removed: 1 });
        assert_eq!(sim.entries(), 4);
        assert_eq!(MapSet::read(&sim).unwrap(), b);
    }

    #[test]
    fn a_full_sim_map_refuses_a_new_entry_and_keeps_what_was_written() {
        let mut sim = SimMaps::new();
        let mut full = MapContents::default();
        for n in 0..dp::capacity::HOSTS {
            full.hosts.insert(n.to_be_bytes(), 1);
        }
        sim.apply(&MapContents::default(), &full).unwrap();
        let mut more = full.clone();
        more.hosts.insert([255, 255, 255, 255], 1);
        more.vnis.insert(7);
        let err = sim.apply(&full, &more).unwrap_err();
        assert!(err.to_string().contains("VERSE_HOSTS is full"), "{err}");
        // Nothing after the failed put was written: the VNIs come after the hosts.
        assert_eq!(sim.maps(), &full);
    }

    #[test]
    fn sim_underlay_addresses_stay_in_198_19() {
        assert_eq!(sim_underlay_ip(1), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(sim_underlay_ip(1000), Ipv4Addr::new(198, 19, 3, 232));
        assert_eq!(sim_underlay_ip(MAX_SIM_HOSTS), Ipv4Addr::new(198, 19, 255, 254));
    }
}
