//! The userland side of the eBPF dataplane: loading the embedded object with its maps pinned
//! under the daemon's own bpffs directory, attaching `from_endpoint` to endpoint veths and
//! `from_underlay` to the underlay interface (TCX ingress, links pinned), reading and writing
//! the maps, and running the programs through `BPF_PROG_TEST_RUN` for tests and benchmarks.
//!
//! Contract:
//! - State survives the daemon. [`Dataplane::load`] reuses every map already pinned under the
//!   directory, once it has checked that the pin has this build's layout (else
//!   [`Error::PinnedLayout`] names it), and never clears one; links pinned under `<dir>/links/<iface>` stay attached when
//!   the daemon exits (the underlay's under `<dir>/underlay/<iface>`, apart, so that the
//!   reconciler's sweep of stale endpoint links never touches it). [`Dataplane::attach_endpoint`]
//!   and [`Dataplane::attach_underlay`] on an interface whose pinned link is live swap the
//!   program in the link atomically (`BPF_LINK_UPDATE`): there is no moment without enforcement.
//! - [`Dataplane::apply`] writes only the difference between two [`MapContents`] states, adds and
//!   changes before removals (hosts, universes, policy and CIDR classes first, then routes, then
//!   endpoints; then removals in the reverse order), so every packet during an edit is judged by
//!   the old or the new rules, never by a state that has lost an allow both of them have.
//! - Conntrack entries are only ever deleted through [`Dataplane::collect_conntrack`], which
//!   keeps each endpoint's budget counter exact (see [`crate::conntrack`]).
//! - Nothing here panics on kernel answers; every failure is an [`Error`] naming the call and the
//!   object.
use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
        RingBuf,
    },
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfError, EbpfLoader, TestRun, TestRunOptions,
};
use dataplane_common::{
    capacity, drop_slot, jump, map_names, Cidr6Key, CidrKey, Config, Ct6Key, CtEntry, CtKey,
    CtOwner, CtValue, DropCount, DropReason, Endpoint, EventLimiter, Hook, HostKey, PolicyKey,
    PolicyValue, Route, Route6Key, RouteKey, VniKey, PROG_FROM_ENDPOINT, PROG_FROM_ENDPOINT6,
    PROG_FROM_UNDERLAY, PROG_FROM_UNDERLAY6, PROG_ND6,
};

use crate::compile::{policy_kinds_after, policy_kinds_before, MapContents, OwnerBudget};
use crate::conntrack::{self, Collected, FlowKey, Owners};
use crate::mapping::Mapped;

/// The dataplane object built by `controller/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VERSE_DATAPLANE_OBJECT"));

