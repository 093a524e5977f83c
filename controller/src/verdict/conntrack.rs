//! Connection tracking (S6, S7, S9, S14), the one description of it: the model's table
//! ([`Conntrack`]) is keyed exactly like `VERSE_CT` (`dataplane_common::CtKey`, built by
//! `CtKey::new`) and shared by both hooks as the map is; `dataplane-ebpf/src/conntrack.rs`
//! implements it. One entry per flow, keyed in the flow's original direction; a packet looks up
//! its own key, then the reverse. An entry idle for at least the timeout of its state (S9,
//! [`Timeouts`]) is a miss. Lookups touch nothing: only a packet that is sent refreshes its flow.
//!
//! Binding (S7): an entry records the serials of the flow's two endpoints (`CtEntry::src_serial`,
//! `dst_serial`), and matches a packet only if its sender is the endpoint of its side of the flow
//! and its receiver the other. An endpoint made later with the same address, in the same or a
//! re-created universe, therefore never inherits a flow: its packets are judged by policy as new
//! flows.
//!
//! Budgets (S14): every entry is charged to its owner (the sending endpoint for flows made by
//! `from_endpoint`, the local receiver for flows made by `from_underlay`). A new flow is refused
//! (`ConntrackBudgetExceeded`) when its owner already owns as many entries as its budget; an
//! entry of the same owner already under the key (expired, or bound to an endpoint since
//! deleted) is replaced at no charge; an entry of another owner there leaves the new flow
//! untracked. Only the controller's garbage collection deletes entries ([`is_garbage`]: expired,
//! or an endpoint deleted), so nothing is ever evicted for room.
//!
//! Direction (S7): what a packet may do is its [`Role`], read from its header alone. Only a
//! packet that can begin a flow creates one ([`creates`]), in its own direction: a TCP SYN
//! (without ACK, RST or FIN), an ICMP echo request, or any UDP or other-protocol packet. A TCP
//! segment without SYN continues a tracked flow either way but never creates one (Linux
//! conntrack with `nf_conntrack_tcp_loose = 0`); a SYN or an echo request matches a flow only in
//! its original direction (in the reply direction it is no hit: it is judged as the new packet
//! it is); an echo reply matches only in the reply direction and never creates. Other ICMP
//! messages are never tracked: an error is related to a flow ([`is_error`], `Host::related`) or
//! judged by the rules, each time (S6).
//!
//! States ([`initial_state`], [`next_state`]): TCP is opening until a SYN-ACK is seen in the
//! reply direction, then established; FIN or RST in either direction moves it to closing, and a
//! SYN without ACK in the original direction reopens a closing flow (the 5-tuple reused, as
//! Linux conntrack does from CLOSE/TIME_WAIT). UDP is one-way until a reply, then replied. ICMP
//! echo and other protocols have one state each.
//!
//! The pure decisions ([`role`], [`creates`], the states, expiry, [`is_error`]) are the very
//! functions the kernel programs call: `dataplane_common::conntrack`, written once.

use super::*;
use dataplane_common::conntrack::expired;
pub use dataplane_common::conntrack::{creates, initial_state, is_error, next_state, role, Role};
use dataplane_common::Ct6Key;

/// Idle timeouts by `ct_state` (S9), nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub ns: [u64; ct_state::COUNT],
}

impl Default for Timeouts {
    /// S9 defaults.
    fn default() -> Self {
        Timeouts { ns: ct_state::DEFAULT_TIMEOUT_SECS.map(|secs| secs * 1_000_000_000) }
    }
}

impl Timeouts {
    pub fn from_config(config: &Config) -> Timeouts {
        Timeouts { ns: config.timeouts_ns }
    }

    /// The timeout of `state`; an unknown state gets 0, i.e. it is expired at once (fail
    /// closed: an entry the model does not understand admits nothing).
    pub fn of(&self, state: u8) -> u64 {
        self.ns.get(usize::from(state)).copied().unwrap_or(0)
    }

