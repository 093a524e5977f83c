//! Connection tracking (S6, S7, S9, S14) in the kernel. What it means (keys, binding to
//! endpoints, budgets, roles and directions, states, timeouts) is described once, by the
//! reference model: `controller/src/verdict/conntrack.rs`. This module implements it over
//! `VERSE_CT`, a plain preallocated hash (never an LRU: nothing is evicted for room), and adds
//! what only the kernel side has:
//!
//! Binding: the sender is checked in [`lookup`]; the receiver by the caller, against the route
//! it delivers by ([`Hit::receiver_serial`]), or implicitly when it delivers by the hop cached in
//! the entry: a hop is cached only after that check passed, and stays current only while the
//! routes are unchanged (below).
//!
//! Budgets: the owner's slot of `VERSE_CT_OWNERS` counts its entries. [`create`] adds one to
//! `used` before inserting, atomically, and refuses the flow when `used` had already reached
//! `budget`; only the controller deletes entries, subtracting one for each. The established path
//! never touches the budget.
//!
//! Delivery cache (for `VERSE_CT6`'s entries as for these: [`Table`]): each entry also
//! remembers, per direction, where the last delivered packet went ([`CtHop`]: the receiver's ifindex and MAC, or the underlay address of its host), stamped
//! with the route epoch (`Config::epoch`) read *before* the route lookup it was copied from. A hit
//! whose hop carries the current epoch delivers without looking the route up; any other hit looks
//! it up and caches the answer ([`refresh_and_cache`]). Since the controller bumps the epoch after
//! every route or endpoint change, a cached hop is never staler than a lookup would be. Hops are
//! only ever written by replacing the whole value, never in place, so a reader never sees a hop
//! torn between two writers.
//!
//! Counters (flow logs, packets per rule): every delivered packet of a flow is added to its
//! entry's [`CtCounters`] ([`refresh`], [`refresh_and_cache`]), the first one when the entry is
//! made ([`first_counters`]). Each direction is counted with plain adds by the CPU that claimed
//! it (the creating CPU for the original direction; the first CPU to count a reply claims the
//! other, by compare-and-swap) and with atomic adds by any other CPU (see `CtCounters`: an
//! atomic add cost about as much as the rest of the refresh); for TCP, the flags are OR-ed into
//! the current interval's slot, written only when they add a bit. The refresh writes the state
//! and the last-seen time only when they change (once per clock tick for a busy flow), so that
//! the CPUs carrying the two directions of a flow do not bounce its cache line on every packet.
//! A refresh that caches a hop replaces the whole value with the packet added to its copy: adds
//! made by other CPUs between the copy and the replace are lost, which happens only after a
//! route change.
use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns};
use aya_ebpf::programs::TcContext;
pub use dataplane_common::conntrack::{creates, initial_state, Role};
use dataplane_common::conntrack::{expired, next_state};
use dataplane_common::{
    ct_state, Config, CtCounters, CtEntry, CtHop, CtKey, CtValue, DropReason, Route,
};

use crate::{
    atomic,
    maps::{VERSE_CLOCK, VERSE_CT, VERSE_CT_OWNERS, VERSE_CT_SCRATCH},
};

/// `bpf_map_update_elem` flags (`include/uapi/linux/bpf.h`).
pub(crate) const BPF_NOEXIST: u64 = 1;
pub(crate) const BPF_EXIST: u64 = 2;

/// The conntrack clock: `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`), nanoseconds that
/// advance once per scheduler tick, fine enough for timeouts of seconds. Read through a per-CPU
/// copy keyed by `jiffies` (`bpf_jiffies64`, which the verifier inlines into a memory load): the
/// helper, an out-of-line call that was a tenth of the established path, runs once per tick and
/// CPU. A program interrupted on its CPU between the stores of a refresh can leave the copy one
/// tick behind, for one tick: conntrack time is tick-precise anyway.
#[inline(always)]
pub fn now() -> u64 {
    read_clock::<false>().0
}