/// Name of the do-nothing classifier in the object, the benchmarks' baseline.
pub const PROG_EMPTY: &str = "empty";
/// Benchmark probe: the IPv4/L4 parse alone (never attached).
pub const PROG_PARSE_ONLY: &str = "parse_only";

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Value written for every `VERSE_VNIS` entry: the program only tests presence.
const VNI_PRESENT: u8 = 1;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `statfs` on the bpffs directory failed (other than "does not exist").
    #[error("statfs({path}) failed: {source}")]
    Statfs { path: PathBuf, source: io::Error },
    /// Creating the bpffs directory (or its `links` subdirectory) failed.
    #[error("creating directory {path} failed: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    /// `mount -t bpf` on the directory failed.
    #[error("mount(bpf, {path}) failed: {source}")]
    Mount { path: PathBuf, source: io::Error },
    /// Loading the object (creating or opening the pinned maps) failed.
    #[error("loading the dataplane object with maps pinned under {dir} failed: {source}")]
    LoadObject { dir: PathBuf, source: Box<EbpfError> },
    /// The object lacks a program this module needs.
    #[error("the dataplane object has no program {0}")]
    MissingProgram(&'static str),
    /// A program is not a TC classifier.
    #[error("program {name} is not a TC classifier: {source}")]
    ProgramType { name: &'static str, source: ProgramError },
    /// The verifier (or the kernel) refused a program.
    #[error("loading program {name} into the kernel failed: {source}")]
    LoadProgram { name: &'static str, source: ProgramError },
    /// Reading a program's kernel info failed.
    #[error("reading the kernel info of program {name} failed: {source}")]
    ProgramInfo { name: &'static str, source: ProgramError },
    /// The object lacks a map this module needs.
    #[error("the dataplane object has no map {0}")]
    MissingMap(&'static str),
    /// A map pinned by an earlier build has another type, key or value size, capacity or flags
    /// than this build's map of that name: loading would reuse it as it is (the kernel checks
    /// nothing on reuse), so it is refused here instead, naming the map and its pin.
    #[error(
        "map {name} pinned at {path} was made by another version of versed ({pinned}; this \
         version needs {expected}): remove that pin to upgrade (README, \"Using it\"), \
         and versed makes the map anew, empty"
    )]
    PinnedLayout { name: String, path: PathBuf, pinned: String, expected: String },
    /// Opening a pinned map to check its layout failed.
    #[error("inspecting the pinned map {path} failed: {}", Chain(.source))]
    InspectPin { path: PathBuf, source: MapError },
    /// The embedded object does not parse (a broken build).
    #[error("parsing the dataplane object failed: {0}")]
    ParseObject(String),
    /// A map has another type or key/value size than `dataplane_common` says.
    #[error("map {name} does not have the expected type and layout: {}", Chain(.source))]
    MapType { name: &'static str, source: MapError },
    /// Reading (iterating or looking up) a map failed.
    #[error("reading map {name} failed: {}", Chain(.source))]
    MapRead { name: &'static str, source: MapError },
    /// Inserting or updating an entry failed (a full map, for example).
    #[error("writing {entry} into map {name} failed: {}", Chain(.source))]
    MapWrite { name: &'static str, entry: String, source: MapError },
    /// Deleting an entry failed.
    #[error("deleting {entry} from map {name} failed: {}", Chain(.source))]
    MapDelete { name: &'static str, entry: String, source: MapError },
    /// The interface name does not resolve to an ifindex in this network namespace.
    #[error("interface {iface} not found (if_nametoindex): {source}")]
    Interface { iface: String, source: io::Error },
    /// Attaching (TCX ingress) failed.
    #[error("attaching {program} to {iface} (TCX ingress) failed: {source}")]
    Attach { program: &'static str, iface: String, source: ProgramError },
    /// Converting the new link into a pinnable link failed.
    #[error("taking the TCX link of {iface} failed: {source}")]
    TakeLink { iface: String, source: LinkError },
    /// Pinning the link failed.
    #[error("pinning the TCX link of {iface} at {path} failed: {source}")]
    PinLink { iface: String, path: PathBuf, source: aya::pin::PinError },
    /// Opening or inspecting a pinned link failed.
    #[error("inspecting the pinned link {path} failed ({call}): {source}")]
    InspectLink { path: PathBuf, call: &'static str, source: io::Error },
    /// Opening a pinned link through aya failed.
    #[error("opening the pinned link {path} failed: {source}")]
    OpenLink { path: PathBuf, source: LinkError },
    /// Swapping the program of a live link failed.
    #[error("replacing the program of the TCX link of {iface} (BPF_LINK_UPDATE) failed: {source}")]
    UpdateLink { iface: String, source: ProgramError },
    /// Removing a pinned link file failed.
    #[error("removing the pinned link {path} failed: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    /// Mapping a map into this process's memory failed.
    #[error("mmap of map {name} failed: {source}")]
    Mmap { name: &'static str, source: io::Error },
    /// A conntrack table operation the maps module of aya does not offer failed.
    #[error("{call} on map {name} failed: {source}")]
    Conntrack { call: &'static str, name: &'static str, source: io::Error },
    /// A slot of `VERSE_CT_OWNERS` beyond the array.
    #[error("slot {slot} is beyond map {name}")]
    NoSlot { name: &'static str, slot: u32 },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("BPF_PROG_TEST_RUN of {name} failed: {source}")]
    TestRun { name: &'static str, source: ProgramError },
    /// A test-run input is unusable.
    #[error("invalid test-run input: {0}")]
    TestInput(String),
}

/// Runs a map write again while the kernel answers ENOMEM, for up to 2 s (pausing 100 µs, then
/// twice as long each time, at most 20 ms).
///
/// Maps that are not preallocated (the LPM tries `VERSE_CIDRS` and `VERSE_POLICY`) take their
/// elements from the kernel's BPF memory allocator, whose per-CPU caches are refilled
/// asynchronously (irq_work): a burst of writes from one thread, such as the 1.1 million policy
/// entries of 100,000 rules, can find the cache empty and get ENOMEM while memory is plentiful,
/// and the same write succeeds a moment later. Seen on the 2-core VM under load: the micro
/// benchmark's apply of 1,000 rules failed with ENOMEM at its 26th rule counter (then a hash).
/// Memory that is really exhausted still fails, 2 s later.
fn patient<T>(mut write: impl FnMut() -> Result<T, MapError>) -> Result<T, MapError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut pause = std::time::Duration::from_micros(100);
    loop {
        match write() {
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOMEM)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// An error and every error under it, joined by `: `. aya's `MapError` names the call that
/// failed and keeps what the kernel said (ENOMEM, E2BIG, ...) as its source, which its own text
/// leaves out: without this, a log line or a message built from the text of a map error read
/// "`bpf_map_update_elem` failed" and nothing about why.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return code (`TC_ACT_*`: 0 ok, 2 shot, 7 redirect).
    pub return_code: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean duration of one run in nanoseconds, as measured by the kernel.
    pub duration_ns: u64,
}

/// What a pool run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolRunOutput {
    /// Number of program runs.
    pub runs: u64,
    /// Mean kernel-measured nanoseconds per packet.
    pub mean_ns: f64,
    /// How many runs returned each return code.
    pub return_codes: BTreeMap<u32, u64>,
}

/// Size and verifier cost of a loaded program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// Instructions the verifier processed (all paths; kernel >= 5.16).
    pub verified_instructions: Option<u32>,
    /// Size of the program after the verifier's rewrites (8 bytes an instruction).
    pub translated_bytes: Option<u32>,
    /// Size of the JIT-compiled code.
    pub jitted_bytes: u32,
}

/// `TC_ACT_*` return codes (`include/uapi/linux/pkt_cls.h`).
pub mod tc_act {
    pub const OK: u32 = 0;
    pub const SHOT: u32 = 2;
    pub const REDIRECT: u32 = 7;
}

/// The loaded dataplane: the programs and handles on every map.
pub struct Dataplane {
    bpf_dir: PathBuf,
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, Endpoint>,
    endpoint_slots: Array<MapData, Endpoint>,
    routes: HashMap<MapData, RouteKey, Route>,
    cidrs: LpmTrie<MapData, CidrKey, u32>,
    routes6: HashMap<MapData, Route6Key, Route>,
    cidrs6: LpmTrie<MapData, Cidr6Key, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_kinds: Array<MapData, u32>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack6: HashMap<MapData, Ct6Key, CtValue>,
    hosts: HashMap<MapData, HostKey, u32>,
    vnis: HashMap<MapData, VniKey, u8>,
    drops: PerCpuArray<MapData, DropCount>,
    event_limits: PerCpuArray<MapData, EventLimiter>,
    rule_hits: PerCpuArray<MapData, u64>,
    /// The rule each `VERSE_RULE_HITS` slot counts for (slot -> rule id), as the policy entries
    /// name them: read with the maps, kept by [`Dataplane::apply`]. Behind a lock because
    /// reading the maps (`&self`) refreshes it.
    rule_slots: std::sync::Mutex<BTreeMap<u32, u32>>,
    /// `VERSE_EVENTS`, until [`Dataplane::take_events`] hands it to its reader.
    events: Option<RingBuf<MapData>>,
    /// `VERSE_CONFIG`: the settings written at load, and the flow-log interval after...
    config: Array<MapData, Config>,
    /// ...and mapped, for the route epoch (`Config::epoch`), which only [`Dataplane::bump_epoch`]
    /// changes, with one atomic store; whole-value writes of the settings write it as it is.
    config_mapped: Mapped<Config>,
    /// `VERSE_CT_OWNERS`, mapped into this process (the map itself stays open below).
    ct_owners: Owners,
    _ct_owners_map: Array<MapData, CtOwner>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("bpf_dir", &self.bpf_dir).finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the dataplane with its maps pinned under `bpf_dir` (mounting a bpffs there if it is
    /// not one: `ip netns exec` remounts `/sys`, so the daemon keeps its own), and writes
    /// `config` into `VERSE_CONFIG`. Maps already pinned there are reused as they are.
    pub fn load(bpf_dir: &Path, config: &Config) -> Result<Self> {
        ensure_bpffs(bpf_dir)?;
        check_pinned_layouts(bpf_dir)?;
        // Pinned by a daemon that had the map; else made empty below (see `seed_policy_kinds`).
        let kinds_pinned = bpf_dir.join(map_names::POLICY_KINDS).exists();
        for sub in ["links", "underlay"] {
            let dir = bpf_dir.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|source| Error::CreateDir { path: dir.clone(), source })?;
        }

        let mut ebpf = EbpfLoader::new().default_map_pin_directory(bpf_dir).load(OBJECT).map_err(
            |source| Error::LoadObject { dir: bpf_dir.to_path_buf(), source: Box::new(source) },
        )?;
        for name in JUDGES.into_iter().chain([PROG_EMPTY]) {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::LoadProgram { name, source })?;
        }
        classifier_mut(&mut ebpf, PROG_PARSE_ONLY)?
            .load()
            .map_err(|source| Error::LoadProgram { name: PROG_PARSE_ONLY, source })?;
        fill_jump_table(&mut ebpf)?;

        let mut config_map: Array<MapData, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        let config_mapped = Mapped::map(config_map.map().fd().as_fd(), 1)
            .map_err(|source| Error::Mmap { name: map_names::CONFIG, source })?;
        // The settings are written around the pinned epoch, unchanged (programs of a previous
        // daemon may be reading it); it moves on below, from where it was.
        let epoch = Dataplane::epoch_field(&config_mapped).load(Ordering::Acquire);
        config_map.set(0, Config { epoch, ..*config }, 0).map_err(|source| Error::MapWrite {
            name: map_names::CONFIG,
            entry: "slot 0".into(),
            source,
        })?;

        let ct_owners_map: Array<MapData, CtOwner> = take_map(&mut ebpf, map_names::CT_OWNERS)?;
        let ct_owners = Owners::map(ct_owners_map.map().fd().as_fd(), capacity::CT_OWNERS)
            .map_err(|source| Error::Mmap { name: map_names::CT_OWNERS, source })?;
        let mut dataplane = Dataplane {
            ct_owners,
            _ct_owners_map: ct_owners_map,
            bpf_dir: bpf_dir.to_path_buf(),
            endpoints: take_map(&mut ebpf, map_names::ENDPOINTS)?,
            endpoint_slots: take_map(&mut ebpf, map_names::ENDPOINT_SLOTS)?,
            routes: take_map(&mut ebpf, map_names::ROUTES)?,
            cidrs: take_map(&mut ebpf, map_names::CIDRS)?,
            routes6: take_map(&mut ebpf, map_names::ROUTES6)?,
            cidrs6: take_map(&mut ebpf, map_names::CIDRS6)?,
            policy: take_map(&mut ebpf, map_names::POLICY)?,
            policy_kinds: take_map(&mut ebpf, map_names::POLICY_KINDS)?,
            conntrack: take_map(&mut ebpf, map_names::CONNTRACK)?,
            conntrack6: take_map(&mut ebpf, map_names::CONNTRACK6)?,
            hosts: take_map(&mut ebpf, map_names::HOSTS)?,
            vnis: take_map(&mut ebpf, map_names::VNIS)?,
            drops: take_map(&mut ebpf, map_names::DROPS)?,
            event_limits: take_map(&mut ebpf, map_names::EVENT_LIMITS)?,
            rule_hits: take_map(&mut ebpf, map_names::RULE_HITS)?,
            rule_slots: std::sync::Mutex::default(),
            events: Some(take_map(&mut ebpf, map_names::EVENTS)?),
            config: config_map,
            config_mapped,
            ebpf,
        };
        // A daemon of an older layout kept the epoch in a map of its own: the pinned conntrack
        // entries may carry hops stamped with any epoch up to it, so the epoch goes on from
        // there, and that pin goes.
        let legacy = bpf_dir.join(map_names::LEGACY_EPOCH);
        if legacy.exists() {
            let old = legacy_epoch(&legacy)?;
            let field = Dataplane::epoch_field(&dataplane.config_mapped);
            field.store(field.load(Ordering::Acquire).max(old), Ordering::Release);
        }
        // A previous daemon may have died between a route write and its bump: whatever the
        // pinned conntrack entries cached is looked up again.
        dataplane.bump_epoch()?;
        remove_pin(&legacy)?;
        if !kinds_pinned {
            dataplane.seed_policy_kinds()?;
        }
        Ok(dataplane)
    }

    /// Writes into a new, empty `VERSE_POLICY_KINDS` the kinds of peer of the policy entries
    /// already pinned (a daemon of an earlier version left `VERSE_POLICY` but no kinds map):
    /// an empty map would make the programs skip every policy lookup, refusing every new flow
    /// until the first apply, which a daemon that cannot reach its store may never make. Runs
    /// at load, before any program is attached or swapped in.
    fn seed_policy_kinds(&mut self) -> Result<()> {
        let mut entries = BTreeMap::new();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(read_err(map_names::POLICY))?;
            entries.insert((k.prefix_len(), k.data()), v);
        }
        for (identity, kinds) in crate::compile::policy_kinds(&entries) {
            self.write_policy_kinds(identity, kinds)?;
        }
        Ok(())
    }

    /// Invalidates every delivery cached in conntrack (see `dataplane_common::CtHop`): the next
    /// packet of each flow looks its route up again. Skips 0, which means "no epoch".
    /// One atomic 4-byte store (see `Config::epoch`), released after the map writes it follows.
    fn bump_epoch(&mut self) -> Result<()> {
        let field = Dataplane::epoch_field(&self.config_mapped);
        let next = field.load(Ordering::Acquire).wrapping_add(1).max(1);
        field.store(next, Ordering::Release);
        Ok(())
    }

    /// `Config::epoch` in the mapping of `VERSE_CONFIG`.
    fn epoch_field(config: &Mapped<Config>) -> &AtomicU32 {
        let p = config.field(0, std::mem::offset_of!(Config, epoch)).expect("slot 0 of one");
        // SAFETY: a 4-byte aligned u32 (`Config` is 8-byte aligned, the field at a multiple of
        // 4: dataplane-common's layout test) in the mapping, which outlives the borrow; the
        // kernel reads it with one 4-byte load, this process writes it only here, atomically.
        unsafe { AtomicU32::from_ptr(p.cast::<u32>()) }
    }

    /// The flow-log interval the kernel stamps TCP flags with (`Config::flow_interval`).
    pub fn flow_interval(&self) -> Result<u32> {
        Ok(self.config.get(&0, 0).map_err(read_err(map_names::CONFIG))?.flow_interval)
    }

    /// Moves the kernel on to flow-log interval `n`. Only this field changes: the slot is
    /// rewritten with the same value for every other (a program reading it meanwhile sees
    /// either number, and the same settings).
    pub fn set_flow_interval(&mut self, n: u32) -> Result<()> {
        let mut config = self.config.get(&0, 0).map_err(read_err(map_names::CONFIG))?;
        config.flow_interval = n;
        self.config.set(0, config, 0).map_err(|source| Error::MapWrite {
            name: map_names::CONFIG,
            entry: format!("slot 0, flow_interval = {n}"),
            source,
        })
    }

    /// Whether the kernel writes verdict events (`config_flags::EVENTS`).
    pub fn events_on(&self) -> Result<bool> {
        let config = self.config.get(&0, 0).map_err(read_err(map_names::CONFIG))?;
        Ok(config.flags & dataplane_common::config_flags::EVENTS != 0)
    }

    /// Turns the kernel's verdict events on or off; every other setting is rewritten as it is
    /// (as [`Dataplane::set_flow_interval`]).
    pub fn set_events(&mut self, on: bool) -> Result<()> {
        let mut config = self.config.get(&0, 0).map_err(read_err(map_names::CONFIG))?;
        let bit = dataplane_common::config_flags::EVENTS;
        config.flags = if on { config.flags | bit } else { config.flags & !bit };
        self.config.set(0, config, 0).map_err(|source| Error::MapWrite {
            name: map_names::CONFIG,
            entry: format!("slot 0, events = {on}"),
            source,
        })
    }

    /// The current route epoch (tests).
    pub fn epoch(&self) -> Result<u32> {
        Ok(Dataplane::epoch_field(&self.config_mapped).load(Ordering::Acquire))
    }

    /// The new and changed routes (both families) and endpoints of `desired`; sets `written`
    /// before the first write is tried (a failed write may have changed a map).
    fn write_deliveries(
        &mut self,
        current: &MapContents,
        desired: &MapContents,
        written: &mut bool,
    ) -> Result<()> {
        for (key, value) in &desired.routes {
            if current.routes.get(key) != Some(value) {
                *written = true;
                self.routes.insert(key, value, 0).map_err(|source| Error::MapWrite {
                    name: map_names::ROUTES,
                    entry: format!("{key:?}"),
                    source,
                })?;
            }
        }
        for (key, value) in &desired.ipv6.routes {
            if current.ipv6.routes.get(key) != Some(value) {
                *written = true;
                self.routes6.insert(key, value, 0).map_err(|source| Error::MapWrite {
                    name: map_names::ROUTES6,
                    entry: format!("{key:?}"),
                    source,
                })?;
            }
        }
        for (&key, value) in &desired.endpoints {
            if current.endpoints.get(&key) != Some(value) {
                *written = true;
                self.write_endpoint(key, value)?;
            }
        }
        Ok(())
    }

    /// Removes the endpoints and routes (both families) `desired` no longer has; sets `removed`
    /// before the first removal is tried.
    fn remove_deliveries(
        &mut self,
        current: &MapContents,
        desired: &MapContents,
        removed: &mut bool,
    ) -> Result<()> {
        for &key in current.endpoints.keys().filter(|k| !desired.endpoints.contains_key(k)) {
            *removed = true;
            self.remove_endpoint(key)?;
        }
        for key in current.routes.keys().filter(|k| !desired.routes.contains_key(k)) {
            *removed = true;
            remove_ok_if_absent(self.routes.remove(key)).map_err(|source| Error::MapDelete {
                name: map_names::ROUTES,
                entry: format!("{key:?}"),
                source,
            })?;
        }
        for key in current.ipv6.routes.keys().filter(|k| !desired.ipv6.routes.contains_key(k)) {
            *removed = true;
            remove_ok_if_absent(self.routes6.remove(key)).map_err(|source| Error::MapDelete {
                name: map_names::ROUTES6,
                entry: format!("{key:?}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes `VERSE_POLICY_KINDS[identity]`.
    fn write_policy_kinds(&mut self, identity: u32, kinds: u32) -> Result<()> {
        self.policy_kinds.set(identity, kinds, 0).map_err(|source| Error::MapWrite {
            name: map_names::POLICY_KINDS,
            entry: format!("identity {identity} = {kinds:#x}"),
            source,
        })
    }

    /// Writes the endpoint behind `ifindex` where the program looks first: its slot in
    /// `VERSE_EP_SLOTS` if it has one (and a VNI, since a slot with VNI 0 is empty), else
    /// `VERSE_ENDPOINTS`.
    fn write_endpoint(&mut self, ifindex: u32, endpoint: &Endpoint) -> Result<()> {
        let write_err = |name| {
            move |source| Error::MapWrite { name, entry: format!("ifindex {ifindex}"), source }
        };
        if has_slot(ifindex, endpoint) {
            self.endpoint_slots
                .set(ifindex, endpoint, 0)
                .map_err(write_err(map_names::ENDPOINT_SLOTS))?;
            // An older daemon may have put it in the hash: the slot now shadows that entry, and
            // leaving it would resurrect the endpoint if the slot is cleared.
            remove_ok_if_absent(self.endpoints.remove(&ifindex)).map_err(|source| {
                Error::MapDelete {
                    name: map_names::ENDPOINTS,
                    entry: format!("ifindex {ifindex}"),
                    source,
                }
            })
        } else {
            self.endpoints.insert(ifindex, endpoint, 0).map_err(write_err(map_names::ENDPOINTS))?;
            if ifindex < capacity::ENDPOINT_SLOTS {
                // A VNI-0 endpoint cannot live in a slot; an older value there would shadow it.
                // Cleared after the hash write, so the interface is never without an endpoint.
                self.clear_slot(ifindex)?;
            }
            Ok(())
        }
    }

    /// Removes the endpoint behind `ifindex` from wherever it is.
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        if ifindex < capacity::ENDPOINT_SLOTS {
            self.clear_slot(ifindex)?;
        }
        remove_ok_if_absent(self.endpoints.remove(&ifindex)).map_err(|source| Error::MapDelete {
            name: map_names::ENDPOINTS,
            entry: format!("ifindex {ifindex}"),
            source,
        })
    }

    fn clear_slot(&mut self, ifindex: u32) -> Result<()> {
        self.endpoint_slots.set(ifindex, Endpoint::default(), 0).map_err(|source| {
            Error::MapDelete {
                name: map_names::ENDPOINT_SLOTS,
                entry: format!("ifindex {ifindex}"),
                source,
            }
        })
    }

    /// The bpffs directory the maps and links are pinned under.
    pub fn bpf_dir(&self) -> &Path {
        &self.bpf_dir
    }

    /// Where the TCX link of `iface` is pinned.
    pub fn link_pin_path(&self, iface: &str) -> PathBuf {
        self.bpf_dir.join("links").join(iface)
    }

    /// Attaches `from_endpoint` at TCX ingress of `iface` and pins the link. Idempotent: a live
    /// pinned link on the same ifindex is kept and its program swapped atomically for the one
    /// loaded now; a stale pin (interface gone or recreated) is replaced.
    pub fn attach_endpoint(&mut self, iface: &str) -> Result<()> {
        let path = self.link_pin_path(iface);
        attach_pinned(&mut self.ebpf, PROG_FROM_ENDPOINT, iface, &path)
    }

    /// Where the TCX link of the underlay interface `iface` is pinned.
    pub fn underlay_pin_path(&self, iface: &str) -> PathBuf {
        self.bpf_dir.join("underlay").join(iface)
    }

    /// Attaches `from_underlay` at TCX ingress of the underlay interface `iface` and pins the
    /// link, idempotent like [`Dataplane::attach_endpoint`]. Pins of other underlay interfaces
    /// (a changed `--underlay`) are removed, so one interface at a time receives for Verse.
    pub fn attach_underlay(&mut self, iface: &str) -> Result<()> {
        let path = self.underlay_pin_path(iface);
        attach_pinned(&mut self.ebpf, PROG_FROM_UNDERLAY, iface, &path)?;
        let dir = self.bpf_dir.join("underlay");
        for other in pins_in(&dir)?.into_iter().filter(|name| name != iface) {
            let path = dir.join(other);
            remove_pin(&path)?;
        }
        Ok(())
    }

    /// The ifindex the pinned link of `iface` is attached to: `None` without a pin, `Some(0)`
    /// once its device is gone. Compare with the interface's current ifindex to tell a live
    /// attachment from a stale one.
    pub fn link_ifindex(&self, iface: &str) -> Result<Option<u32>> {
        let path = self.link_pin_path(iface);
        if !path.exists() {
            return Ok(None);
        }
        pinned_tcx_ifindex(&path)
    }

    /// Detaches `from_endpoint` from `iface` by removing its pinned link. Idempotent.
    pub fn detach_endpoint(&mut self, iface: &str) -> Result<()> {
        remove_pin(&self.link_pin_path(iface))
    }

    /// Endpoint interfaces with a pinned link (attached, or stale until the next attach).
    pub fn pinned_links(&self) -> Result<Vec<String>> {
        pins_in(&self.bpf_dir.join("links"))
    }

    /// The current contents of `VERSE_ENDPOINTS`, `VERSE_ROUTES`, `VERSE_CIDRS`, `VERSE_POLICY`,
    /// `VERSE_HOSTS`, `VERSE_VNIS`, the assigned slots of `VERSE_CT_OWNERS`, and the slots of
    /// `VERSE_RULE_HITS` the policy entries name (with their rules; [`Dataplane::rule_hits`]
    /// answers for these from now on).
    pub fn read(&self) -> Result<MapContents> {
        let mut desired = MapContents::default();
        for (slot, o) in self.ct_owners.assigned() {
            desired.ct_owners.insert(slot, OwnerBudget { serial: o.serial, budget: o.budget });
        }
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(read_err(map_names::ENDPOINTS))?;
            desired.endpoints.insert(k, v);
        }
        // Slots win over the hash, as in the program.
        for (ifindex, item) in (0..).zip(self.endpoint_slots.iter()) {
            let v = item.map_err(read_err(map_names::ENDPOINT_SLOTS))?;
            if v.vni != 0 {
                desired.endpoints.insert(ifindex, v);
            }
        }
        for item in self.routes.iter() {
            let (k, v) = item.map_err(read_err(map_names::ROUTES))?;
            desired.routes.insert(k, v);
        }
        for item in self.cidrs.iter() {
            let (k, v) = item.map_err(read_err(map_names::CIDRS))?;
            desired.cidrs.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.routes6.iter() {
            let (k, v) = item.map_err(read_err(map_names::ROUTES6))?;
            desired.ipv6.routes.insert(k, v);
        }
        for item in self.cidrs6.iter() {
            let (k, v) = item.map_err(read_err(map_names::CIDRS6))?;
            desired.ipv6.cidrs.insert((k.prefix_len(), k.data()), v);
        }
        for (identity, item) in (0..).zip(self.policy_kinds.iter()) {
            let kinds = item.map_err(read_err(map_names::POLICY_KINDS))?;
            desired.set_kinds(identity, kinds);
        }
        for item in self.policy.iter() {
            let (k, v) = item.map_err(read_err(map_names::POLICY))?;
            desired.insert_policy(k.prefix_len(), k.data(), v);
            // Two rules in one slot cannot come from this controller; the first is kept, and
            // the compiler gives the other a slot of its own (zeroed).
            if v.slot != 0 && v.rule != 0 {
                desired.rules.entry(v.slot).or_insert(v.rule);
            }
        }
        for item in self.hosts.iter() {
            let (k, v) = item.map_err(read_err(map_names::HOSTS))?;
            desired.hosts.insert(k, v);
        }
        for item in self.vnis.keys() {
            desired.vnis.insert(item.map_err(read_err(map_names::VNIS))?);
        }
        *self.lock_rule_slots() = desired.rules.clone();
        Ok(desired)
    }

    /// Writes the difference between `current` (what the maps hold) and `desired`: new and
    /// changed hosts, universes, CIDR classes, rule counter slots (zeroed), the kinds of peer
    /// of both states' policy entries (`VERSE_POLICY_KINDS`, the union) and policy entries,
    /// budgets, routes, endpoints; then removed endpoints, routes, budgets, policy entries, the
    /// kinds no entry names any more, CIDR classes, universes, hosts.
    pub fn apply(&mut self, current: &MapContents, desired: &MapContents) -> Result<()> {
        // Before the endpoints that spend them.
        for (&slot, owner) in &desired.ct_owners {
            if current.ct_owners.get(&slot) != Some(owner)
                && !self.ct_owners.assign(slot, owner.serial, owner.budget)
            {
                return Err(Error::NoSlot { name: map_names::CT_OWNERS, slot });
            }
        }
        for (key, &value) in &desired.hosts {
            if current.hosts.get(key) != Some(&value) {
                self.hosts.insert(key, value, 0).map_err(|source| Error::MapWrite {
                    name: map_names::HOSTS,
                    entry: format!("host {}", std::net::Ipv4Addr::from(*key)),
                    source,
                })?;
            }
        }
        for &vni in desired.vnis.difference(&current.vnis) {
            self.vnis.insert(vni, VNI_PRESENT, 0).map_err(|source| Error::MapWrite {
                name: map_names::VNIS,
                entry: format!("vni {vni}"),
                source,
            })?;
        }
        for (&(len, key), &value) in &desired.cidrs {
            if current.cidrs.get(&(len, key)) != Some(&value) {
                let k = Key::new(len, key);
                patient(|| self.cidrs.insert(&k, value, 0)).map_err(|source| Error::MapWrite {
                    name: map_names::CIDRS,
                    entry: format!("{len}/{key:?}"),
                    source,
                })?;
            }
        }
        for (&(len, key), &value) in &desired.ipv6.cidrs {
            if current.ipv6.cidrs.get(&(len, key)) != Some(&value) {
                let k = Key::new(len, key);
                patient(|| self.cidrs6.insert(&k, value, 0)).map_err(|source| Error::MapWrite {
                    name: map_names::CIDRS6,
                    entry: format!("{len}/{key:?}"),
                    source,
                })?;
            }
        }
        // Each rule's counter slot, zeroed before the first entry naming it for this rule is
        // written (a new rule counts from 0; whatever the slot counted for a rule before, its
        // entries were removed by an earlier apply: a slot is never freed and given again in
        // one, see `compile::RuleSlots`).
        for (&slot, &rule) in &desired.rules {
            if current.rules.get(&slot) == Some(&rule) {
                continue;
            }
            let write_err = |source| Error::MapWrite {
                name: map_names::RULE_HITS,
                entry: format!("slot {slot} (rule {rule:08x}) = 0"),
                source,
            };
            let n = aya::util::nr_cpus().map_err(|(_, e)| write_err(MapError::IoError(e)))?;
            let zeros = PerCpuValues::try_from(vec![0u64; n]).map_err(MapError::IoError);
            self.rule_hits.set(slot, zeros.map_err(write_err)?, 0).map_err(write_err)?;
            self.lock_rule_slots().insert(slot, rule);
        }
        // The kinds of peer of the entries about to be written, before them (with the kinds of
        // the entries still there: see `dataplane_common::peer_kind`).
        for (identity, kinds) in policy_kinds_before(current, desired) {
            self.write_policy_kinds(identity, kinds)?;
        }
        // New entries, and entries now credited to another rule (the value is replaced in
        // place: the entry never disappears).
        let policy6 = desired.ipv6.policy.iter().map(|e| (e, current.ipv6.policy.get(e.0)));
        let policy4 = desired.policy.iter().map(|e| (e, current.policy.get(e.0)));
        for ((&(len, key), value), now) in policy4.chain(policy6) {
            if now != Some(value) {
                let k = Key::new(len, key);
                patient(|| self.policy.insert(&k, value, 0)).map_err(|source| Error::MapWrite {
                    name: map_names::POLICY,
                    entry: format!("{len}/{key:?}"),
                    source,
                })?;
            }
        }
        // Flows cached a delivery under the old routes: from here on they look the new ones up.
        // Bumped also when a later write failed (fail closed): the writes that succeeded are
        // in the maps, and the next read takes them as applied, so no later edit would bump
        // for them.
        let mut written = false;
        let wrote = self.write_deliveries(current, desired, &mut written);
        if written {
            self.bump_epoch()?;
        }
        wrote?;
        // Before the reconciler deletes the removed endpoints' interfaces (whose ifindexes may
        // then be reused): no cached delivery to them survives this bump. A packet that read the
        // old epoch is still running its program, and the interface outlives it (RCU). Bumped on
        // a failed removal too, as above.
        let mut removed = false;
        let gone = self.remove_deliveries(current, desired, &mut removed);
        if removed {
            self.bump_epoch()?;
        }
        gone?;
        // The entries charged to a freed slot stay counted until they are collected.
        for &slot in current.ct_owners.keys().filter(|k| !desired.ct_owners.contains_key(k)) {
            self.ct_owners.assign(slot, 0, 0);
        }
        let gone4 = current.policy.keys().filter(|k| !desired.policy.contains_key(k));
        let gone6 = current.ipv6.policy.keys().filter(|k| !desired.ipv6.policy.contains_key(k));
        for &(len, key) in gone4.chain(gone6) {
            remove_ok_if_absent(self.policy.remove(&Key::new(len, key))).map_err(|source| {
                Error::MapDelete {
                    name: map_names::POLICY,
                    entry: format!("{len}/{key:?}"),
                    source,
                }
            })?;
        }
        // Only the kinds the entries left still name (the union written above, exact again).
        for (identity, kinds) in policy_kinds_after(current, desired) {
            self.write_policy_kinds(identity, kinds)?;
        }
        // The entries naming them are gone: these slots count for no rule any more (their
        // values stay until a later apply zeroes them for another rule).
        {
            let mut slots = self.lock_rule_slots();
            for slot in current.rules.keys().filter(|k| !desired.rules.contains_key(k)) {
                slots.remove(slot);
            }
        }
        for &(len, key) in current.cidrs.keys().filter(|k| !desired.cidrs.contains_key(k)) {
            remove_ok_if_absent(self.cidrs.remove(&Key::new(len, key))).map_err(|source| {
                Error::MapDelete { name: map_names::CIDRS, entry: format!("{len}/{key:?}"), source }
            })?;
        }
        let cidrs6 = &desired.ipv6.cidrs;
        for &(len, key) in current.ipv6.cidrs.keys().filter(|k| !cidrs6.contains_key(k)) {
            remove_ok_if_absent(self.cidrs6.remove(&Key::new(len, key))).map_err(|source| {
                Error::MapDelete {
                    name: map_names::CIDRS6,
                    entry: format!("{len}/{key:?}"),
                    source,
                }
            })?;
        }
        for vni in current.vnis.difference(&desired.vnis) {
            remove_ok_if_absent(self.vnis.remove(vni)).map_err(|source| Error::MapDelete {
                name: map_names::VNIS,
                entry: format!("vni {vni}"),
                source,
            })?;
        }
        for key in current.hosts.keys().filter(|k| !desired.hosts.contains_key(*k)) {
            remove_ok_if_absent(self.hosts.remove(key)).map_err(|source| Error::MapDelete {
                name: map_names::HOSTS,
                entry: format!("host {}", std::net::Ipv4Addr::from(*key)),
                source,
            })?;
        }
        Ok(())
    }

    /// Packets dropped by reason (at either hook), summed over CPUs. Every reason is present
    /// (zero if none).
    pub fn drops(&self) -> Result<BTreeMap<DropReason, u64>> {
        let mut out: BTreeMap<DropReason, u64> = DropReason::ALL.iter().map(|r| (*r, 0)).collect();
        for ((reason, _), count) in self.drop_counts()? {
            if let Some(n) = out.get_mut(&reason) {
                *n = n.wrapping_add(count.packets);
            }
        }
        Ok(out)
    }

    /// Drops by reason and hook, packets and bytes, summed over CPUs. Every pair is present.
    pub fn drop_counts(&self) -> Result<BTreeMap<(DropReason, Hook), DropCount>> {
        let mut out = BTreeMap::new();
        for reason in DropReason::ALL {
            for hook in Hook::ALL {
                let per_cpu = self
                    .drops
                    .get(&drop_slot(reason, hook), 0)
                    .map_err(read_err(map_names::DROPS))?;
                let sum = per_cpu.iter().fold(DropCount::default(), |a, c| DropCount {
                    packets: a.packets.wrapping_add(c.packets),
                    bytes: a.bytes.wrapping_add(c.bytes),
                });
                out.insert((reason, hook), sum);
            }
        }
        Ok(out)
    }

    /// What became of the events each CPU had to report (`VERSE_EV_LIMITS`), summed over CPUs
    /// (the token buckets' times are left 0).
    pub fn event_counts(&self) -> Result<EventLimiter> {
        let per_cpu = self.event_limits.get(&0, 0).map_err(read_err(map_names::EVENT_LIMITS))?;
        let mut out = EventLimiter::default();
        for c in per_cpu.iter() {
            for k in 0..out.emitted.len() {
                out.emitted[k] = out.emitted[k].wrapping_add(c.emitted[k]);
                out.suppressed[k] = out.suppressed[k].wrapping_add(c.suppressed[k]);
                out.lost[k] = out.lost[k].wrapping_add(c.lost[k]);
            }
        }
        Ok(out)
    }

    /// New flows admitted per rule on this host (key: the rule id's bits), summed over CPUs:
    /// every rule the policy entries name (as of the last [`Dataplane::read`] or
    /// [`Dataplane::apply`]), 0 if it never matched. Each rule's count is read from its slot.
    pub fn rule_hits(&self) -> Result<BTreeMap<u32, u64>> {
        let slots = self.lock_rule_slots().clone();
        let mut out = BTreeMap::new();
        for (slot, rule) in slots {
            let per_cpu = self.rule_hits.get(&slot, 0).map_err(read_err(map_names::RULE_HITS))?;
            let sum = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
            let n = out.entry(rule).or_insert(0u64);
            *n = n.wrapping_add(sum);
        }
        Ok(out)
    }

    /// The slot table, usable after a holder panicked (it is rewritten whole by every read).
    fn lock_rule_slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u32>> {
        self.rule_slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ring buffer of verdict events (`VERSE_EVENTS`), for its one reader; `None` once
    /// taken.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Every conntrack entry (live or expired but not yet reclaimed): its flow state, without
    /// the delivery cache (see [`Dataplane::conntrack_values`]).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        Ok(self.conntrack_values()?.into_iter().map(|(k, v)| (k, v.entry)).collect())
    }

    /// Every conntrack entry with its cached deliveries.
    pub fn conntrack_values(&self) -> Result<Vec<(CtKey, CtValue)>> {
        conntrack::read_all(self.conntrack.map().fd().as_fd()).map_err(|source| Error::Conntrack {
            call: "BPF_MAP_LOOKUP_BATCH",
            name: map_names::CONNTRACK,
            source,
        })
    }

    /// Every IPv6 conntrack entry (`VERSE_CT6`), with its cached deliveries.
    pub fn conntrack6_values(&self) -> Result<Vec<(Ct6Key, CtValue)>> {
        conntrack::read_all(self.conntrack6.map().fd().as_fd()).map_err(|source| Error::Conntrack {
            call: "BPF_MAP_LOOKUP_BATCH",
            name: map_names::CONNTRACK6,
            source,
        })
    }

    /// Every conntrack entry of both tables (`VERSE_CT`, `VERSE_CT6`) with its counters, keyed
    /// family-neutrally: what flow logs and packets per rule read.
    pub fn conntrack_flows(&self) -> Result<Vec<(conntrack::Flow, CtValue)>> {
        let v4 = self.conntrack_values()?.into_iter().map(|(k, v)| (k.flow(), v));
        let v6 = self.conntrack6_values()?.into_iter().map(|(k, v)| (k.flow(), v));
        Ok(v4.chain(v6).collect())
    }

    /// Every IPv6 conntrack entry's flow state.
    pub fn conntrack6(&self) -> Result<Vec<(Ct6Key, CtEntry)>> {
        Ok(self.conntrack6_values()?.into_iter().map(|(k, v)| (k, v.entry)).collect())
    }

    /// Removes every conntrack entry, releasing each from its owner's budget (tests and
    /// benchmarks start from a clean table with it).
    pub fn clear_conntrack(&mut self) -> Result<()> {
        self.collect_conntrack(&|_| true, &mut |_| {})?;
        Ok(())
    }

    /// Garbage collection of `VERSE_CT` and `VERSE_CT6` (see [`crate::conntrack::collect`]):
    /// deletes the entries
    /// `garbage` calls garbage, releasing each from its owner's budget; `kept` sees the others.
    pub fn collect_conntrack(
        &self,
        garbage: &dyn Fn(&CtEntry) -> bool,
        kept: &mut dyn FnMut(&CtEntry),
    ) -> Result<Collected> {
        self.collect_conntrack_reporting(garbage, kept, &mut |_, _| {})
    }

    /// [`Dataplane::collect_conntrack`], and `gone` sees every entry deleted, as it was deleted
    /// (flow logs count its last packets).
    pub fn collect_conntrack_reporting(
        &self,
        garbage: &dyn Fn(&CtEntry) -> bool,
        kept: &mut dyn FnMut(&CtEntry),
        gone: &mut dyn FnMut(&conntrack::Flow, &CtValue),
    ) -> Result<Collected> {
        let fd = self.conntrack.map().fd().as_fd();
        let mut gone4 = |k: &CtKey, v: &CtValue| gone(&k.flow(), v);
        let v4 = conntrack::collect(fd, &self.ct_owners, garbage, kept, &mut gone4).map_err(
            |source| Error::Conntrack {
                call: "garbage collection",
                name: map_names::CONNTRACK,
                source,
            },
        )?;
        // IPv6 flows: the same budgets, the same predicate, reported to `gone` alike.
        let fd6 = self.conntrack6.map().fd().as_fd();
        let mut gone6 = |k: &Ct6Key, v: &CtValue| gone(&k.flow(), v);
        let v6 = conntrack::collect::<Ct6Key>(fd6, &self.ct_owners, garbage, kept, &mut gone6)
            .map_err(|source| Error::Conntrack {
                call: "garbage collection",
                name: map_names::CONNTRACK6,
                source,
            })?;
        Ok(Collected {
            scanned: v4.scanned + v6.scanned,
            deleted: v4.deleted + v6.deleted,
            restored: v4.restored + v6.restored,
            duration: v4.duration + v6.duration,
        })
    }

    /// Writes conntrack entries directly, charging nobody's budget: for benchmarks and tests
    /// that need a full table (the dataplane itself charges every entry it makes).
    pub fn write_conntrack(&self, entries: &[(CtKey, CtValue)]) -> Result<()> {
        conntrack::write_all(self.conntrack.map().fd().as_fd(), entries).map_err(|source| {
            Error::Conntrack { call: "BPF_MAP_UPDATE_BATCH", name: map_names::CONNTRACK, source }
        })
    }

    /// Every slot of `VERSE_CT_OWNERS` that an endpoint has: its budget and counters.
    pub fn ct_owners(&self) -> BTreeMap<u32, CtOwner> {
        self.ct_owners.assigned()
    }

    /// The number of instructions the verifier processed for `from_endpoint` (kernel >= 5.16).
    pub fn verified_instruction_count(&self) -> Result<Option<u32>> {
        Ok(self.program_stats()?.verified_instructions)
    }

    /// Size and verifier cost of `from_endpoint` as loaded (for reports and benchmarks).
    pub fn program_stats(&self) -> Result<ProgramStats> {
        let prog = classifier(&self.ebpf, PROG_FROM_ENDPOINT)?;
        let info = prog
            .info()
            .map_err(|source| Error::ProgramInfo { name: PROG_FROM_ENDPOINT, source })?;
        Ok(ProgramStats {
            verified_instructions: info.verified_instruction_count(),
            translated_bytes: info.size_translated(),
            jitted_bytes: info.size_jitted(),
        })
    }

    /// Runs `from_endpoint` once on `packet` (a whole Ethernet frame) as if it arrived on the
    /// interface `ingress_ifindex` (a real device of the caller's network namespace, > 1).
    ///
    /// With `repeat > 1` the kernel runs the program that many times on the *same* buffer, so
    /// every run after the first sees the previous run's rewrite (a delivered frame then carries
    /// the gateway MAC as source and is dropped as spoofed, unless `Config.gateway_mac` is the
    /// sender's own MAC, a trick for benchmarks). Use `repeat = 1` for verdicts and
    /// [`Dataplane::test_run_pool`] for timing.
    pub fn test_run(
        &self,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        run(&self.ebpf, PROG_FROM_ENDPOINT, packet, ingress_ifindex, repeat)
    }

    /// Runs `from_underlay` once on `packet` (a whole Ethernet frame) as if it arrived on the
    /// interface `ingress_ifindex` (see [`Dataplane::test_run`]).
    pub fn test_run_underlay(&self, packet: &[u8], ingress_ifindex: u32) -> Result<TestRunOutput> {
        run(&self.ebpf, PROG_FROM_UNDERLAY, packet, ingress_ifindex, 1)
    }

    /// Runs `from_endpoint6` once on `packet` as if it arrived on `ingress_ifindex`, entered
    /// directly, with `handed` as the sender's serial `from_endpoint` hands over before its tail
    /// call (`None`: a zeroed control block) rather than the serial it checked (tests of that
    /// hand-over; no hook enters the program so).
    pub fn test_run_from_endpoint6(
        &self,
        packet: &[u8],
        ingress_ifindex: u32,
        handed: Option<u64>,
    ) -> Result<TestRunOutput> {
        run_handed(&self.ebpf, PROG_FROM_ENDPOINT6, packet, (ingress_ifindex, handed), 1)
    }

    /// [`Dataplane::test_run`] for the `empty` program: the baseline cost of a TC program run.
    pub fn test_run_empty(
        &self,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        run(&self.ebpf, PROG_EMPTY, packet, ingress_ifindex, repeat)
    }

    /// [`Dataplane::test_run`] for the `parse_only` benchmark probe: the parse every walk starts
    /// with (`TC_ACT_OK` for a parsed IPv4 packet, `TC_ACT_SHOT` otherwise; the frame is left
    /// unchanged, so `repeat > 1` is safe).
    pub fn test_run_parse_only(
        &self,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        run(&self.ebpf, PROG_PARSE_ONLY, packet, ingress_ifindex, repeat)
    }

    /// Runs `from_endpoint` once on each packet of `packets`, in order (distinct flows defeat
    /// caches and exercise conntrack creation the first time, hits the next), and reports the
    /// mean kernel-measured time per packet. Every packet is run separately with `repeat = 1`
    /// (see [`Dataplane::test_run`] for why).
    pub fn test_run_pool(
        &self,
        packets: &[Vec<u8>],
        ingress_ifindex: u32,
    ) -> Result<PoolRunOutput> {
        run_pool(&self.ebpf, PROG_FROM_ENDPOINT, packets, ingress_ifindex)
    }

    /// [`Dataplane::test_run_pool`] for the `empty` program.
    pub fn test_run_pool_empty(
        &self,
        packets: &[Vec<u8>],
        ingress_ifindex: u32,
    ) -> Result<PoolRunOutput> {
        run_pool(&self.ebpf, PROG_EMPTY, packets, ingress_ifindex)
    }
}

/// The maps the programs write as they judge a packet. A trace run ([`TraceRunner`]) gets
/// private copies of these, so that pushing a synthesized frame through the real programs
/// creates no flow in the live conntrack table (no hole: a test-run SYN would otherwise admit
/// the receiver's replies to its 5-tuple) and moves no live counter. Every other map is the live,
/// pinned one, which the programs only read. A map that the programs start writing must be
/// added here (`tests/tests/trace.rs` checks that runs move no live conntrack entry, drop
/// counter, rule hit counter or event).
pub const WRITTEN_BY_PROGRAMS: [&str; 6] = [
    map_names::CONNTRACK,
    map_names::CONNTRACK6,
    map_names::DROPS,
    map_names::EVENTS,
    map_names::EVENT_LIMITS,
    map_names::RULE_HITS,
];

/// Capacity of a trace run's private conntrack table: it holds the few live entries the run may
/// look up, and what the run creates.
const TRACE_CONNTRACK_CAPACITY: u32 = 64;

/// A second load of the programs that reads the live maps but writes only private ones (see
/// [`WRITTEN_BY_PROGRAMS`]): what `verse trace --run` pushes its frame through.
pub struct TraceRunner {
    ebpf: Ebpf,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack6: HashMap<MapData, Ct6Key, CtValue>,
    drops: PerCpuArray<MapData, DropCount>,
}

impl std::fmt::Debug for TraceRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceRunner").finish_non_exhaustive()
    }
}

/// What one trace run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRunOutput {
    pub output: TestRunOutput,
    /// The reason whose (private) drop counter moved, if one did.
    pub dropped: Option<DropReason>,
}

impl Dataplane {
    /// Loads the programs again for trace runs: every map is the live one pinned under this
    /// dataplane's directory except the ones the programs write, which are made afresh (pinned
    /// under `<dir>/trace/` only for the load, then unpinned: they live as long as the runner).
    pub fn trace_runner(&self) -> Result<TraceRunner> {
        let dir = self.bpf_dir.join("trace");
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::CreateDir { path: dir.clone(), source })?;
        // Private too: the jump table, which this load fills with its own IPv6 programs
        // (writing the private maps); in the live, pinned one, that program would judge the
        // live traffic's IPv6 with the run's conntrack and counters.
        let private = || WRITTEN_BY_PROGRAMS.into_iter().chain([map_names::JUMP]);
        for name in private() {
            remove_pin(&dir.join(name))?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&self.bpf_dir);
        for name in private() {
            loader.map_pin_path(name, dir.join(name));
        }
        loader.map_max_entries(map_names::CONNTRACK, TRACE_CONNTRACK_CAPACITY);
        loader.map_max_entries(map_names::CONNTRACK6, TRACE_CONNTRACK_CAPACITY);
        // A run's new flow counts in no slot worth the memory of a full array: lookups beyond
        // this one slot find nothing, and count nothing.
        loader.map_max_entries(map_names::RULE_HITS, 1);
        let loaded = loader.load(OBJECT).map_err(|source| Error::LoadObject {
            dir: self.bpf_dir.clone(),
            source: Box::new(source),
        });
        // The private maps are held by the loaded object from here on.
        for name in private() {
            remove_pin(&dir.join(name))?;
        }
        let mut ebpf = loaded?;
        for name in JUDGES {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::LoadProgram { name, source })?;
        }
        fill_jump_table(&mut ebpf)?;
        Ok(TraceRunner {
            conntrack: take_map(&mut ebpf, map_names::CONNTRACK)?,
            conntrack6: take_map(&mut ebpf, map_names::CONNTRACK6)?,
            drops: take_map(&mut ebpf, map_names::DROPS)?,
            ebpf,
        })
    }
}

impl TraceRunner {
    /// Runs `hook` (`from_endpoint` or `from_underlay`) once on `frame` as if it arrived on
    /// `ifindex`, with the private conntrack tables holding exactly `conntrack` and
    /// `conntrack6` (the live entries the packet may hit: `VERSE_CT`'s and `VERSE_CT6`'s), and
    /// reports which drop counter moved.
    pub fn run(
        &mut self,
        hook: &str,
        frame: &[u8],
        ifindex: u32,
        conntrack: &[(CtKey, CtEntry)],
        conntrack6: &[(Ct6Key, CtEntry)],
    ) -> Result<TraceRunOutput> {
        let name = match hook {
            PROG_FROM_ENDPOINT => PROG_FROM_ENDPOINT,
            PROG_FROM_UNDERLAY => PROG_FROM_UNDERLAY,
            other => return Err(Error::TestInput(format!("no hook {other:?}"))),
        };
        refill(&mut self.conntrack, map_names::CONNTRACK, conntrack)?;
        refill(&mut self.conntrack6, map_names::CONNTRACK6, conntrack6)?;
        let before = self.drop_counts()?;
        let output = run(&self.ebpf, name, frame, ifindex, 1)?;
        let after = self.drop_counts()?;
        let dropped = DropReason::ALL
            .into_iter()
            .find(|r| after.get(r).copied().unwrap_or(0) > before.get(r).copied().unwrap_or(0));
        Ok(TraceRunOutput { output, dropped })
    }

    /// Packets dropped by reason, at either hook, in the private counters.
    fn drop_counts(&self) -> Result<BTreeMap<DropReason, u64>> {
        let mut out = BTreeMap::new();
        for reason in DropReason::ALL {
            let mut sum = 0u64;
            for hook in Hook::ALL {
                let per_cpu = self
                    .drops
                    .get(&drop_slot(reason, hook), 0)
                    .map_err(read_err(map_names::DROPS))?;
                sum = per_cpu.iter().fold(sum, |a, c| a.wrapping_add(c.packets));
            }
            out.insert(reason, sum);
        }
        Ok(out)
    }
}

/// Empties a trace run's private conntrack table `name` and writes `entries` into it.
fn refill<K: FlowKey + std::fmt::Debug>(
    table: &mut HashMap<MapData, K, CtValue>,
    name: &'static str,
    entries: &[(K, CtEntry)],
) -> Result<()> {
    let keys: Vec<K> = table.keys().collect::<Result<_, _>>().map_err(read_err(name))?;
    for key in keys {
        remove_ok_if_absent(table.remove(&key)).map_err(|source| Error::MapDelete {
            name,
            entry: format!("{key:?}"),
            source,
        })?;
    }
    for (key, entry) in entries {
        let value = CtValue { entry: *entry, ..CtValue::default() };
        table.insert(key, value, 0).map_err(|source| Error::MapWrite {
            name,
            entry: format!("{key:?}"),
            source,
        })?;
    }
    Ok(())
}

/// Whether the endpoint behind `ifindex` lives in `VERSE_EP_SLOTS` (else in `VERSE_ENDPOINTS`).
fn has_slot(ifindex: u32, endpoint: &Endpoint) -> bool {
    ifindex < capacity::ENDPOINT_SLOTS && endpoint.vni != 0
}

/// The epoch in the pin of an older daemon's epoch map ([`map_names::LEGACY_EPOCH`], at `path`).
fn legacy_epoch(path: &Path) -> Result<u32> {
    let read = read_err(map_names::LEGACY_EPOCH);
    let map =
        aya::maps::Map::from_map_data(MapData::from_pin(path).map_err(&read)?).map_err(&read)?;
    let epoch: Array<MapData, u32> = Array::try_from(map).map_err(&read)?;
    epoch.get(&0, 0).map_err(read)
}

fn read_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::MapRead { name, source }
}

/// A removal of an entry that is already gone (say, reclaimed by a concurrent writer) is done.
fn remove_ok_if_absent(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// The layout of a map as the kernel describes it: type, key and value size, capacity, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `BPF_MAP_TYPE_*` (include/uapi/linux/bpf.h) of the maps this dataplane has.
        let kind = match self.map_type {
            1 => "hash",
            2 => "array",
            5 => "per-CPU hash",
            6 => "per-CPU array",
            9 => "LRU hash",
            11 => "LPM trie",
            27 => "ring buffer",
            _ => "type",
        };
        write!(
            f,
            "{kind} ({}), key {} bytes, value {} bytes, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Refuses to start over a map pinned under `bpf_dir` whose layout differs from this build's
/// map of the same name ([`Error::PinnedLayout`]). aya reuses a pinned map by name without
/// comparing it, so an upgrade that changed a map would otherwise run this build's programs
/// and daemon against the old map: refused by the verifier with a message that names no map
/// (a value grew), or, worse, accepted (a hash where an array is now expected).
fn check_pinned_layouts(bpf_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| Error::ParseObject(e.to_string()))?;
    for (name, map) in &object.maps {
        if !matches!(map.pinning(), aya_obj::maps::PinningType::ByName) {
            continue;
        }
        let path = bpf_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|source| Error::InspectPin { path: path.clone(), source })?;
        let pinned = Layout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        let expected = Layout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        };
        if pinned != expected {
            return Err(Error::PinnedLayout {
                name: name.clone(),
                path,
                pinned: pinned.to_string(),
                expected: expected.to_string(),
            });
        }
    }
    Ok(())
}

/// The programs that judge packets: the hooks and the programs they tail-call, loaded by
/// every load (the tail-called ones first: they fill the jump table before a hook is attached).
const JUDGES: [&str; 5] =
    [PROG_FROM_ENDPOINT6, PROG_ND6, PROG_FROM_UNDERLAY6, PROG_FROM_ENDPOINT, PROG_FROM_UNDERLAY];

/// Puts the tail-called programs (loaded) into their slots of `VERSE_JUMP`
/// (`dataplane_common::jump`: `from_endpoint6`, `nd6`, `from_underlay6`), where the hooks
/// tail-call them: before any program is attached, so that no frame meets an empty slot.
fn fill_jump_table(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for (slot, name) in jump::PROGRAMS {
        let fd = classifier(ebpf, name)?
            .fd()
            .map_err(|source| Error::LoadProgram { name, source })?
            .try_clone()
            .map_err(|e| Error::LoadProgram { name, source: ProgramError::IOError(e) })?;
        fds.push((slot, fd));
    }
    let map = ebpf.map_mut(map_names::JUMP).ok_or(Error::MissingMap(map_names::JUMP))?;
    let mut table = ProgramArray::try_from(map)
        .map_err(|source| Error::MapType { name: map_names::JUMP, source })?;
    for (slot, fd) in &fds {
        table.set(*slot, fd, 0).map_err(|source| Error::MapWrite {
            name: map_names::JUMP,
            entry: format!("slot {slot}"),
            source,
        })?;
    }
    Ok(())
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    M::try_from(map).map_err(|source| Error::MapType { name, source })
}

fn classifier_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into().map_err(|source| Error::ProgramType { name, source })
}

fn classifier<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a SchedClassifier> {
    let prog = ebpf.program(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into().map_err(|source| Error::ProgramType { name, source })
}

/// Offset of `ifindex` in `struct __sk_buff` (`include/uapi/linux/bpf.h`: eleven `__u32`
/// fields precede it). `BPF_PROG_TEST_RUN` accepts a shorter context than the whole struct and
/// zero-fills the rest; of these fields it only allows `mark`, `priority`, `ingress_ifindex`
/// and `ifindex` to be non-zero (`convert___skb_to_skb` in `net/bpf/test_run.c`).
const SKB_IFINDEX_OFFSET: usize = 40;

/// Offset of `cb` (five `__u32`) in `struct __sk_buff`, after `ifindex` and `tc_index`; the
/// kernel allows it non-zero too, and hands it to a TC program as the skb's control block.
const SKB_CB_OFFSET: usize = 48;

/// The context of a test run from `ifindex`: up to `ifindex`, or with `handed` up to `cb`,
/// whose words 0 and 1 then hold it as `from_endpoint` hands a sender's serial over.
fn skb_ctx(ifindex: u32, handed: Option<u64>) -> Vec<u8> {
    let mut ctx = vec![0u8; SKB_IFINDEX_OFFSET + 4];
    ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
    if let Some(serial) = handed {
        ctx.resize(SKB_CB_OFFSET + 20, 0);
        ctx[SKB_CB_OFFSET..SKB_CB_OFFSET + 4].copy_from_slice(&(serial as u32).to_ne_bytes());
        let high = (serial >> 32) as u32;
        ctx[SKB_CB_OFFSET + 4..SKB_CB_OFFSET + 8].copy_from_slice(&high.to_ne_bytes());
    }
    ctx
}

fn run(
    ebpf: &Ebpf,
    name: &'static str,
    packet: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<TestRunOutput> {
    run_handed(ebpf, name, packet, (ifindex, None), repeat)
}

/// [`run`] from `ifindex` with the control block of [`skb_ctx`].
fn run_handed(
    ebpf: &Ebpf,
    name: &'static str,
    packet: &[u8],
    (ifindex, handed): (u32, Option<u64>),
    repeat: u32,
) -> Result<TestRunOutput> {
    // The kernel builds the skb with eth_type_trans and refuses shorter input.
    if packet.len() < 14 {
        return Err(Error::TestInput(format!(
            "a {}-byte packet is shorter than an Ethernet header",
            packet.len()
        )));
    }
    if ifindex <= 1 {
        return Err(Error::TestInput(format!(
            "ifindex {ifindex} names no device the kernel would use (must be > 1)"
        )));
    }
    let prog = classifier(ebpf, name)?;
    let ctx = skb_ctx(ifindex, handed);
    // `from_endpoint` grows a packet by the encapsulation (50 bytes) at most; an ICMP error it
    // makes instead is shorter than any packet that needs one.
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        })
        .map_err(|source| Error::TestRun { name, source })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        return_code: result.return_value,
        packet: out,
        duration_ns: u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX),
    })
}

