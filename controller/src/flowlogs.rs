//! Flow logs (README, "Why was my packet dropped?"): what each local endpoint sent and received,
//! per flow and per interval, in the fields of AWS VPC Flow Logs where they apply, written by
//! each host as JSON lines and read through `GET /v1/flow-logs`.
//!
//! Contract:
//! - ACCEPT records come from conntrack. The kernel counts, in each entry, the packets and bytes
//!   (IPv4 datagram length, per segment on the wire) it delivered in each direction, ORs the TCP
//!   flags of each direction into the current interval's slot, and keeps the rules that admitted
//!   the flow (`dataplane_common::CtCounters`). At the end of every interval the daemon bumps
//!   the interval number the kernel stamps flags with (`Config::flow_interval`), reads the table,
//!   and [`Aggregator::observe`] turns what each entry counted since the last read into records:
//!   for each local endpoint of the flow whose flow logs are on, one record per direction that
//!   carried packets. Entries deleted by garbage collection meanwhile are read as they go
//!   ([`Aggregator::gone`]), so their last packets are not lost.
//! - REJECT records come from the drop events ([`Aggregator::reject`]): one event is one packet.
//!   Events are rate-limited in the kernel, so under a flood these records are a sample; the
//!   records of an interval in which this host's dataplane suppressed or lost drop events say so
//!   (`sampled`, `unreported_drops`: how many drops of the whole host went unreported).
//! - A record belongs to the endpoint whose rules decided: a policy drop on the receiver's
//!   ingress rules (`policy_ingress`) to the receiver (direction ingress), every other drop to
//!   the endpoint the hook judged (the sender at `from_endpoint`: egress; the receiver at
//!   `from_underlay`: ingress). Accepted flows: the sender's records name its egress rule, the
//!   receiver's its ingress rule (as its host judged them).
//! - Packets per rule: every packet a flow carried (either way) is credited to the rules that
//!   admitted it, at the same reads, whether or not flow logs are on ([`Aggregator::rule_packets`]).
//! - [`Writer`] appends records to `flow-logs.jsonl` in its directory and rotates it when the
//!   next line would take it past `rotate_bytes`, keeping `keep` rotated files
//!   (`flow-logs.jsonl.1` newest): the files never hold more than `rotate_bytes * (keep + 1)`.
//!   [`read`] returns the records of one endpoint, oldest first.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use dataplane_common::{self as dp, CtValue, DropReason, Hook};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::conntrack::Flow;
use crate::model::{Direction, State, Timestamp};
use crate::reconcile::SharedDataplane;

/// Shortest and longest interval, seconds (`observability.flow_log_interval`).
pub const MIN_INTERVAL: u64 = 10;
pub const MAX_INTERVAL: u64 = 600;
/// The current file's name; rotated ones get `.1`, `.2`, ... (`.1` newest).
pub const FILE: &str = "flow-logs.jsonl";

/// AWS's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Accept,
    Reject,
}

/// One flow log record: one endpoint, one direction of one flow, one interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogRecord {
    /// The host that wrote it.
    pub host: String,
    pub universe: String,
    /// The endpoint (AWS: `interface-id`) and its host-side interface.
    pub endpoint: String,
    pub interface: String,
    /// Relative to the endpoint: `ingress` (it received) or `egress` (it sent).
    pub flow_direction: Direction,
    pub action: Action,
    /// IPv4 or IPv6 (in its standard form, RFC 5952), as the flow's.
    pub srcaddr: IpAddr,
    pub dstaddr: IpAddr,
    /// TCP and UDP ports; 0 for other protocols.
    pub srcport: u16,
    pub dstport: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    /// Packets (TCP segments on the wire) and bytes (IP packets: IPv4 datagrams, IPv6 packets
    /// with their extension headers) in the interval.
    pub packets: u64,
    pub bytes: u64,
    /// The interval.
    pub start: Timestamp,
    pub end: Timestamp,
    /// TCP flags seen in this direction within the interval, OR-ed (AWS `tcp-flags`; 0 for
    /// other protocols).
    pub tcp_flags: u8,
    /// ACCEPT: the rule (`sgr-…`) of this endpoint's groups that admitted the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// REJECT: the drop reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// REJECT: true when this host's dataplane left drop events unreported in the interval (the
    /// rate limit, or a full ring buffer): the record then counts a sample of the packets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// With `sampled`: the drops of the whole host that went unreported in the interval.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreported_drops: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A local endpoint, as flow logs name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub endpoint: String,
    pub universe: String,
    pub interface: String,
    /// Its flow logs are on.
    pub logs: bool,
}

/// This host's endpoints, by serial and by id.
#[derive(Clone, Debug, Default)]
pub struct Locals {
    pub by_serial: HashMap<u64, Local>,
    pub by_id: HashMap<String, u64>,
}

impl Locals {
    pub fn insert(&mut self, serial: u64, local: Local) {
        self.by_id.insert(local.endpoint.clone(), serial);
        self.by_serial.insert(serial, local);
    }

    fn by_id(&self, id: &str) -> Option<&Local> {
        self.by_id.get(id).and_then(|s| self.by_serial.get(s))
    }
}

