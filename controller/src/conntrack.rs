//! The controller's side of connection tracking (S7, S9, S14): the budget counters shared with
//! the kernel, and garbage collection of `VERSE_CT` and `VERSE_CT6` (IPv6 flows, the same
//! values under a key with 16-byte addresses, charged to the same budgets), which are no LRU
//! and so never free an entry by themselves (see `dataplane-ebpf/src/conntrack.rs` for the kernel's side).
//!
//! Contract:
//! - [`Owners`] maps `VERSE_CT_OWNERS` into this process. `used` of a slot is the number of
//!   `VERSE_CT` entries charged to it: the kernel adds one per entry it inserts, and whoever
//!   deletes an entry subtracts one for it; only this module deletes entries, always with
//!   `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which tells it which entry it deleted, so it releases the
//!   slot of the very entry that went. Every change to `used` is an atomic instruction on the
//!   shared memory, like the kernel's.
//! - [`collect`] reads the whole table in batches (`BPF_MAP_LOOKUP_BATCH`) and deletes the
//!   entries a predicate calls garbage (expired, or naming an endpoint that is gone: see
//!   `verdict::is_garbage`). An entry a packet refreshed or replaced between the read and the
//!   delete may be deleted with it; the delete returns what it removed, and if that is no
//!   garbage any more it is put back (`BPF_NOEXIST`: unless a packet made the flow anew
//!   meanwhile, charging it then, in which case the removed entry is released). The race left
//!   is benign: a packet that refreshes a flow at the very moment it is deleted refreshes a
//!   deleted entry, and the flow's next packet is judged by policy as a new flow (S11: fail
//!   closed), as it would be had it come a moment after the timeout.
//! - [`Schedule`] decides when to collect: every `interval`, and sooner when an endpoint has
//!   used most of its budget and one of its entries is due to expire, but never more often than
//!   a multiple of the time the last collection took (its cost is bounded).
use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dataplane_common::{Ct6Key, CtEntry, CtKey, CtOwner, CtValue};

use crate::mapping::Mapped;

/// The key of a conntrack table: `VERSE_CT`'s ([`CtKey`]) or `VERSE_CT6`'s ([`Ct6Key`]). Both
/// tables hold the same values, charged to the same budgets, and are collected alike.
pub trait FlowKey: Copy + Default + aya::Pod {
    /// The key as the daemon's readers (flow logs, packets per rule) see either family's.
    fn flow(&self) -> Flow;
}

impl FlowKey for CtKey {
    fn flow(&self) -> Flow {
        let (src, dst) = (IpAddr::from(self.src), IpAddr::from(self.dst));
        let (vni, proto) = (self.vni(), self.proto());
        Flow { vni, src, dst, sport: self.sport, dport: self.dport, proto }
    }
}

impl FlowKey for Ct6Key {
    fn flow(&self) -> Flow {
        let (src, dst) = (IpAddr::from(self.src), IpAddr::from(self.dst));
        Flow { vni: self.vni, src, dst, sport: self.sport, dport: self.dport, proto: self.proto }
    }
}