fn run_pool(
    ebpf: &Ebpf,
    name: &'static str,
    packets: &[Vec<u8>],
    ifindex: u32,
) -> Result<PoolRunOutput> {
    let mut out = PoolRunOutput::default();
    let mut total_ns: u128 = 0;
    for packet in packets {
        let r = run(ebpf, name, packet, ifindex, 1)?;
        total_ns += u128::from(r.duration_ns);
        out.runs += 1;
        *out.return_codes.entry(r.return_code).or_default() += 1;
    }
    if out.runs > 0 {
        out.mean_ns = total_ns as f64 / out.runs as f64;
    }
    Ok(out)
}

/// Attaches `program` at TCX ingress of `iface` with its link pinned at `path` (see
/// [`Dataplane::attach_endpoint`] for the idempotence).
fn attach_pinned(ebpf: &mut Ebpf, program: &'static str, iface: &str, path: &Path) -> Result<()> {
    let ifindex = ifindex(iface)?;
    if path.exists() {
        if pinned_tcx_ifindex(path)? == Some(ifindex) {
            let pinned = PinnedLink::from_pin(path)
                .map_err(|source| Error::OpenLink { path: path.to_path_buf(), source })?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|source| Error::TakeLink { iface: iface.into(), source })?;
            let prog = classifier_mut(ebpf, program)?;
            let id = prog
                .attach_to_link(link)
                .map_err(|source| Error::UpdateLink { iface: iface.into(), source })?;
            // The pin holds the link; our descriptor can go.
            let _link = prog
                .take_link(id)
                .map_err(|source| Error::UpdateLink { iface: iface.into(), source })?;
            return Ok(());
        }
        remove_pin(path)?;
    }
    let prog = classifier_mut(ebpf, program)?;
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| Error::Attach { program, iface: iface.into(), source })?;
    let link = prog.take_link(id).map_err(|source| Error::Attach {
        program,
        iface: iface.into(),
        source,
    })?;
    let link =
        FdLink::try_from(link).map_err(|source| Error::TakeLink { iface: iface.into(), source })?;
    link.pin(path).map_err(|source| Error::PinLink {
        iface: iface.into(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Removes a pinned link (detaching it unless someone else holds it). Idempotent.
fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Unpin { path: path.to_path_buf(), source }),
    }
}