/// What a record is about (its key within an interval).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RecordKey {
    endpoint: String,
    direction: Direction,
    action: Action,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    rule: u32,
    reason: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Acc {
    packets: u64,
    bytes: u64,
    flags: u8,
}

/// What was last read of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    created_ns: u64,
    src_serial: u64,
    dst_serial: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
}

/// The TCP flags an entry's counters hold for interval `interval`, per direction (original,
/// reply): the current slot if the kernel last stamped them with `interval`, the previous slot
/// if it has stamped them with the next one since, else none.
pub fn flags_in(c: &dp::CtCounters, interval: u32) -> [u8; 2] {
    if c.flags_interval == interval {
        [c.flags[0], c.flags[1]]
    } else if c.flags_interval == interval.wrapping_add(1) {
        [c.flags[2], c.flags[3]]
    } else {
        [0, 0]
    }
}

/// The records of the current interval, built as the table is read (see the module contract).
#[derive(Debug, Default)]
pub struct Aggregator {
    seen: HashMap<Flow, Seen>,
    pending: BTreeMap<RecordKey, Acc>,
    /// Packets admitted per rule (the rule id's bits) since the daemon started.
    rule_packets: BTreeMap<u32, u64>,
    /// Drop events this host did not report in the current interval.
    unreported: u64,
}

impl Aggregator {
    /// An entry read when the daemon starts: what it counted so far belongs to no interval of
    /// this daemon's (its last one wrote it, or it was never written).
    pub fn baseline(&mut self, key: &Flow, v: &CtValue) {
        let (e, c) = (&v.entry, &v.counters);
        self.seen.insert(
            *key,
            Seen {
                created_ns: c.created_ns,
                src_serial: e.src_serial,
                dst_serial: e.dst_serial,
                packets: c.packets(),
                bytes: c.bytes(),
            },
        );
    }

    /// An entry read from the table at the end of interval `interval`.
    pub fn observe(&mut self, key: &Flow, v: &CtValue, interval: u32, locals: &Locals) {
        self.account(key, v, interval, locals);
    }

    /// An entry deleted (by garbage collection) during interval `interval`: what it counted
    /// since the last read, and it is forgotten.
    pub fn gone(&mut self, key: &Flow, v: &CtValue, interval: u32, locals: &Locals) {
        self.account(key, v, interval, locals);
        self.seen.remove(key);
    }

    /// Forgets the entries that were not in the last read (deleted without being seen to go).
    pub fn retain(&mut self, read: &HashSet<Flow>) {
        self.seen.retain(|k, _| read.contains(k));
    }

    fn account(&mut self, key: &Flow, v: &CtValue, interval: u32, locals: &Locals) {
        let e = &v.entry;
        let c = &v.counters;
        let now = Seen {
            created_ns: c.created_ns,
            src_serial: e.src_serial,
            dst_serial: e.dst_serial,
            packets: c.packets(),
            bytes: c.bytes(),
        };
        // The same flow as last read, unless it was made anew under the same key (another
        // creation time) or its endpoints changed: then everything it holds is new. A counter
        // of the same flow that went back lost counts (the kernel replaced the entry while
        // another CPU counted in it, README "Flow logs"): nothing new there, and the next read
        // counts from the lower value, rather than reporting the flow's whole history again.
        let before = self
            .seen
            .insert(*key, now)
            .filter(|s| {
                s.created_ns == now.created_ns
                    && s.src_serial == now.src_serial
                    && s.dst_serial == now.dst_serial
            })
            .unwrap_or(Seen { packets: [0; 2], bytes: [0; 2], ..now });
        let new = |now: [u64; 2], before: [u64; 2]| {
            [now[0].saturating_sub(before[0]), now[1].saturating_sub(before[1])]
        };
        let packets = new(now.packets, before.packets);
        let bytes = new(now.bytes, before.bytes);
        let total = packets[0].saturating_add(packets[1]);
        if total > 0 {
            for rule in [c.rule_egress, c.rule_ingress] {
                if rule != 0 {
                    let n = self.rule_packets.entry(rule).or_default();
                    *n = n.saturating_add(total);
                }
            }
        }
        let flags = flags_in(c, interval);
        let ports = |sport: u16, dport: u16| match key.proto {
            6 | 17 => (sport, dport),
            _ => (0, 0),
        };
        // (endpoint serial, its rule, the direction of the original packets for it)
        let sides = [
            (e.src_serial, c.rule_egress, Direction::Egress),
            (e.dst_serial, c.rule_ingress, Direction::Ingress),
        ];
        for (serial, rule, original_dir) in sides {
            let Some(local) = locals.by_serial.get(&serial).filter(|l| l.logs) else {
                continue;
            };
            for d in 0..2 {
                if packets[d] == 0 {
                    continue;
                }
                let (src, dst, sport, dport, direction) = if d == 0 {
                    let (s, p) = ports(key.sport, key.dport);
                    (key.src, key.dst, s, p, original_dir)
                } else {
                    let (s, p) = ports(key.dport, key.sport);
                    (key.dst, key.src, s, p, opposite(original_dir))
                };
                let k = RecordKey {
                    endpoint: local.endpoint.clone(),
                    direction,
                    action: Action::Accept,
                    proto: key.proto,
                    src,
                    dst,
                    sport,
                    dport,
                    rule,
                    reason: 0,
                };
                let acc = self.pending.entry(k).or_default();
                acc.packets = acc.packets.saturating_add(packets[d]);
                acc.bytes = acc.bytes.saturating_add(bytes[d]);
                acc.flags |= flags[d];
            }
        }
    }