/// [`now`], and this CPU as `CtCounters::cpu` names it ([`this_cpu`]), kept in the same per-CPU
/// copy: the established path's refresh needs both, and a helper call (even one the verifier
/// inlines) costs the walk the registers it clobbers.
#[inline(always)]
pub fn clock() -> (u64, u64) {
    read_clock::<true>()
}

/// The clock of [`now`]; with `CPU`, also this CPU (else 0). A copy refreshed by [`now`] has
/// `cpu` 0 until [`clock`] first fills it; `cpu` is stored before `jiffies`, so that a copy
/// whose `jiffies` is current has it (`jiffies64` is never 0: it starts at `INITIAL_JIFFIES`).
#[inline(always)]
fn read_clock<const CPU: bool>() -> (u64, u64) {
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    if let Some(clock) = VERSE_CLOCK.get_ptr_mut(0) {
        // SAFETY: slot 0 of this CPU's copy; nothing else runs on this CPU during the program
        // but a program that interrupts it (see above). bpf_ktime_get_coarse_ns has no
        // preconditions.
        unsafe {
            // Read together, before the check (fewer loads through the pointer on the path):
            // a program interrupting these reads can at worst make this run's clock the tick
            // before, as above.
            let (copy_jiffies, copy_ns, copy_cpu) = ((*clock).jiffies, (*clock).ns, (*clock).cpu);
            if copy_jiffies == jiffies && (!CPU || copy_cpu != 0) {
                return (copy_ns, copy_cpu);
            }
            let ns = bpf_ktime_get_coarse_ns();
            (*clock).ns = ns;
            let mut cpu = 0;
            if CPU {
                cpu = this_cpu();
                (*clock).cpu = cpu;
            }
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*clock).jiffies), jiffies);
            return (ns, cpu);
        }
    }
    // SAFETY: as above.
    (unsafe { bpf_ktime_get_coarse_ns() }, if CPU { this_cpu() } else { 0 })
}

/// The current route epoch (`Config::epoch`; 0, no epoch yet, disables the cache). Read it
/// before looking a route up whose answer will be cached.
#[inline(always)]
pub fn epoch(config: &Config) -> u32 {
    // SAFETY: a field of the live configuration value; volatile, so that it is read here, before
    // the route lookup, and once (the controller stores it whole: see `Config::epoch`).
    unsafe { core::ptr::read_volatile(&config.epoch) }
}

/// The hop to cache for `route`, looked up after `epoch` was read.
#[inline(always)]
pub fn hop(route: &Route, epoch: u32) -> CtHop {
    CtHop { epoch, ifindex: route.ifindex, mac: route.mac, _pad: [0; 2], underlay: route.underlay }
}

/// A live conntrack entry found for a packet, bound to its sender.
pub struct Hit {
    pub(crate) value: *mut CtValue,
    /// The packet travels in the flow's reply direction.
    pub(crate) reply: bool,
}

impl Hit {
    /// The cached delivery for this packet's direction, if it was cached under `epoch`.
    #[inline(always)]
    pub fn cached(&self, epoch: u32) -> Option<CtHop> {
        // One pointer for the packet's direction (`reply` is the hop after `original`), not a
        // choice between the two for each field.
        const _: () = assert!(
            core::mem::offset_of!(CtValue, reply)
                == core::mem::offset_of!(CtValue, original) + core::mem::size_of::<CtHop>()
        );
        // SAFETY: the pointer came from a lookup in this program run; map values stay valid for
        // the whole run (RCU), and hops are never written in place (see the module doc). One
        // hop past `original` is `reply` (checked above), inside the value.
        let hop =
            unsafe { *core::ptr::addr_of!((*self.value).original).add(usize::from(self.reply)) };
        if hop.epoch == epoch && epoch != 0 {
            Some(hop)
        } else {
            None
        }
    }

    /// The serial the packet's receiver must have for the entry to match it (the endpoint of the
    /// other side of the flow).
    #[inline(always)]
    pub fn receiver_serial(&self) -> u64 {
        // SAFETY: as in `cached`.
        let e = unsafe { &(*self.value).entry };
        if self.reply {
            e.src_serial
        } else {
            e.dst_serial
        }
    }
}