/// Names of the pins in `dir`, sorted.
fn pins_in(dir: &Path) -> Result<Vec<String>> {
    let readdir = |source| Error::InspectLink { path: dir.to_path_buf(), call: "readdir", source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(readdir)? {
        out.push(entry.map_err(readdir)?.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

fn ifindex(iface: &str) -> Result<u32> {
    let name = CString::new(iface).map_err(|e| Error::Interface {
        iface: iface.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(Error::Interface { iface: iface.into(), source: io::Error::last_os_error() });
    }
    Ok(index)
}

/// Makes `dir` a bpffs mount point: creates it if missing and mounts a bpffs there unless one
/// is already mounted ([`is_bpffs`]).
fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|source| Error::CreateDir { path: dir.to_path_buf(), source })?;
    if is_bpffs(dir).map_err(|source| Error::Statfs { path: dir.to_path_buf(), source })? {
        return Ok(());
    }
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|e| Error::Statfs {
        path: dir.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let fstype = c"bpf";
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(Error::Mount { path: dir.to_path_buf(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Whether a bpffs is mounted at `dir`: the one check, by `statfs` magic rather than by parsing
/// mount tables (an error when `dir` cannot be asked, e.g. does not exist).
pub fn is_bpffs(dir: &Path) -> io::Result<bool> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid, writable statfs.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// `bpf(2)` commands and link constants (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_TCX: u32 = 11;
const BPF_TCX_INGRESS: u32 = 46;

/// The ifindex a pinned TCX ingress link is attached to: `Some(0)` once its device is gone,
/// `None` if the pin is no TCX ingress link at all.
///
/// Why raw `bpf(2)`: aya 0.14's `LinkInfo` does not expose the TCX part of `bpf_link_info`,
/// which is the only way to tell a live link from one whose interface was deleted or recreated.
fn pinned_tcx_ifindex(path: &Path) -> Result<Option<u32>> {
    let inspect = |call: &'static str| {
        let source = io::Error::last_os_error();
        Error::InspectLink { path: path.to_path_buf(), call, source }
    };
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| Error::InspectLink {
        path: path.to_path_buf(),
        call: "BPF_OBJ_GET",
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;

    // union bpf_attr, BPF_OBJ_GET member: pathname, bpf_fd, file_flags, path_fd.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let attr =
        ObjGet { pathname: cpath.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_OBJ_GET (the kernel zero-fills
    // the rest) and `cpath` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(inspect("BPF_OBJ_GET"));
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };

    // struct bpf_link_info: type, id, prog_id, (pad), then the per-type union; for TCX the
    // union starts with ifindex, attach_type. A shorter buffer than the kernel's struct is
    // allowed; the kernel fills what fits.
    let mut info = [0u32; 8];
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD; `info` is
    // writable for `info_len` bytes and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFd,
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(inspect("BPF_OBJ_GET_INFO_BY_FD"));
    }
    if info[0] != BPF_LINK_TYPE_TCX || info[5] != BPF_TCX_INGRESS {
        return Ok(None);
    }
    Ok(Some(info[4]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skb_ctx_puts_ifindex_where_the_kernel_reads_it() {
        let ctx = skb_ctx(0x0102_0304, None);
        assert_eq!(ctx.len(), 44);
        assert!(ctx[..40].iter().all(|b| *b == 0));
        assert_eq!(u32::from_ne_bytes([ctx[40], ctx[41], ctx[42], ctx[43]]), 0x0102_0304);
        // The serial in cb[0] (low word) and cb[1], the rest of cb and tc_index zero.
        let ctx = skb_ctx(0x0102_0304, Some(0x0506_0708_090a_0b0c));
        assert_eq!((ctx.len(), &ctx[..44]), (68, &skb_ctx(0x0102_0304, None)[..]));
        assert!(ctx[44..48].iter().chain(&ctx[56..]).all(|b| *b == 0));
        assert_eq!(u32::from_ne_bytes([ctx[48], ctx[49], ctx[50], ctx[51]]), 0x090a_0b0c);
        assert_eq!(u32::from_ne_bytes([ctx[52], ctx[53], ctx[54], ctx[55]]), 0x0506_0708);
    }

    #[test]
    fn a_map_error_says_what_the_kernel_answered() {
        let e = Error::MapWrite {
            name: map_names::POLICY,
            entry: "an entry".into(),
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: io::Error::from_raw_os_error(libc::ENOMEM),
            }),
        };
        let text = e.to_string();
        assert!(text.starts_with("writing an entry into map VERSE_POLICY failed: "), "{text}");
        assert!(text.contains("bpf_map_update_elem"), "{text}");
        assert!(text.contains(&io::Error::from_raw_os_error(libc::ENOMEM).to_string()), "{text}");
    }

    #[test]
    fn the_embedded_object_is_an_ebpf_elf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine = EM_BPF (247), little endian.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