/// A conntrack key of either table, family-neutral: the flow's universe, its original
/// direction's addresses and conntrack ports, its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub vni: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// `bpf(2)` commands (`include/uapi/linux/bpf.h`).
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_NOEXIST`: create a new element only.
const BPF_NOEXIST: u64 = 1;

/// Entries read per `BPF_MAP_LOOKUP_BATCH`. The kernel returns whole buckets and fails with
/// `ENOSPC` if one bucket does not fit; buckets hold a handful of entries.
const BATCH: usize = 4096;

/// `VERSE_CT_OWNERS`, mapped shared into this process; every access is atomic.
#[derive(Debug)]
pub struct Owners(Mapped<CtOwner>);

impl Owners {
    /// Maps the array behind `fd` (created with `BPF_F_MMAPABLE`, `slots` values of `CtOwner`).
    pub fn map(fd: BorrowedFd<'_>, slots: u32) -> io::Result<Owners> {
        Mapped::map(fd, slots).map(Owners)
    }

    /// The field at `offset` (a multiple of 8 within `CtOwner`) of `slot`, as an atomic.
    fn field(&self, slot: u32, offset: usize) -> Option<&AtomicU64> {
        // SAFETY: a field of a `CtOwner` (8-byte aligned, made of u64s) in the mapping; the
        // kernel and this process access them only atomically, and the mapping outlives `&self`.
        self.0.field(slot, offset).map(|p| unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }

    /// A copy of `slot` (each field read atomically), or `None` beyond the array.
    pub fn get(&self, slot: u32) -> Option<CtOwner> {
        let read = |offset| self.field(slot, offset).map(|f| f.load(Ordering::Relaxed));
        Some(CtOwner {
            serial: read(std::mem::offset_of!(CtOwner, serial))?,
            budget: read(std::mem::offset_of!(CtOwner, budget))?,
            used: read(std::mem::offset_of!(CtOwner, used))?,
            exceeded: read(std::mem::offset_of!(CtOwner, exceeded))?,
            _pad: [0; 4],
        })
    }

    /// Gives `slot` to the endpoint of `serial` with `budget` (0, 0: frees it). `used` is left
    /// alone: it counts the entries charged to the slot, which leave one by one. `exceeded`
    /// starts again from 0 when the slot changes hands. False beyond the array.
    pub fn assign(&self, slot: u32, serial: u64, budget: u64) -> bool {
        let (Some(s), Some(b), Some(x)) = (
            self.field(slot, std::mem::offset_of!(CtOwner, serial)),
            self.field(slot, std::mem::offset_of!(CtOwner, budget)),
            self.field(slot, std::mem::offset_of!(CtOwner, exceeded)),
        ) else {
            return false;
        };
        if s.swap(serial, Ordering::Relaxed) != serial {
            x.store(0, Ordering::Relaxed);
        }
        b.store(budget, Ordering::Relaxed);
        true
    }

    /// Releases one entry charged to `slot` (never below 0).
    pub fn release(&self, slot: u32) {
        if let Some(used) = self.field(slot, std::mem::offset_of!(CtOwner, used)) {
            let _ = used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_sub(1));
        }
    }

    /// Every slot with an endpoint (serial non-zero), by slot.
    pub fn assigned(&self) -> BTreeMap<u32, CtOwner> {
        (0..self.0.slots())
            .filter_map(|slot| self.get(slot).map(|o| (slot, o)))
            .filter(|(_, o)| o.serial != 0)
            .collect()
    }
}

/// `union bpf_attr` for the element commands: map_fd, (pad), key, value, flags.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands (`struct { ... } batch`).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr` must be the `bpf_attr` layout of `cmd`, and every pointer in it valid for what `cmd`
/// reads or writes.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>() as u32)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of the conntrack table behind `fd`, read in batches. Entries added or deleted
/// meanwhile may or may not be seen.
pub fn read_all<K: FlowKey>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, CtValue)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![CtValue::default(); BATCH];
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch layout; `keys` and `values` hold `count` elements of the
        // map's key and value types; the tokens are u32, as hash maps use.
        let rc = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match rc {
            Ok(()) => {}
            // The end of the table (with the last entries, if any).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// Writes `entries` into the table behind `fd` in batches (`BPF_MAP_UPDATE_BATCH`), charging
/// nobody: for tests and benchmarks that need a full table.
pub fn write_all<K: FlowKey>(fd: BorrowedFd<'_>, entries: &[(K, CtValue)]) -> io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
        let values: Vec<CtValue> = chunk.iter().map(|e| e.1).collect();
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch layout; `keys` and `values` hold `count` elements of the
        // map's types and outlive the call.
        unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    }
    Ok(())
}

/// Deletes `key` and returns the value it held (`None`: no such entry).
pub fn take<K: FlowKey>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<CtValue>> {
    let mut value = CtValue::default();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &raw mut value as u64,
        flags: 0,
    };
    // SAFETY: `attr` is the element layout; `key` and `value` are the map's types and outlive
    // the call.
    match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) } {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Inserts `key` unless it exists; false if it does.
fn put_back<K: FlowKey>(fd: BorrowedFd<'_>, key: &K, value: &CtValue) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const CtValue as u64,
        flags: BPF_NOEXIST,
    };
    // SAFETY: `attr` is the element layout; `key` and `value` outlive the call.
    match unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Entries read.
    pub scanned: u64,
    /// Entries deleted (and released from their owner's budget).
    pub deleted: u64,
    /// Entries deleted and put back because a packet had made them live again meanwhile.
    pub restored: u64,
    /// Wall time of the whole collection.
    pub duration: Duration,
}

/// Collects the table behind `table`: every entry `garbage` calls garbage is deleted and
/// released from its owner's budget in `owners` (see the module contract for the races);
/// `kept` sees every other entry read, `gone` every entry deleted, as the delete returned it.
pub fn collect<K: FlowKey>(
    table: BorrowedFd<'_>,
    owners: &Owners,
    garbage: &dyn Fn(&CtEntry) -> bool,
    kept: &mut dyn FnMut(&CtEntry),
    gone_to: &mut dyn FnMut(&K, &CtValue),
) -> io::Result<Collected> {
    let start = Instant::now();
    let mut report = Collected::default();
    for (key, value) in read_all(table)? {
        report.scanned += 1;
        if !garbage(&value.entry) {
            kept(&value.entry);
            continue;
        }
        let Some(gone) = take(table, &key)? else {
            continue;
        };
        if !garbage(&gone.entry) && put_back(table, &key, &gone)? {
            report.restored += 1;
            kept(&gone.entry);
            continue;
        }
        owners.release(gone.entry.owner_slot);
        gone_to(&key, &gone);
        report.deleted += 1;
    }
    report.duration = start.elapsed();
    Ok(report)
}