    /// A dropped packet, as its event reported it (`endpoint`: the local endpoint the hook judged
    /// for; `receiver`: the local endpoint at the destination, if any).
    pub fn reject(
        &mut self,
        e: &dp::Event,
        endpoint: Option<&str>,
        receiver: Option<&str>,
        locals: &Locals,
    ) {
        let Some(reason) = DropReason::from_code(e.reason) else {
            return;
        };
        let hook = Hook::from_code(e.hook);
        let (who, direction) = match (reason, hook) {
            (DropReason::PolicyIngress, Some(Hook::FromEndpoint)) => (receiver, Direction::Ingress),
            (_, Some(Hook::FromEndpoint)) => (endpoint, Direction::Egress),
            (_, Some(Hook::FromUnderlay)) => (endpoint, Direction::Ingress),
            (_, None) => return,
        };
        let Some(local) = who.and_then(|id| locals.by_id(id)).filter(|l| l.logs) else {
            return;
        };
        // The IP packet: the frame without its Ethernet header (and, at from_underlay, the
        // encapsulation and the outer Ethernet header).
        let overhead = match hook {
            Some(Hook::FromUnderlay) => 14 + dp::ENCAP_OVERHEAD,
            _ => 14,
        };
        let (sport, dport) = match e.proto {
            6 | 17 => (e.sport, e.dport),
            _ => (0, 0),
        };
        // A drop with no addresses (nothing parsed) is recorded with 0.0.0.0, as before.
        let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let (src, dst) = e.addrs().unwrap_or((unspecified, unspecified));
        let k = RecordKey {
            endpoint: local.endpoint.clone(),
            direction,
            action: Action::Reject,
            proto: e.proto,
            src,
            dst,
            sport,
            dport,
            rule: 0,
            reason: e.reason,
        };
        let acc = self.pending.entry(k).or_default();
        acc.packets = acc.packets.saturating_add(1);
        acc.bytes = acc.bytes.saturating_add(u64::from(e.len.saturating_sub(overhead)));
        acc.flags |= if e.proto == 6 { e.tcp_flags } else { 0 };
    }

    /// Drop events this host's dataplane could not report (suppressed or lost) during the
    /// current interval.
    pub fn unreported(&mut self, n: u64) {
        self.unreported = self.unreported.saturating_add(n);
    }

    /// The records of the interval `[start, end)`, and a fresh interval.
    pub fn flush(
        &mut self,
        host: &str,
        start: SystemTime,
        end: SystemTime,
        locals: &Locals,
    ) -> Vec<FlowLogRecord> {
        let pending = std::mem::take(&mut self.pending);
        let unreported = std::mem::take(&mut self.unreported);
        let mut out = Vec::with_capacity(pending.len());
        for (k, acc) in pending {
            let Some(local) = locals.by_id(&k.endpoint) else {
                continue;
            };
            let reject = k.action == Action::Reject;
            out.push(FlowLogRecord {
                host: host.to_owned(),
                universe: local.universe.clone(),
                endpoint: k.endpoint,
                interface: local.interface.clone(),
                flow_direction: k.direction,
                action: k.action,
                srcaddr: k.src,
                dstaddr: k.dst,
                srcport: k.sport,
                dstport: k.dport,
                protocol: k.proto,
                packets: acc.packets,
                bytes: acc.bytes,
                start: Timestamp(start),
                end: Timestamp(end),
                tcp_flags: acc.flags,
                rule: (k.rule != 0).then(|| crate::events::rule_id(k.rule)),
                reason: DropReason::from_code(k.reason).map(|r| r.label().to_owned()),
                sampled: reject && unreported > 0,
                unreported_drops: if reject { unreported } else { 0 },
            });
        }
        out
    }

    /// Packets admitted per rule (its id's bits) since the daemon started.
    pub fn rule_packets(&self) -> &BTreeMap<u32, u64> {
        &self.rule_packets
    }
}