/// What a lookup found for a packet.
pub struct Found {
    /// A live entry bound to the sender, if any.
    pub hit: Option<Hit>,
}

/// The flow of a packet with key `key` and role `role`, sent by the endpoint of serial `sender`:
/// `key` (the packet goes the flow's original way), then its reverse (a reply), each only if the
/// role may match that way ([`Role`]); the first live entry whose endpoint on the sender's side
/// is `sender` is the hit. Expired entries and entries of other endpoints are misses.
#[inline(always)]
pub fn lookup(
    key: &CtKey,
    role: Role,
    sender: u64,
    now: u64,
    timeouts: &[u64; ct_state::COUNT],
) -> Found {
    if role == Role::Untracked {
        // Never tracked, so never created either: the entry under the key does not matter.
        return Found { hit: None };
    }
    let own = VERSE_CT.get_ptr_mut(key);
    if role != Role::Answers {
        if let Some(value) = own {
            // SAFETY: the kernel returned a pointer to a live value of this map's value type.
            let e = unsafe { &(*value).entry };
            if e.src_serial == sender && !expired(e.state, e.last_seen_ns, now, timeouts) {
                return Found { hit: Some(Hit { value, reply: false }) };
            }
        }
    }
    if role == Role::Opens {
        return Found { hit: None };
    }
    let reverse = key.reversed();
    if let Some(value) = VERSE_CT.get_ptr_mut(&reverse) {
        // SAFETY: as above.
        let e = unsafe { &(*value).entry };
        if e.dst_serial == sender && !expired(e.state, e.last_seen_ns, now, timeouts) {
            return Found { hit: Some(Hit { value, reply: true }) };
        }
    }
    Found { hit: None }
}

/// Whether `key` (or its reverse) is a live flow of `sender` to `receiver` (serials), either
/// way: the flow an ICMP error quotes.
#[inline(always)]
pub fn tracked(
    key: &CtKey,
    sender: u64,
    receiver: u64,
    now: u64,
    timeouts: &[u64; ct_state::COUNT],
) -> bool {
    lookup(key, Role::Any, sender, now, timeouts)
        .hit
        .is_some_and(|h| h.receiver_serial() == receiver)
}

/// What one delivered packet adds to its flow's counters.
#[derive(Clone, Copy)]
pub struct Size {
    /// Segments on the wire (1, or `gso_segs` of a GSO packet).
    pub segs: u64,
    /// Bytes of those IPv4 datagrams.
    pub bytes: u64,
}

/// The [`Size`] of the IPv4 packet `ip` (with L4 header `l4`) in `ctx`: a GSO packet is
/// `gso_segs` datagrams, each with its own IPv4 and L4 headers.
#[inline(always)]
pub fn size(ctx: &TcContext, ip: &crate::flow::Ipv4, l4: &crate::flow::L4) -> Size {
    let tot_len = (ip.ip_end - (ip.l4_off - ip.ihl)) as u64;
    // SAFETY: a read of `gso_segs` from the context, which the verifier allows for TC.
    let segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    if segs > 1 {
        let headers = (ip.ihl + l4.hdr_len as usize) as u64;
        Size { segs, bytes: tot_len + (segs - 1) * headers }
    } else {
        Size { segs: 1, bytes: tot_len }
    }
}

/// The counters of a new flow whose first packet is `size` with `tcp_flags`, admitted by these
/// rules, in flow-log interval `interval`: the original direction claimed by this CPU.
#[inline(always)]
fn first_counters(
    now: u64,
    size: Size,
    tcp_flags: u8,
    rule_egress: u32,
    rule_ingress: u32,
    interval: u32,
) -> CtCounters {
    CtCounters {
        own_packets: [size.segs, 0],
        own_bytes: [size.bytes, 0],
        shared_packets: [0, 0],
        shared_bytes: [0, 0],
        cpu: [this_cpu(), 0],
        created_ns: now,
        rule_egress,
        rule_ingress,
        flags_interval: interval,
        flags: [tcp_flags, 0, 0, 0],
    }
}

