//! Every map of the dataplane, pinned by name under the daemon's bpffs directory so that a
//! restarted `versed` reuses them (the controller's loader sets the directory). Names, sizes and
//! layouts come from `dataplane_common`; the statics are named exactly like
//! `dataplane_common::map_names` because the ELF symbol is the map name.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    capacity, CidrKey, Config, CtEntry, CtKey, Endpoint, HostKey, PolicyKey, Route, RouteKey,
    VniKey,
};

/// Host-side veth ifindex -> the endpoint behind it.
#[map]
pub static VERSE_ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// (universe, address) -> where that endpoint lives.
#[map]
pub static VERSE_ROUTES: HashMap<RouteKey, Route> = HashMap::pinned(capacity::ROUTES, 0);

/// (universe, address) longest match -> CIDR class peer value (`peer::CIDR_FLAG | n`).
/// `LpmTrie::pinned` adds `BPF_F_NO_PREALLOC`, which the kernel requires for LPM tries.
#[map]
pub static VERSE_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

/// Every policy of the host; the presence of a matching prefix allows. The value is unused
/// (the controller writes 1).
#[map]
pub static VERSE_POLICY: LpmTrie<PolicyKey, u8> = LpmTrie::pinned(capacity::POLICY, 0);

/// Connection tracking, keyed by the flow's original direction. LRU: when full, the least
/// recently used flows go first; a flow evicted that way is judged again by policy (S11: a full
/// map never opens a hole).
#[map]
pub static VERSE_CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

/// Slot 0: the settings the controller writes at start.
#[map]
pub static VERSE_CONFIG: Array<Config> = Array::pinned(1, 0);

/// Drop counters, indexed by `DropReason` code, one per CPU (no atomics on the hot path).
#[map]
pub static VERSE_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::DROPS, 0);

/// Underlay address of every other host of the fleet -> host number. Encapsulated traffic from
/// any other address is dropped (S10).
#[map]
pub static VERSE_HOSTS: HashMap<HostKey, u32> = HashMap::pinned(capacity::HOSTS, 0);

/// The VNI of every universe of the fleet (value unused, 1).
#[map]
pub static VERSE_VNIS: HashMap<VniKey, u8> = HashMap::pinned(capacity::VNIS, 0);
