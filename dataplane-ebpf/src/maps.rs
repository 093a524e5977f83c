//! Every map of the dataplane, pinned by name under the daemon's bpffs directory so that a
//! restarted `versed` reuses them (the controller's loader sets the directory). Names, sizes and
//! layouts come from `dataplane_common`; the statics are named exactly like
//! `dataplane_common::map_names` because the ELF symbol is the map name.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf},
};
use dataplane_common::{
    capacity, jump, Cidr6Key, CidrKey, Config, Ct6Key, CtKey, CtOwner, CtValue, DropCount,
    Endpoint, EventLimiter, Hook, HostKey, PolicyKey, PolicyValue, Route, Route6Key, RouteKey,
    VniKey, MAP_F_MMAPABLE,
};

/// Host-side veth ifindex -> the endpoint behind it, for ifindexes below
/// `capacity::ENDPOINT_SLOTS`: an array, whose lookups the verifier inlines (a few instructions
/// instead of a hash). A slot with `vni == 0` is empty.
#[map]
pub static VERSE_EP_SLOTS: Array<Endpoint> = Array::pinned(capacity::ENDPOINT_SLOTS, 0);

/// Host-side veth ifindex -> the endpoint behind it, for ifindexes that have no slot in
/// `VERSE_EP_SLOTS` (ifindexes are allocated cyclically and can grow past any bound).
#[map]
pub static VERSE_ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// (universe, address) -> where that endpoint lives.
#[map]
pub static VERSE_ROUTES: HashMap<RouteKey, Route> = HashMap::pinned(capacity::ROUTES, 0);

/// (universe, address) longest match -> CIDR class peer value (`peer::CIDR_FLAG | n`).
/// `LpmTrie::pinned` adds `BPF_F_NO_PREALLOC`, which the kernel requires for LPM tries.
#[map]
pub static VERSE_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

/// The programs the hooks tail-call (`dataplane_common::jump`: `from_endpoint6`, `nd6`,
/// `from_underlay6`), filled by every load; pinned, so that they outlive the daemon as the
/// links do.
#[map]
pub static VERSE_JUMP: ProgramArray = ProgramArray::pinned(jump::SLOTS, 0);

/// Where the IPv6 programs build their conntrack and route keys, off their stack (the verifier
/// allows 512 bytes for a program and the calls it makes together). One slot per CPU, as
/// `VERSE_CT_SCRATCH`.
#[map]
pub static VERSE_SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// `VERSE_SCRATCH6`'s value: a packet's IPv6 conntrack key, its reverse, its route key, and
/// the keys of the flow an ICMPv6 error quotes.
#[repr(C)]
pub struct Scratch6 {
    pub key: Ct6Key,
    pub rev: Ct6Key,
    pub route: Route6Key,
    /// The flow an ICMPv6 error quotes, and its reverse.
    pub quoted: Ct6Key,
    pub quoted_rev: Ct6Key,
    /// The target of a neighbour solicitation.
    pub target: [u8; 16],
    /// An ICMPv6 error whose relation to a flow is asked (`endpoint6::related`).
    pub related: Related6,
}

/// An ICMPv6 error as `endpoint6::related` needs it: its addresses, the serials of its sender
/// and receiver, the conntrack clock, where its IPv6 header is in the frame, its universe.
#[repr(C)]
pub struct Related6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sender: u64,
    pub receiver: u64,
    pub now: u64,
    pub ip_off: usize,
    pub vni: u32,
}

/// (universe, IPv6 address) -> where that endpoint lives (the same value as its IPv4 route).
#[map]
pub static VERSE_ROUTES6: HashMap<Route6Key, Route> = HashMap::pinned(capacity::ROUTES6, 0);

/// (universe, IPv6 address) longest match -> IPv6 CIDR class peer value.
#[map]
pub static VERSE_CIDRS6: LpmTrie<Cidr6Key, u32> = LpmTrie::pinned(capacity::CIDRS6, 0);

/// Every policy of the host; the presence of a matching prefix allows, and the value names the
/// rule that produced it.
#[map]
pub static VERSE_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

/// Which kinds of peer each identity's policy entries name (`dataplane_common::peer_kind`).
#[map]
pub static VERSE_POLICY_KINDS: Array<u32> = Array::pinned(capacity::POLICY_KINDS, 0);