/// This CPU as `CtCounters::cpu` names it: its number plus one (0 is "unclaimed").
#[inline(always)]
pub(crate) fn this_cpu() -> u64 {
    // SAFETY: bpf_get_smp_processor_id has no preconditions (the verifier inlines it).
    u64::from(unsafe { bpf_get_smp_processor_id() }) + 1
}

/// ORs `tcp_flags` into the slot of direction `reply` of interval `interval` (see
/// `CtCounters`): nothing is written when they add no bit.
#[inline(always)]
fn or_flags(c: &mut CtCounters, reply: bool, tcp_flags: u8, interval: u32) {
    if tcp_flags == 0 {
        return;
    }
    let d = if reply { 1 } else { 0 };
    if c.flags_interval == interval {
        let cur = c.flags[d];
        if cur | tcp_flags != cur {
            c.flags[d] = cur | tcp_flags;
        }
        return;
    }
    // A new interval: the closed one's flags move to the second pair, if it was the last one.
    let (o, r) = if c.flags_interval.wrapping_add(1) == interval {
        (c.flags[0], c.flags[1])
    } else {
        (0, 0)
    };
    let mut flags = [0, 0, o, r];
    flags[d] = tcp_flags;
    c.flags = flags;
    c.flags_interval = interval;
}

/// Refreshes the flow of a packet that is being delivered: last seen, state, counters.
#[inline(always)]
pub fn refresh(hit: Hit, now: u64, tcp_flags: u8, size: Size, interval: u32) {
    refresh_on(hit, (now, this_cpu()), tcp_flags, size, interval)
}

/// [`refresh`] on CPU `cpu` ([`this_cpu`], as [`clock`] gives it).
#[inline(always)]
pub fn refresh_on(hit: Hit, (now, cpu): (u64, u64), tcp_flags: u8, size: Size, interval: u32) {
    let d = if hit.reply { 1 } else { 0 };
    // SAFETY: the pointer came from a lookup in this program run, and map values stay valid for
    // the whole run (RCU); the worst a concurrent update can do is interleave two refreshes of
    // the same flow. The counters are 8-byte aligned (`CtValue` is, and they sit at a multiple
    // of 8 in it), as the atomic operations need. The plain adds to `own_*[d]` are made only by
    // the CPU that claimed direction `d` (`cpu[d]`, written once, from 0, by compare-and-swap),
    // and the hooks run with bottom halves disabled, so two runs never nest on one CPU: no add
    // is lost. (A test run can be interrupted, but runs on maps of its own: `verse trace`.)
    unsafe {
        let entry = &mut (*hit.value).entry;
        let state = next_state(entry.state, hit.reply, tcp_flags);
        if state != entry.state {
            entry.state = state;
        }
        if entry.last_seen_ns != now {
            entry.last_seen_ns = now;
        }
        let c = core::ptr::addr_of_mut!((*hit.value).counters);
        let claimed = core::ptr::read_volatile(core::ptr::addr_of!((*c).cpu[d]));
        let own = claimed == cpu
            || (claimed == 0 && atomic::cmpxchg(core::ptr::addr_of_mut!((*c).cpu[d]), 0, cpu) == 0);
        if own {
            let packets = core::ptr::addr_of_mut!((*c).own_packets[d]);
            let bytes = core::ptr::addr_of_mut!((*c).own_bytes[d]);
            *packets = (*packets).wrapping_add(size.segs);
            *bytes = (*bytes).wrapping_add(size.bytes);
        } else {
            atomic::add(core::ptr::addr_of_mut!((*c).shared_packets[d]), size.segs);
            atomic::add(core::ptr::addr_of_mut!((*c).shared_bytes[d]), size.bytes);
        }
        or_flags(&mut *c, hit.reply, tcp_flags, interval);
    }
}