/// When to collect next (see the module contract). Pure: the caller passes the time.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Longest time between two collections.
    pub interval: Duration,
    /// Shortest time between two, as a multiple of how long the last one took ...
    pub cost_factor: u32,
    /// ... and at least this.
    pub min_gap: Duration,
    /// An endpoint with at least this share of its budget used (per mille) is under pressure.
    pub pressure_permille: u64,
    last_start: Option<Instant>,
    last_duration: Duration,
    /// The earliest monotonic-clock time (ns) at which an entry of an endpoint under pressure
    /// expires, as the last collection saw it.
    due_ns: Option<u64>,
}

impl Schedule {
    pub fn new(interval: Duration) -> Schedule {
        Schedule {
            interval,
            cost_factor: 20,
            min_gap: Duration::from_secs(1),
            pressure_permille: 900,
            last_start: None,
            last_duration: Duration::ZERO,
            due_ns: None,
        }
    }

    /// Whether `owner` is under pressure: most of its budget used.
    pub fn pressed(&self, owner: &CtOwner) -> bool {
        owner.budget > 0 && owner.used.saturating_mul(1000) >= owner.budget * self.pressure_permille
    }

    /// Whether to collect at `now` (`now_ns` on the conntrack clock), given the owners' counters.
    pub fn due(&self, now: Instant, now_ns: u64, owners: &BTreeMap<u32, CtOwner>) -> bool {
        let Some(last) = self.last_start else {
            return true;
        };
        let since = now.saturating_duration_since(last);
        if since >= self.interval {
            return true;
        }
        let gap = self.min_gap.max(self.last_duration * self.cost_factor);
        if since < gap || !owners.values().any(|o| self.pressed(o)) {
            return false;
        }
        // Under pressure: when an entry of a pressed owner is due, or, if the last collection
        // saw none of theirs (the pressure is new), at once.
        self.due_ns.is_none_or(|due| now_ns >= due)
    }

    /// Records a collection that started at `start` and what it found: `due_ns` is the earliest
    /// expiry of a kept entry of an owner under pressure, if any.
    pub fn done(&mut self, start: Instant, report: &Collected, due_ns: Option<u64>) {
        self.last_start = Some(start);
        self.last_duration = report.duration;
        self.due_ns = due_ns;
    }

    /// The time the last collection took.
    pub fn last_duration(&self) -> Duration {
        self.last_duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(budget: u64, used: u64) -> CtOwner {
        CtOwner { serial: 1, budget, used, ..CtOwner::default() }
    }

    #[test]
    fn collects_at_start_then_every_interval() {
        let mut s = Schedule::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let calm: BTreeMap<u32, CtOwner> = [(1, owner(100, 10))].into_iter().collect();
        assert!(s.due(t0, 0, &calm));
        s.done(t0, &Collected { duration: Duration::from_millis(5), ..Collected::default() }, None);
        assert!(!s.due(t0 + Duration::from_secs(29), 0, &calm));
        assert!(s.due(t0 + Duration::from_secs(30), 0, &calm));
    }

    #[test]
    fn collects_sooner_under_pressure_but_not_more_often_than_its_cost_allows() {
        let mut s = Schedule::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let pressed: BTreeMap<u32, CtOwner> = [(1, owner(100, 95))].into_iter().collect();
        // The last collection took 100 ms: not again within 20 x 100 ms = 2 s.
        let took = Collected { duration: Duration::from_millis(100), ..Collected::default() };
        s.done(t0, &took, None);
        assert!(!s.due(t0 + Duration::from_millis(1500), 0, &pressed));
        assert!(s.due(t0 + Duration::from_millis(2000), 0, &pressed), "new pressure: at once");
        // It saw the pressed owner's first entry expire at 10 s on the conntrack clock.
        s.done(t0, &took, Some(10_000_000_000));
        assert!(!s.due(t0 + Duration::from_secs(3), 9_999_999_999, &pressed));
        assert!(s.due(t0 + Duration::from_secs(3), 10_000_000_000, &pressed));
        assert!(s.pressed(&owner(100, 90)) && !s.pressed(&owner(100, 89)));
        assert!(!s.pressed(&owner(0, 0)), "a free slot is never pressed");
    }
}