    /// Whether `entry` has been idle for at least its state's timeout at `now_ns`, as in the
    /// kernel, whose clock advances by ticks (a timeout of 0 expires an entry of the same tick).
    /// Saturating like the kernel: an entry stamped after `now_ns` (refreshed on another CPU
    /// after the clock was read) is fresh.
    pub fn expired(&self, entry: &CtEntry, now_ns: u64) -> bool {
        expired(entry.state, entry.last_seen_ns, now_ns, &self.ns)
    }
}

/// Whether the controller's garbage collection deletes `entry` at `now_ns`: it has expired, or
/// one of its endpoints is no longer one `live` knows (by serial: deleted, S7). The daemon runs
/// this very predicate over the kernel's map (`reconcile`).
pub fn is_garbage(
    entry: &CtEntry,
    now_ns: u64,
    timeouts: &Timeouts,
    live: &dyn Fn(u64) -> bool,
) -> bool {
    timeouts.expired(entry, now_ns) || !live(entry.src_serial) || !live(entry.dst_serial)
}

/// Which way a conntrack hit matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDirection {
    /// The packet's own key is stored: it goes the way the flow was first seen.
    Original,
    /// The reversed key is stored: this is a reply.
    Reply,
}

/// A write to a conntrack table (insert or overwrite), of either family's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtWrite<K> {
    pub key: K,
    pub entry: CtEntry,
}

/// A write to the IPv4 table (`VERSE_CT`).
pub type CtUpdate = CtWrite<CtKey>;

/// A write to the IPv6 table (`VERSE_CT6`).
pub type CtUpdate6 = CtWrite<Ct6Key>;

/// The model's conntrack table, keyed exactly like `VERSE_CT`. Entries stay, expired or not,
/// until [`Conntrack::collect`] removes them (the kernel map is no LRU: nothing is evicted). An
/// owner's budget use is the number of entries charged to its slot, which is what the kernel's
/// counter holds, since only the controller deletes entries and subtracts as it does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub entries: HashMap<CtKey, CtEntry>,
    /// IPv6 flows (`VERSE_CT6`): the same entries under keys with IPv6 addresses, charged to
    /// the same budgets.
    pub entries6: HashMap<Ct6Key, CtEntry>,
}

/// A live entry bound to the sender: the stored key, the entry, the direction of the packet.
pub type CtHit = (CtKey, CtEntry, CtDirection);

/// What a lookup found under a key of either family: a live entry bound to the sender (see
/// [`CtHit`]), and the entry stored under the packet's own key, whatever it is.
pub type Found<K> = (Option<(K, CtEntry, CtDirection)>, Option<CtEntry>);

/// A conntrack key, of either family: the table it is looked up in.
pub trait TableKey: Copy + Eq + std::hash::Hash {
    fn table(ct: &Conntrack) -> &HashMap<Self, CtEntry>;

    /// The key of the flow's other direction.
    fn reverse(&self) -> Self;

    /// The flow's universe.
    fn vni(&self) -> u32;
}

impl TableKey for CtKey {
    fn table(ct: &Conntrack) -> &HashMap<CtKey, CtEntry> {
        &ct.entries
    }

    fn reverse(&self) -> CtKey {
        self.reversed()
    }

    fn vni(&self) -> u32 {
        CtKey::vni(self)
    }
}

impl TableKey for Ct6Key {
    fn table(ct: &Conntrack) -> &HashMap<Ct6Key, CtEntry> {
        &ct.entries6
    }

    fn reverse(&self) -> Ct6Key {
        self.reversed()
    }

    fn vni(&self) -> u32 {
        self.vni
    }
}

impl Conntrack {
    /// The packet's key first, then its reverse: the first entry that is live and whose
    /// endpoint on the sender's side is `sender` (a serial). Also the entry stored under the
    /// packet's own key, whatever it is (see `endpoint.rs`, step 14). A packet of any role.
    pub fn lookup<K: TableKey>(&self, key: &K, sender: u64, now_ns: u64, t: &Timeouts) -> Found<K> {
        self.lookup_as(key, Role::Any, sender, now_ns, t)
    }