/// A conntrack table, named by its key type: `CtKey` for `VERSE_CT`, `Ct6Key` for `VERSE_CT6`
/// (`conntrack6`). Both hold the same values ([`CtValue`]), so what is done to a value (the
/// delivery cache, [`refresh_and_cache_in`]) is written once, for both.
pub trait Table {
    /// Stores `value` under this key, as `bpf_map_update_elem` with `flags` (`BPF_EXIST`,
    /// `BPF_NOEXIST`) does; false if it refused.
    fn insert(&self, value: &CtValue, flags: u64) -> bool;
}

impl Table for CtKey {
    #[inline(always)]
    fn insert(&self, value: &CtValue, flags: u64) -> bool {
        VERSE_CT.insert(self, value, flags).is_ok()
    }
}

/// [`refresh`], and caches `hop` for the packet's direction ([`refresh_and_cache_in`]); `key`
/// is the packet's own key.
#[inline(always)]
pub fn refresh_and_cache(
    hit: Hit,
    key: &CtKey,
    now: u64,
    tcp_flags: u8,
    size: Size,
    interval: u32,
    hop: CtHop,
) {
    let stored = if hit.reply { key.reversed() } else { *key };
    refresh_and_cache_in(hit, &stored, now, tcp_flags, size, interval, hop)
}

/// [`refresh`], and caches `hop` for the packet's direction: the whole value is replaced (see
/// the module doc), only if the entry still exists (`BPF_EXIST`: an entry the controller
/// deleted meanwhile is not brought back uncharged; the flow's next packet is judged as new).
/// `stored` is the key the hit's entry is stored under: the packet's own key, reversed for a
/// reply. A refresh racing with this one on another CPU may be lost, which costs at most one
/// packet's worth of idle time or state change, as interleaved refreshes already can.
#[inline(always)]
pub fn refresh_and_cache_in<K: Table>(
    hit: Hit,
    stored: &K,
    now: u64,
    tcp_flags: u8,
    size: Size,
    interval: u32,
    hop: CtHop,
) {
    let Some(scratch) = VERSE_CT_SCRATCH.get_ptr_mut(0) else {
        // Slot 0 of a per-CPU array always exists; without it, the hop is not cached.
        return refresh(hit, now, tcp_flags, size, interval);
    };
    // SAFETY: as in `refresh`; the value is copied into this CPU's scratch slot, which nothing
    // else uses until the insert below (see `VERSE_CT_SCRATCH`).
    let value = unsafe {
        copy_value(scratch, hit.value);
        &mut *scratch
    };
    value.entry.state = next_state(value.entry.state, hit.reply, tcp_flags);
    value.entry.last_seen_ns = now;
    // The copy is this CPU's alone until it replaces the value: plain adds to the half this
    // CPU counts in (claiming the direction if no CPU has).
    let d = if hit.reply { 1 } else { 0 };
    let c = &mut value.counters;
    let cpu = this_cpu();
    if c.cpu[d] == 0 {
        c.cpu[d] = cpu;
    }
    if c.cpu[d] == cpu {
        c.own_packets[d] = c.own_packets[d].wrapping_add(size.segs);
        c.own_bytes[d] = c.own_bytes[d].wrapping_add(size.bytes);
    } else {
        c.shared_packets[d] = c.shared_packets[d].wrapping_add(size.segs);
        c.shared_bytes[d] = c.shared_bytes[d].wrapping_add(size.bytes);
    }
    or_flags(&mut value.counters, hit.reply, tcp_flags, interval);
    if hit.reply {
        value.reply = hop;
    } else {
        value.original = hop;
    }
    stored.insert(value, BPF_EXIST);
}