/// Connection tracking, keyed by the flow's original direction. A plain, preallocated hash: the
/// kernel never evicts an entry to make room for another (an LRU would let one endpoint's flood
/// push out everyone's flows). Room is shared out instead: every entry is charged to its owner's
/// budget in `VERSE_CT_OWNERS`, the budgets of a host's endpoints add up to at most this
/// capacity (the controller refuses more), and the controller deletes expired entries and those
/// of deleted endpoints (see `conntrack`).
#[map]
pub static VERSE_CT: HashMap<CtKey, CtValue> = HashMap::pinned(capacity::CONNTRACK, 0);

/// Connection tracking of IPv6 flows: `VERSE_CT`'s twin with 16-byte addresses in its key, a
/// map of its own so that IPv4's key and hashing stay as they are. Its entries are charged to
/// the same budgets (`VERSE_CT_OWNERS`) and collected by the controller like `VERSE_CT`'s.
#[map]
pub static VERSE_CT6: HashMap<Ct6Key, CtValue> = HashMap::pinned(capacity::CONNTRACK6, 0);

/// `Endpoint::slot` -> that endpoint's conntrack budget and usage (S14). Mapped into the
/// controller's memory (`BPF_F_MMAPABLE`), which subtracts from `used` with the same atomic
/// instructions the programs add with.
#[map]
pub static VERSE_CT_OWNERS: Array<CtOwner> = Array::pinned(capacity::CT_OWNERS, MAP_F_MMAPABLE);

/// One slot per CPU: the conntrack clock's copy (see `conntrack::now`). Not pinned: it is a
/// cache of the kernel's clock, meaningless to another load.
#[map]
pub static VERSE_CLOCK: PerCpuArray<Clock> = PerCpuArray::with_max_entries(1, 0);

/// `jiffies` and the coarse clock read at that jiffy, and the CPU whose copy this is (as
/// `CtCounters::cpu` names it: its number plus one; 0 until `conntrack::clock` first fills it).
#[repr(C)]
pub struct Clock {
    pub jiffies: u64,
    pub ns: u64,
    pub cpu: u64,
}

/// Where a conntrack value is built before it is inserted (a new flow's, or an entry copied to
/// cache a hop): 128 bytes the hooks' 512-byte stack cannot spare. One slot per CPU: TC programs
/// run with bottom halves disabled, so no other run of ours takes the CPU between the build and
/// the insert.
#[map]
pub static VERSE_CT_SCRATCH: PerCpuArray<CtValue> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the settings the controller writes at start, and the route epoch (`Config::epoch`).
/// Mappable (`BPF_F_MMAPABLE`): the controller moves the epoch on with one atomic store through
/// its mapping.
#[map]
pub static VERSE_CONFIG: Array<Config> = Array::pinned(1, MAP_F_MMAPABLE);

/// Drop counters, indexed by `dataplane_common::drop_slot` (reason and hook), one per CPU (no
/// atomics on the hot path).
#[map]
pub static VERSE_DROPS: PerCpuArray<DropCount> =
    PerCpuArray::pinned(capacity::DROPS * Hook::COUNT, 0);

/// Verdict events for the daemon (see `events`). Not pinned: a restarted daemon makes a new one
/// with its programs; what the old one held when no daemon read it is gone.
#[map]
pub static VERSE_EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS, 0);

/// New flows admitted per rule, per CPU, at the rule's slot (`PolicyValue::slot`, see
/// `dataplane_common::rule_slots`); the controller zeroes a slot before handing it to a rule,
/// the kernel only adds. An array: its lookup is inlined and never allocates.
#[map]
pub static VERSE_RULE_HITS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::RULE_HITS, 0);

/// Slot 0, per CPU: the token buckets of the events and what became of them (see `events`).
#[map]
pub static VERSE_EV_LIMITS: PerCpuArray<EventLimiter> = PerCpuArray::pinned(1, 0);

/// Underlay address of every other host of the fleet -> host number. Encapsulated traffic from
/// any other address is dropped (S10).
#[map]
pub static VERSE_HOSTS: HashMap<HostKey, u32> = HashMap::pinned(capacity::HOSTS, 0);

/// The VNI of every universe of the fleet (value unused, 1).
#[map]
pub static VERSE_VNIS: HashMap<VniKey, u8> = HashMap::pinned(capacity::VNIS, 0);