    /// [`Conntrack::lookup`], each way only if a packet of `role` may match that way: the
    /// packet's own key unless it only answers, its reverse unless it only opens, nothing for
    /// an untracked message (whose own key does not matter either: it never creates a flow).
    pub fn lookup_as<K: TableKey>(
        &self,
        key: &K,
        role: Role,
        sender: u64,
        now_ns: u64,
        t: &Timeouts,
    ) -> Found<K> {
        if role == Role::Untracked {
            return (None, None);
        }
        let table = K::table(self);
        let own = table.get(key).copied();
        if role != Role::Answers {
            if let Some(e) = own.filter(|e| e.src_serial == sender && !t.expired(e, now_ns)) {
                return (Some((*key, e, CtDirection::Original)), own);
            }
        }
        if role == Role::Opens {
            return (None, own);
        }
        let rev = key.reverse();
        let reply = table.get(&rev).filter(|e| e.dst_serial == sender && !t.expired(e, now_ns));
        (reply.map(|e| (rev, *e, CtDirection::Reply)), own)
    }

    pub fn apply(&mut self, update: &CtUpdate) {
        self.entries.insert(update.key, update.entry);
    }

    pub fn apply6(&mut self, update: &CtUpdate6) {
        self.entries6.insert(update.key, update.entry);
    }

    /// Entries charged to `slot`, in both tables.
    pub fn used(&self, slot: u32) -> u64 {
        let charged = |e: &&CtEntry| e.owner_slot == slot;
        (self.entries.values().filter(charged).count()
            + self.entries6.values().filter(charged).count()) as u64
    }

    /// Garbage collection, as the controller runs it ([`is_garbage`]): removes expired entries
    /// and those of endpoints `live` does not know; returns how many went.
    pub fn collect(&mut self, now_ns: u64, t: &Timeouts, live: &dyn Fn(u64) -> bool) -> usize {
        let before = self.entries.len() + self.entries6.len();
        self.entries.retain(|_, e| !is_garbage(e, now_ns, t, live));
        self.entries6.retain(|_, e| !is_garbage(e, now_ns, t, live));
        before - self.entries.len() - self.entries6.len()
    }
}

/// The serial the receiver of a packet must have for a hit in direction `dir` on `entry`.
pub(super) fn receiver_serial(entry: &CtEntry, dir: CtDirection) -> u64 {
    match dir {
        CtDirection::Original => entry.dst_serial,
        CtDirection::Reply => entry.src_serial,
    }
}

/// The conntrack write of a new flow `entry` under `key` (`endpoint.rs` step 14, `underlay.rs`
/// step 9; S14), where `own` is what the table holds under that key: an entry of the same owner
/// (expired, or bound to an endpoint since deleted) is replaced at no charge; an entry of another
/// owner is left for the collector and the flow goes untracked (`None`); otherwise the flow is
/// charged to its owner, and refused (`ConntrackBudgetExceeded`) when the owner already holds
/// `budget` entries.
/// `own` and the budget `used` are the table's and the owner's whichever the family: the two
/// tables charge the same budget.
pub(super) fn create<K>(
    ct: &Conntrack,
    key: K,
    own: Option<CtEntry>,
    entry: CtEntry,
    budget: u32,
) -> Result<Option<CtWrite<K>>, DropReason> {
    match own {
        Some(old)
            if old.owner_slot == entry.owner_slot && old.owner_serial() == entry.owner_serial() =>
        {
            Ok(Some(CtWrite { key, entry }))
        }
        Some(_) => Ok(None),
        None if ct.used(entry.owner_slot) >= u64::from(budget) => {
            Err(DropReason::ConntrackBudgetExceeded)
        }
        None => Ok(Some(CtWrite { key, entry })),
    }
}