/// The entry of a new flow: `src`/`dst` are the serials of the endpoints at the key's source and
/// destination, `owner` (`ct_owner::SRC` or `DST`) says which of them it is charged to, in slot
/// `owner_slot`; `original` is the delivery of its first direction (an empty hop for none);
/// `counters` count its first packet ([`first_counters`]). Built in this CPU's scratch slot
/// (`VERSE_CT_SCRATCH`), off the stack, for [`create`] to insert; if the slot cannot be had (a
/// per-CPU array always has it), the flow is refused like one over its budget.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn entry(
    now: u64,
    state: u8,
    src: u64,
    dst: u64,
    owner: u8,
    owner_slot: u32,
    original: CtHop,
    counters: CtCounters,
) -> Result<&'static CtValue, DropReason> {
    let scratch = VERSE_CT_SCRATCH.get_ptr_mut(0).ok_or(DropReason::ConntrackBudgetExceeded)?;
    // SAFETY: this CPU's scratch slot, which nothing else uses until the value is inserted (see
    // `VERSE_CT_SCRATCH`); map values live for the whole run.
    let value = unsafe { &mut *scratch };
    value.entry = CtEntry {
        last_seen_ns: now,
        src_serial: src,
        dst_serial: dst,
        owner_slot,
        state,
        owner,
        _pad: [0; 2],
    };
    value.original = original;
    // Field by field, so that no run of zeros becomes a `memset` call (see `store_zero_words`).
    // The scratch slot holds whatever was built there last: every field is written. A field
    // added to `CtHop` or `CtCounters` changes their size, which stops the build here until it
    // is written below too.
    const _: () =
        assert!(core::mem::size_of::<CtHop>() == 20 && core::mem::size_of::<CtCounters>() == 104);
    // SAFETY: fields of the scratch value (see above); `CtHop` is five 4-byte words, aligned.
    unsafe { store_zero_words(core::ptr::addr_of_mut!(value.reply).cast::<u32>(), 5) };
    let c = &mut value.counters;
    c.cpu = counters.cpu;
    c.own_packets = counters.own_packets;
    c.own_bytes = counters.own_bytes;
    c.flags_interval = counters.flags_interval;
    // SAFETY: as above; `flags` is 4 bytes at a multiple of 4, `shared_*` two u64 pairs.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!(c.flags).cast::<u32>(),
            u32::from_ne_bytes(counters.flags),
        );
        store_zero_words(core::ptr::addr_of_mut!(c.shared_packets).cast::<u32>(), 4);
        store_zero_words(core::ptr::addr_of_mut!(c.shared_bytes).cast::<u32>(), 4);
    }
    c.created_ns = counters.created_ns;
    c.rule_egress = counters.rule_egress;
    c.rule_ingress = counters.rule_ingress;
    Ok(value)
}

/// Zeroes `words` 4-byte words at `p`, each with its own store. Why not a plain assignment of
/// zeros: LLVM merges a run of zero stores into a call of `memset`, which on the BPF target is a
/// BPF-to-BPF call to a loop that stores a byte per iteration (five instructions a byte);
/// volatile stores are never merged.
///
/// # Safety
/// `p` must be valid for writes of `words` aligned u32s.
#[inline(always)]
pub(crate) unsafe fn store_zero_words(p: *mut u32, words: usize) {
    for i in 0..words {
        // SAFETY: the caller guarantees `p` for `words` words.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
}

/// Copies the conntrack value at `src` to `dst` eight bytes at a time. Why not `*dst = *src`:
/// LLVM lowers a 176-byte copy to a call of `memmove`, a BPF-to-BPF call to a loop that copies a
/// byte per iteration; volatile word loads and stores are never merged into such a call.
///
/// # Safety
/// `src` and `dst` must be valid, non-overlapping map values (8-byte aligned, as `CtValue` is).
#[inline(always)]
unsafe fn copy_value(dst: *mut CtValue, src: *const CtValue) {
    const WORDS: usize = core::mem::size_of::<CtValue>() / 8;
    const _: () =
        assert!(core::mem::size_of::<CtValue>() % 8 == 0 && core::mem::align_of::<CtValue>() == 8);
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..WORDS {
        // SAFETY: the caller guarantees both values; `i` stays inside them.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
    }
}

/// A new flow's parties, as the hook that admits its first packet knows them.
pub struct NewFlow {
    /// Serials of the endpoints at the key's source and destination.
    pub src: u64,
    pub dst: u64,
    /// `ct_owner::SRC` or `DST`: which of them it is charged to, in slot `owner_slot`.
    pub owner: u8,
    pub owner_slot: u32,
    /// The delivery of its first direction (an empty hop for none).
    pub hop: CtHop,
    /// The rules that admitted it on this host (0: not judged here).
    pub rule_egress: u32,
    pub rule_ingress: u32,
}

/// Records the flow the packet `ip`/`l4` begins ([`creates`]) under `key`: the entry in its
/// initial state, counting this first packet ([`entry`], [`first_counters`]), made as
/// [`create`] says. The entry under `key` (whatever its state: the new flow replaces it or
/// leaves it) is looked up again here rather than kept from [`lookup`]: kept across the
/// new-flow path's map lookups, that pointer and whether there was one were stored to the
/// stack on every packet, and the established path's hit, the same pointer, copied to a slot
/// of its own (ten instructions of that path). A new flow pays a second hash lookup of its
/// key; what it finds is as current as the first (only the controller deletes entries, and
/// `create` handles an entry deleted meanwhile).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn open(
    ctx: &TcContext,
    key: &CtKey,
    now: u64,
    ip: &crate::flow::Ipv4,
    l4: &crate::flow::L4,
    interval: u32,
    flow: &NewFlow,
) -> Result<(), DropReason> {
    let counters = first_counters(
        now,
        size(ctx, ip, l4),
        l4.tcp_flags,
        flow.rule_egress,
        flow.rule_ingress,
        interval,
    );
    let value = entry(
        now,
        initial_state(ip.proto),
        flow.src,
        flow.dst,
        flow.owner,
        flow.owner_slot,
        flow.hop,
        counters,
    )?;
    create(key, VERSE_CT.get_ptr_mut(key), value)
}