fn opposite(d: Direction) -> Direction {
    match d {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

/// Appends records to the files of one directory, rotating them (see the module contract).
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    rotate_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

impl Writer {
    /// A writer into `dir` (made if missing, mode 0700: records name tenants' traffic).
    pub fn open(dir: &Path, rotate_bytes: u64, keep: u32) -> io::Result<Writer> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let size = fs::metadata(dir.join(FILE)).map(|m| m.len()).unwrap_or(0);
        Ok(Writer { dir: dir.to_owned(), rotate_bytes, keep, file: None, size })
    }

    fn path(&self, n: u32) -> PathBuf {
        if n == 0 {
            self.dir.join(FILE)
        } else {
            self.dir.join(format!("{FILE}.{n}"))
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            fs::remove_file(self.path(0)).or_else(ignore_missing)?;
        } else {
            fs::remove_file(self.path(self.keep)).or_else(ignore_missing)?;
            for n in (0..self.keep).rev() {
                fs::rename(self.path(n), self.path(n + 1)).or_else(ignore_missing)?;
            }
        }
        self.size = 0;
        Ok(())
    }

    /// Appends `records`, one JSON line each; a line longer than `rotate_bytes` is not written
    /// (counted in the error).
    pub fn write(&mut self, records: &[FlowLogRecord]) -> io::Result<()> {
        let mut too_long = 0usize;
        for r in records {
            let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
            line.push(b'\n');
            let len = line.len() as u64;
            if len > self.rotate_bytes {
                too_long += 1;
                continue;
            }
            if self.size + len > self.rotate_bytes {
                self.rotate()?;
            }
            if self.file.is_none() {
                use std::os::unix::fs::OpenOptionsExt;
                self.file = Some(
                    OpenOptions::new().create(true).append(true).mode(0o600).open(self.path(0))?,
                );
            }
            if let Some(f) = self.file.as_mut() {
                f.write_all(&line)?;
            }
            self.size += len;
        }
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        if too_long > 0 {
            return Err(io::Error::other(format!(
                "{too_long} records longer than flow_log_rotate_bytes were not written"
            )));
        }
        Ok(())
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// The records of `endpoint` in the files of `dir` (kept by a writer with `keep`) whose interval
/// ends at or after `since`, oldest first, at most `limit` (the newest ones). Lines that do not
/// parse are skipped.
pub fn read(
    dir: &Path,
    keep: u32,
    endpoint: &str,
    since: Option<SystemTime>,
    limit: usize,
) -> io::Result<Vec<FlowLogRecord>> {
    let mut out = std::collections::VecDeque::new();
    for n in (0..=keep).rev() {
        let path = if n == 0 { dir.join(FILE) } else { dir.join(format!("{FILE}.{n}")) };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            let line = line?;
            // Cheap check before parsing: the endpoint's id appears in its records.
            if !line.contains(endpoint) {
                continue;
            }
            let Ok(r) = serde_json::from_str::<FlowLogRecord>(&line) else {
                continue;
            };
            if r.endpoint != endpoint || since.is_some_and(|s| r.end.0 < s) {
                continue;
            }
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(r);
        }
    }
    Ok(out.into())
}

/// The flow logs of one daemon: the aggregator (fed by the interval task, garbage collection
/// and the drain of drop events), this host's endpoints as last seen, and where the records go.
#[derive(Debug)]
pub struct FlowLogs {
    host: String,
    aggregator: Mutex<Aggregator>,
    locals: Mutex<Arc<Locals>>,
    /// The interval the kernel stamps TCP flags with now (`Config::flow_interval`).
    interval: AtomicU32,
    /// The files: directory and rotated files kept.
    pub dir: PathBuf,
    pub keep: u32,
}

impl FlowLogs {
    pub fn new(host: &str, dir: &Path, keep: u32) -> FlowLogs {
        FlowLogs {
            host: host.to_owned(),
            aggregator: Mutex::default(),
            locals: Mutex::default(),
            interval: AtomicU32::new(0),
            dir: dir.to_owned(),
            keep,
        }
    }

    fn aggregator(&self) -> std::sync::MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn locals(&self) -> Arc<Locals> {
        self.locals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Keeps this host's endpoints of `state` (call on every new state).
    pub fn update_locals(&self, state: &State) {
        let locals = Arc::new(Locals::of(state, &self.host));
        *self.locals.lock().unwrap_or_else(PoisonError::into_inner) = locals;
    }

    /// An entry deleted by garbage collection (see [`Aggregator::gone`]).
    pub fn gone(&self, key: &Flow, v: &CtValue) {
        let interval = self.interval.load(Ordering::Relaxed);
        let locals = self.locals();
        self.aggregator().gone(key, v, interval, &locals);
    }

    /// A drop event, with the endpoints its rendering named (see [`Aggregator::reject`]).
    pub fn reject(&self, e: &dp::Event, endpoint: Option<&str>, receiver: Option<&str>) {
        let locals = self.locals();
        self.aggregator().reject(e, endpoint, receiver, &locals);
    }

    /// Packets admitted per rule since the daemon started.
    pub fn rule_packets(&self) -> BTreeMap<u32, u64> {
        self.aggregator().rule_packets().clone()
    }

    /// The daemon's start: what the table holds is the baseline of the first interval.
    pub fn start(&self, dataplane: &SharedDataplane) -> Result<(), crate::dataplane::Error> {
        let dp = dataplane.lock().unwrap_or_else(PoisonError::into_inner);
        self.interval.store(dp.flow_interval()?, Ordering::Relaxed);
        let entries = dp.conntrack_flows()?;
        let mut agg = self.aggregator();
        for (k, v) in &entries {
            agg.baseline(k, v);
        }
        Ok(())
    }

    /// The end of an interval `[start, end)`: the kernel moves on to the next interval number,
    /// the table is read (both under the dataplane's lock, which garbage collection holds
    /// while it deletes, so no entry is both read here and reported gone), and the records of
    /// the interval are returned. `unreported` is how many drop events the dataplane could not
    /// report in it.
    pub fn close_interval(
        &self,
        dataplane: &SharedDataplane,
        start: SystemTime,
        end: SystemTime,
        unreported: u64,
    ) -> Result<Vec<FlowLogRecord>, crate::dataplane::Error> {
        let locals = self.locals();
        let mut dp = dataplane.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = self.interval.load(Ordering::Relaxed);
        dp.set_flow_interval(closed.wrapping_add(1))?;
        self.interval.store(closed.wrapping_add(1), Ordering::Relaxed);
        let entries = dp.conntrack_flows()?;
        let mut agg = self.aggregator();
        drop(dp);
        let mut read = HashSet::with_capacity(entries.len());
        for (k, v) in &entries {
            agg.observe(k, v, closed, &locals);
            read.insert(*k);
        }
        agg.retain(&read);
        agg.unreported(unreported);
        Ok(agg.flush(&self.host, start, end, &locals))
    }
}

impl Locals {
    /// The endpoints of `state` placed on `host`: a lookup in the indices, not a walk over the
    /// fleet's endpoints (this runs on every new state).
    pub fn of(state: &State, host: &str) -> Locals {
        let mut out = Locals::default();
        for e in state.indexed().host_endpoints(host) {
            out.insert(
                e.serial,
                Local {
                    endpoint: e.id.clone(),
                    universe: e.universe.clone(),
                    interface: e.interface.clone(),
                    logs: e.flow_logs,
                },
            );
        }
        out
    }
}

/// Whether an endpoint of `host` in `state` has flow logs on: its REJECT records need the
/// kernel's drop events even where the daemon's `events` setting is off. A lookup in the
/// indices, as [`Locals::of`].
pub fn wanted_on(state: &State, host: &str) -> bool {
    let state = state.indexed();
    let on = state.host_endpoints(host).any(|e| e.flow_logs);
    on
}

/// With `events = false`, keeps the kernel's verdict events on exactly while an endpoint of
/// `host` has flow logs on ([`wanted_on`]), so that its REJECT records are written; the
/// events then feed flow logs only (the drain does not publish them). Runs until `states`
/// closes.
pub async fn keep_drop_events(
    dataplane: SharedDataplane,
    mut states: watch::Receiver<Arc<State>>,
    host: String,
) {
    let mut current: Option<bool> = None;
    loop {
        let want = wanted_on(&states.borrow_and_update(), &host);
        if current != Some(want) {
            let set = dataplane.lock().unwrap_or_else(PoisonError::into_inner).set_events(want);
            match set {
                Ok(()) => {
                    tracing::info!(
                        on = want,
                        "verdict events for the REJECT records of flow logs (events = false)"
                    );
                    current = Some(want);
                }
                Err(e) => {
                    tracing::error!(error = %e, "turning verdict events for flow logs on or off")
                }
            }
        }
        if states.changed().await.is_err() {
            return;
        }
    }
}

/// Settings of the interval task.
#[derive(Clone, Debug)]
pub struct Settings {
    pub interval: Duration,
    pub rotate_bytes: u64,
}

/// Closes an interval every `settings.interval` and writes its records; runs until dropped.
/// `states` keeps the endpoints current; `drops_unreported` reads how many drop events the
/// dataplane has left unreported so far (suppressed and lost, summed over CPUs).
pub async fn run(
    logs: Arc<FlowLogs>,
    dataplane: SharedDataplane,
    mut states: watch::Receiver<Arc<State>>,
    settings: Settings,
    drops_unreported: impl Fn(&SharedDataplane) -> u64 + Send + Sync + 'static,
) {
    logs.update_locals(&states.borrow_and_update());
    let writer = match Writer::open(&logs.dir, settings.rotate_bytes, logs.keep) {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            tracing::error!(dir = %logs.dir.display(), error = %e, "cannot write flow logs; none will be written");
            return;
        }
    };
    {
        let (logs, dataplane) = (logs.clone(), dataplane.clone());
        match tokio::task::spawn_blocking(move || logs.start(&dataplane)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "reading conntrack for flow logs"),
            Err(e) => tracing::warn!(error = %e, "reading conntrack for flow logs"),
        }
    }
    let mut unreported_before = drops_unreported(&dataplane);
    let mut start = SystemTime::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.interval,
        settings.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drops_unreported = Arc::new(drops_unreported);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = states.changed() => {
                if changed.is_err() {
                    return;
                }
                logs.update_locals(&states.borrow_and_update());
                continue;
            }
        }
        let end = SystemTime::now();
        let (l, d, count, w) =
            (logs.clone(), dataplane.clone(), drops_unreported.clone(), writer.clone());
        let before = unreported_before;
        let closed = tokio::task::spawn_blocking(move || {
            let unreported = count(&d);
            let records = l
                .close_interval(&d, start, end, unreported.saturating_sub(before))
                .map_err(|e| e.to_string())?;
            let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
            Ok::<_, String>((
                w.write(&records).map_err(|e| e.to_string()).err(),
                records.len(),
                unreported,
            ))
        })
        .await;
        start = end;
        match closed {
            Ok(Ok((error, n, now))) => {
                unreported_before = now;
                match error {
                    None => tracing::debug!(records = n, "flow logs written"),
                    Some(e) => tracing::error!(error = %e, "writing flow logs"),
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "flow logs: reading conntrack failed; the interval is skipped")
            }
            Err(e) => tracing::error!(error = %e, "flow logs: the interval task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::{Ct6Key, CtCounters, CtEntry, CtKey};

    fn locals() -> Locals {
        let mut l = Locals::default();
        for (serial, id, logs) in [(1, "ep-a", true), (2, "ep-b", true), (3, "ep-c", false)] {
            l.insert(
                serial,
                Local {
                    endpoint: id.into(),
                    universe: "uni-1".into(),
                    interface: format!("v{id}"),
                    logs,
                },
            );
        }
        l
    }

    /// The test address ending in `last`: `10.0.0.<last>`, or `fd00::<last>` (`family` 6).
    fn addr(family: u8, last: u8) -> IpAddr {
        if family == 4 {
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
        } else {
            IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(last)))
        }
    }

    /// A flow of `VERSE_CT` (`family` 4) or `VERSE_CT6` (6), as flow logs read it.
    fn key_in(family: u8, src: u8, dst: u8, proto: u8) -> Flow {
        use crate::conntrack::FlowKey;
        match (addr(family, src), addr(family, dst)) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                CtKey::new(7, s.octets(), d.octets(), 40000, 5432, proto).flow()
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                Ct6Key::new(7, s.octets(), d.octets(), 40000, 5432, proto).flow()
            }
            _ => unreachable!("one family"),
        }
    }

    fn key(src: u8, dst: u8, proto: u8) -> Flow {
        key_in(4, src, dst, proto)
    }

    fn value(
        src: u64,
        dst: u64,
        packets: [u64; 2],
        bytes: [u64; 2],
        flags: (u32, [u8; 4]),
    ) -> CtValue {
        CtValue {
            entry: CtEntry { src_serial: src, dst_serial: dst, ..CtEntry::default() },
            counters: CtCounters {
                own_packets: packets,
                own_bytes: bytes,
                created_ns: 100,
                rule_egress: 0x11,
                rule_ingress: 0x22,
                flags_interval: flags.0,
                flags: flags.1,
                ..CtCounters::default()
            },
            ..CtValue::default()
        }
    }

    fn find<'a>(rs: &'a [FlowLogRecord], ep: &str, dir: Direction) -> Vec<&'a FlowLogRecord> {
        rs.iter().filter(|r| r.endpoint == ep && r.flow_direction == dir).collect()
    }

    /// This host's endpoints come from the indices, on a state whose last edits are not yet in
    /// them too (`State::indexed`): endpoints created, moved in flow logs, deleted, on two
    /// hosts, as a walk over every endpoint finds them.
    #[test]
    fn this_hosts_endpoints_are_looked_up_in_the_indices_after_every_edit() {
        use crate::model::{CreateEndpoint, CreateUniverse, PatchEndpoint};
        let walk = |s: &State, host: &str| -> BTreeMap<u64, (String, bool)> {
            let on = s.endpoints.values().filter(|e| e.host == host);
            on.map(|e| (e.serial, (e.id.clone(), e.flow_logs))).collect()
        };
        let looked_up = |s: &State, host: &str| -> BTreeMap<u64, (String, bool)> {
            let l = Locals::of(s, host);
            l.by_serial.iter().map(|(k, v)| (*k, (v.endpoint.clone(), v.logs))).collect()
        };
        let mut s = State::default();
        let uni = s
            .create_universe(CreateUniverse {
                name: "u".into(),
                cidr: Some("10.1.0.0/16".into()),
                cidrs: None,
                ipv6_cidrs: None,
            })
            .unwrap()
            .id;
        let mut ids = Vec::new();
        for n in 0..6u8 {
            let ep = s
                .create_endpoint(
                    CreateEndpoint {
                        universe: uni.clone(),
                        host: Some(if n % 2 == 0 { "h1" } else { "h2" }.into()),
                        netns: format!("n{n}"),
                        ip: format!("10.1.0.{}", 10 + n),
                        security_groups: None,
                        conntrack_budget: None,
                        flow_logs: None,
                        ipv6: None,
                    },
                    "h1",
                )
                .unwrap();
            ids.push(ep.id);
        }
        for step in 0..4 {
            match step {
                0 => {}
                1 => {
                    let on = PatchEndpoint { security_groups: None, flow_logs: Some(true) };
                    s.patch_endpoint(&ids[2], on).unwrap();
                }
                2 => {
                    s.delete_endpoint(&ids[0]).unwrap();
                }
                _ => {
                    s.delete_endpoint(&ids[2]).unwrap();
                }
            }
            for host in ["h1", "h2", "h3"] {
                assert_eq!(looked_up(&s, host), walk(&s, host), "step {step}, {host}");
                let any_logs = walk(&s, host).values().any(|(_, logs)| *logs);
                assert_eq!(wanted_on(&s, host), any_logs, "step {step}, {host}");
            }
        }
        assert!(!wanted_on(&State::default(), "h1"));
    }

    #[test]
    fn an_interval_reports_what_each_entry_counted_since_the_last_read_per_endpoint_and_direction()
    {
        for family in [4, 6] {
            interval_reports_in(family);
        }
    }

    fn interval_reports_in(family: u8) {
        let l = locals();
        let mut agg = Aggregator::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t1 = t0 + Duration::from_secs(60);
        let t2 = t1 + Duration::from_secs(60);
        let k = key_in(family, 1, 2, 6);
        // Interval 5: 4 packets out (SYN, ACK, PSH|ACK, FIN|ACK), 3 back (SYN|ACK, ACK, ACK).
        agg.observe(&k, &value(1, 2, [4, 3], [240, 180], (5, [0x1B, 0x12, 0, 0])), 5, &l);
        let rs = agg.flush("h1", t0, t1, &l);
        assert_eq!(rs.len(), 4, "two endpoints, two directions: {rs:#?}");
        let a_out = find(&rs, "ep-a", Direction::Egress)[0];
        assert_eq!((a_out.packets, a_out.bytes, a_out.tcp_flags), (4, 240, 0x1B));
        assert_eq!(a_out.srcaddr, addr(family, 1));
        assert_eq!((a_out.srcport, a_out.dstport), (40000, 5432));
        assert_eq!(a_out.rule.as_deref(), Some("sgr-00000011"), "the sender's egress rule");
        assert_eq!(a_out.action, Action::Accept);
        let a_in = find(&rs, "ep-a", Direction::Ingress)[0];
        assert_eq!((a_in.packets, a_in.bytes, a_in.tcp_flags), (3, 180, 0x12));
        assert_eq!(a_in.srcaddr, addr(family, 2));
        assert_eq!((a_in.srcport, a_in.dstport), (5432, 40000));
        let b_in = find(&rs, "ep-b", Direction::Ingress)[0];
        assert_eq!((b_in.packets, b_in.rule.as_deref()), (4, Some("sgr-00000022")));
        assert_eq!(find(&rs, "ep-b", Direction::Egress)[0].packets, 3);
        assert_eq!(agg.rule_packets().get(&0x11), Some(&7));
        assert_eq!(agg.rule_packets().get(&0x22), Some(&7));

        // Interval 6: the kernel moved interval 6's flags in (the entry stamped 7: interval 6
        // is the previous pair); only the new packets count.
        agg.observe(&k, &value(1, 2, [6, 3], [340, 180], (7, [0x10, 0, 0x11, 0])), 6, &l);
        let rs = agg.flush("h1", t1, t2, &l);
        assert_eq!(rs.len(), 2, "only the direction that carried packets: {rs:#?}");
        let a_out = find(&rs, "ep-a", Direction::Egress)[0];
        assert_eq!((a_out.packets, a_out.bytes, a_out.tcp_flags), (2, 100, 0x11));
        assert_eq!((a_out.start.0, a_out.end.0), (t1, t2));
        assert_eq!(agg.rule_packets().get(&0x11), Some(&9));
        // The JSON line prints the addresses in their standard form.
        let line = serde_json::to_value(a_out).unwrap();
        assert_eq!(line["srcaddr"], addr(family, 1).to_string());
        assert_eq!(line["dstaddr"], if family == 4 { "10.0.0.2" } else { "fd00::2" });

        // Nothing new: no records.
        agg.observe(&k, &value(1, 2, [6, 3], [340, 180], (7, [0x10, 0, 0x11, 0])), 7, &l);
        assert!(agg.flush("h1", t2, t2, &l).is_empty());
    }

    #[test]
    fn entries_made_anew_gone_or_off_are_counted_right() {
        let l = locals();
        let mut agg = Aggregator::default();
        let t = SystemTime::UNIX_EPOCH;
        let k = key(1, 3, 17);
        agg.observe(&k, &value(1, 3, [10, 0], [1000, 0], (0, [0; 4])), 0, &l);
        let rs = agg.flush("h1", t, t, &l);
        assert_eq!(rs.len(), 1, "ep-c's logs are off: only ep-a's record: {rs:#?}");
        assert_eq!((rs[0].endpoint.as_str(), rs[0].packets, rs[0].tcp_flags), ("ep-a", 10, 0));
        // The same flow with a counter gone back (counts another CPU made were lost when the
        // kernel replaced the entry): nothing new, not the flow's whole history again; the
        // next read counts from there.
        let mut lost = value(1, 3, [15, 0], [1500, 0], (1, [0; 4]));
        agg.observe(&k, &lost, 1, &l);
        agg.flush("h1", t, t, &l);
        lost.counters.own_packets[0] = 12;
        lost.counters.own_bytes[0] = 1200;
        agg.observe(&k, &lost, 1, &l);
        assert!(agg.flush("h1", t, t, &l).is_empty(), "a counter that went back reports nothing");
        lost.counters.own_packets[0] = 14;
        lost.counters.own_bytes[0] = 1400;
        agg.observe(&k, &lost, 1, &l);
        assert_eq!(agg.flush("h1", t, t, &l)[0].packets, 2, "then counts from the lower value");
        // Made anew under the same key (another creation time) with fewer packets: all new.
        let mut fresh = value(1, 3, [12, 0], [1200, 0], (1, [0; 4]));
        fresh.counters.created_ns = 200;
        agg.observe(&k, &fresh, 1, &l);
        assert_eq!(agg.flush("h1", t, t, &l)[0].packets, 12, "a new flow: everything it counted");
        // Deleted by garbage collection after 3 more packets, before the next read.
        let mut last = fresh;
        // Two of them counted by the CPU that claimed the direction, one by another CPU.
        last.counters.own_packets[0] = 14;
        last.counters.own_bytes[0] = 1400;
        last.counters.shared_packets[0] = 1;
        last.counters.shared_bytes[0] = 100;
        agg.gone(&k, &last, 2, &l);
        agg.retain(&HashSet::new());
        let rs = agg.flush("h1", t, t, &l);
        assert_eq!((rs[0].packets, rs[0].bytes), (3, 300), "its last packets are not lost");
        // A baseline at start reports nothing of what was counted before.
        agg.baseline(&k, &last);
        assert!(agg.flush("h1", t, t, &l).is_empty());
    }

    #[test]
    fn drops_are_rejected_records_of_the_endpoint_whose_rules_decided_and_say_when_sampled() {
        for family in [4, 6] {
            drops_are_rejected_records_in(family);
        }
    }

    fn drops_are_rejected_records_in(family: u8) {
        let l = locals();
        let mut agg = Aggregator::default();
        let mut syn = dp::Event {
            kind: dp::event_kind::DROP,
            hook: Hook::FromEndpoint as u8,
            proto: 6,
            tcp_flags: 0x02,
            reason: DropReason::PolicyIngress as u32,
            sport: 40001,
            dport: 8080,
            len: 74,
            ..dp::Event::default()
        };
        syn.set_addrs(addr(family, 1), addr(family, 2));
        agg.reject(&syn, Some("ep-a"), Some("ep-b"), &l);
        agg.reject(&syn, Some("ep-a"), Some("ep-b"), &l);
        let egress = dp::Event { reason: DropReason::PolicyEgress as u32, ..syn };
        agg.reject(&egress, Some("ep-a"), Some("ep-b"), &l);
        let from_underlay = dp::Event { hook: Hook::FromUnderlay as u8, len: 74 + 50, ..syn };
        agg.reject(&from_underlay, Some("ep-b"), Some("ep-b"), &l);
        agg.reject(&syn, Some("ep-b"), Some("ep-c"), &l);
        agg.unreported(5);
        let rs = agg.flush("h1", SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH, &l);
        assert_eq!(rs.len(), 2, "{rs:#?}");
        let b = find(&rs, "ep-b", Direction::Ingress)[0];
        assert_eq!(
            (b.packets, b.bytes, b.tcp_flags),
            (3, 180, 0x02),
            "the receiver's ingress rules"
        );
        assert_eq!(b.reason.as_deref(), Some("policy_ingress"));
        assert_eq!((b.action, b.rule.as_deref()), (Action::Reject, None));
        assert!(b.sampled && b.unreported_drops == 5);
        assert_eq!((b.srcaddr, b.dstaddr), (addr(family, 1), addr(family, 2)));
        let a = find(&rs, "ep-a", Direction::Egress)[0];
        assert_eq!((a.packets, a.reason.as_deref()), (1, Some("policy_egress")));
    }

    #[test]
    fn files_rotate_and_read_back_oldest_first() {
        let dir = std::env::temp_dir().join(format!("verse-flowlogs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let l = locals();
        let mut w = Writer::open(&dir, 2000, 2).unwrap();
        for i in 0..40u64 {
            let mut agg = Aggregator::default();
            let k = key(1, 2, 17);
            agg.observe(&k, &value(1, 2, [i + 1, 0], [100, 0], (0, [0; 4])), 0, &l);
            w.write(&agg.flush("h1", SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH, &l)).unwrap();
        }
        let sizes: Vec<u64> = (0..4)
            .map(|n| {
                let p = if n == 0 { dir.join(FILE) } else { dir.join(format!("{FILE}.{n}")) };
                fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            })
            .collect();
        assert!(sizes[..3].iter().all(|s| *s > 0 && *s <= 2000), "{sizes:?}");
        assert_eq!(sizes[3], 0, "two rotated files kept");
        let back = read(&dir, 2, "ep-a", None, 1000).unwrap();
        assert!(back.len() < 40 && !back.is_empty());
        let packets: Vec<u64> = back.iter().map(|r| r.packets).collect();
        assert_eq!(*packets.last().unwrap(), 40, "the newest last");
        assert!(packets.windows(2).all(|w| w[1] == w[0] + 1), "oldest first: {packets:?}");
        assert_eq!(read(&dir, 2, "ep-a", None, 3).unwrap().len(), 3, "the newest 3");
        let _ = fs::remove_dir_all(&dir);
    }
}