/// Records a new flow allowed by policy (S14):
/// - an entry of the same owner already under `key` (`own`, as looked up under `key`: expired,
///   or made for an endpoint since deleted) is replaced, at no charge: it was charged when it
///   was made;
/// - an entry of another owner under `key` is left alone (only the controller deletes entries,
///   and this can only be one of a deleted endpoint, which it is about to delete): the packet
///   goes on untracked, and its replies are judged by policy;
/// - otherwise the owner's `used` is incremented first, and if it had already reached the
///   owner's budget the flow is refused (`ConntrackBudgetExceeded`, counted in the owner's
///   `exceeded` too); an insert that fails (the same flow made meanwhile on another CPU) gives
///   the charge back.
#[inline(always)]
pub(crate) fn create<K: Table>(
    key: &K,
    own: Option<*mut CtValue>,
    value: &CtValue,
) -> Result<(), DropReason> {
    let e = &value.entry;
    if let Some(old) = own {
        // SAFETY: the pointer came from a lookup in this program run (RCU); the fields are
        // copied out, and a concurrent replacement can only make this check moot, not unsafe.
        let (slot, serial) = unsafe { ((*old).entry.owner_slot, (*old).entry.owner_serial()) };
        if slot != e.owner_slot || serial != e.owner_serial() {
            return Ok(());
        }
        if key.insert(value, BPF_EXIST) {
            return Ok(());
        }
        // Deleted by the controller meanwhile: a fresh insert, charged, below.
    }
    let owner =
        VERSE_CT_OWNERS.get_ptr_mut(e.owner_slot).ok_or(DropReason::ConntrackBudgetExceeded)?;
    // SAFETY: `owner` points at a live value of VERSE_CT_OWNERS (an array: values are never
    // freed), 8-byte aligned like every field of `CtOwner`.
    unsafe {
        let used = core::ptr::addr_of_mut!((*owner).used);
        let before = atomic::fetch_add(used, 1);
        if before >= core::ptr::read_volatile(core::ptr::addr_of!((*owner).budget)) {
            atomic::add(used, u64::MAX);
            atomic::add(core::ptr::addr_of_mut!((*owner).exceeded), 1);
            return Err(DropReason::ConntrackBudgetExceeded);
        }
        if !key.insert(value, BPF_NOEXIST) {
            atomic::add(used, u64::MAX);
        }
    }
    Ok(())
}
