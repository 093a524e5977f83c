//! The rule compiler: desired state -> the entries of this host's dataplane maps. Pure.
//!
//! Contract: [`compile`] is deterministic for a given state, host and CIDR-id allocator, and its
//! output is exactly what the maps must hold (the reconciler writes the difference). Per-packet
//! cost stays constant however many rules there are: every rule becomes LPM entries keyed by
//! (identity, direction, peer, protocol, port prefix) — see `dataplane_common::PolicyKey`.
//!
//! Peers: a group peer matches every identity whose set of groups contains that group (S5); a
//! CIDR peer matches every *CIDR class* nested in it. CIDR classes are the distinct rule CIDRs of
//! a universe, found by longest match in `VERSE_CIDRS`; since CIDRs nest or are disjoint, the
//! longest match of an address determines every rule CIDR that contains it, so expanding a rule
//! over the classes nested in its CIDR keeps the union of S1 exact. `0.0.0.0/0` is the `ANY`
//! peer and needs no expansion.
//!
//! IPv6 (issue 13): a universe with IPv6 CIDRs gets a second, separate compilation for the
//! packets whose peer is an IPv6 address ([`Ipv6Contents`]): its endpoints' IPv6 addresses as
//! routes, its IPv6 rule CIDRs as CIDR classes of their own, and policy entries under the IPv6
//! directions (`dataplane_common::DIRECTION_IPV6`). A rule matches in one family only: an IPv4
//! CIDR (`0.0.0.0/0` included) and `icmp` IPv4 peers, an IPv6 CIDR (`::/0` included) and
//! `icmpv6` IPv6 peers; a group peer, `all`, TCP, UDP and other protocol numbers match in both.
//! The IPv4 contents are exactly what they would be without any IPv6 rule or address, but for
//! the endpoint records, which carry the endpoint's IPv6 address (`dp::Endpoint::ip6`): its
//! IPv6 source check. [`MapContents::ipv6`] goes to `VERSE_ROUTES6`, `VERSE_CIDRS6` and the one
//! `VERSE_POLICY` trie. A universe without IPv6 CIDRs compiles no IPv6 contents: there its IPv6
//! rules match nothing.
//!
//! CIDR classes are numbered by [`CidrIds`]: an id stays with its
//! CIDR for as long as some rule of the universe has it, and an id freed by one compile is not
//! handed out again by the same compile (the reconciler adds before it removes, so a reused id
//! would briefly give a new class the rules of an old one).
//!
//! Rules are given counter slots of `VERSE_RULE_HITS` by [`RuleSlots`], under the same
//! discipline and for the same reason (see `dataplane_common::rule_slots`): a rule keeps its
//! slot while some policy entry of the host names it, and a slot freed by one compile waits for
//! the next. Both numberings travel together in [`Ids`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dataplane_common as dp;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use crate::model::{self, Peer, Protocol, State};

/// The contents the dataplane maps must have on one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// `VERSE_ENDPOINTS`: host-side ifindex -> endpoint.
    pub endpoints: BTreeMap<u32, dp::Endpoint>,
    /// `VERSE_ROUTES`.
    pub routes: BTreeMap<dp::RouteKey, dp::Route>,
    /// `VERSE_CIDRS`: (prefix length, key) -> CIDR class peer value (`peer::CIDR_FLAG | n`).
    pub cidrs: BTreeMap<(u32, dp::CidrKey), u32>,
    /// `VERSE_POLICY`: (prefix length, key) -> the rule it came from; presence allows.
    pub policy: BTreeMap<(u32, dp::PolicyKey), dp::PolicyValue>,
    /// `VERSE_POLICY_KINDS`: identity -> the kinds of peer its `policy` entries name
    /// (`dataplane_common::peer_kind`), for the identities that have entries.
    pub policy_kinds: BTreeMap<u32, u32>,
    /// `VERSE_HOSTS`: underlay address of every *other* host that holds an endpoint of a
    /// universe present here -> [`dp::HOST_KNOWN`] (the dataplane tests presence only).
    pub hosts: BTreeMap<dp::HostKey, u32>,
    /// `VERSE_VNIS`: the VNI of every universe with an endpoint here.
    pub vnis: BTreeSet<u32>,
    /// `VERSE_RULE_HITS` slots in use: slot -> the rule whose new flows it counts, for every
    /// rule the policy entries name (the slot their values carry).
    pub rules: BTreeMap<u32, u32>,
    /// `VERSE_CT_OWNERS`: slot -> the local endpoint that has it and its conntrack budget (S14).
    pub ct_owners: BTreeMap<u32, OwnerBudget>,
    /// What packets whose peer is an IPv6 address are judged by (see the module docs).
    pub ipv6: Ipv6Contents,
}

/// The contents of one host's maps for packets whose peer is an IPv6 address, for the universes
/// with IPv6 CIDRs. Endpoints, VNIs, hosts and conntrack budgets are shared with IPv4 (an
/// endpoint is one interface, one identity and one budget whatever its addresses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipv6Contents {
    /// `VERSE_ROUTES6`: the IPv6 address of every endpoint that has one, local or remote, with
    /// the same value as its IPv4 route.
    pub routes: BTreeMap<dp::Route6Key, dp::Route>,
    /// `VERSE_CIDRS6`: (prefix length, key) -> IPv6 CIDR class peer value (`CIDR_FLAG | n`).
    pub cidrs: BTreeMap<(u32, dp::Cidr6Key), u32>,
    /// `VERSE_POLICY` entries for IPv6 peers (direction + `DIRECTION_IPV6`). Each names its
    /// rule; the slot is the rule's IPv4 slot when it has one, else 0: the new IPv6 flows of a
    /// rule with IPv4 entries are counted, those of a rule with IPv6 entries only are not
    /// (slots are numbered by the IPv4 entries, which must not change with IPv6).
    pub policy: BTreeMap<(u32, dp::PolicyKey), dp::PolicyValue>,
    /// `VERSE_POLICY_KINDS` bits of those entries (bits 16 to 31, `peer_kind::bit`).
    pub policy_kinds: BTreeMap<u32, u32>,
}

/// The address family of a packet's peer: which rule CIDRs and protocols can match it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A slot of `VERSE_CT_OWNERS` as the controller writes it (the counters in it are the
/// dataplane's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnerBudget {
    /// `model::Endpoint::serial` of the endpoint that has the slot.
    pub serial: u64,
    /// Its `conntrack_budget`.
    pub budget: u64,
}

impl MapContents {
    /// Entries held, over every map the reconciler writes (`VERSE_CT_OWNERS` aside, one per
    /// local endpoint like `VERSE_ENDPOINTS`).
    pub fn entries(&self) -> usize {
        self.endpoints.len()
            + self.routes.len()
            + self.cidrs.len()
            + self.policy.len()
            + self.kinds_identities().len()
            + self.hosts.len()
            + self.vnis.len()
            + self.rules.len()
            + self.ipv6.routes.len()
            + self.ipv6.cidrs.len()
            + self.ipv6.policy.len()
    }

    /// The `VERSE_POLICY_KINDS` value of `identity`: the kinds of its entries of both families
    /// (IPv4 in bits 0-15, IPv6 in bits 16-31).
    pub fn kinds(&self, identity: u32) -> u32 {
        let of = |m: &BTreeMap<u32, u32>| m.get(&identity).copied().unwrap_or(0);
        of(&self.policy_kinds) | of(&self.ipv6.policy_kinds)
    }

    /// The identities with kinds in either family.
    pub fn kinds_identities(&self) -> BTreeSet<u32> {
        self.policy_kinds.keys().chain(self.ipv6.policy_kinds.keys()).copied().collect()
    }

    /// Records `kinds` (a `VERSE_POLICY_KINDS` value) for `identity`, each family's bits in its
    /// own map (none for 0): what reading the map back gives.
    pub fn set_kinds(&mut self, identity: u32, kinds: u32) {
        for (map, bits) in [
            (&mut self.policy_kinds, kinds & 0xFFFF),
            (&mut self.ipv6.policy_kinds, kinds & !0xFFFF),
        ] {
            if bits == 0 {
                map.remove(&identity);
            } else {
                map.insert(identity, bits);
            }
        }
    }

    /// Records a `VERSE_POLICY` entry read back from the map, under its family (an IPv6
    /// direction's entries in `ipv6.policy`).
    pub fn insert_policy(&mut self, len: u32, key: dp::PolicyKey, value: dp::PolicyValue) {
        let map = if key.direction >= dp::DIRECTION_IPV6 {
            &mut self.ipv6.policy
        } else {
            &mut self.policy
        };
        map.insert((len, key), value);
    }

    /// The serials of every endpoint the maps name (local endpoints and routes): the endpoints
    /// whose conntrack entries may stay (see `reconcile`).
    pub fn serials(&self) -> BTreeSet<u64> {
        self.endpoints
            .values()
            .map(|e| e.serial)
            .chain(self.routes.values().map(|r| r.serial))
            .collect()
    }
}

/// A stable numbering of keys by small ids (from 1, below a bound), the one discipline of
/// [`CidrIds`] and [`RuleSlots`]: a key keeps its id for as long as it is wanted, a new key takes
/// the smallest id that neither the old nor the new numbering holds, and an id freed by one
/// renumbering is not handed out again before the next (see the module docs for why).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StableIds<K> {
    pub ids: BTreeMap<K, u32>,
}

impl<K> Default for StableIds<K> {
    fn default() -> Self {
        StableIds { ids: BTreeMap::new() }
    }
}

/// Stable numbering of CIDR classes ((vni, CIDR) -> id), so that an edit renumbers nothing. The
/// reconciler seeds it from what `VERSE_CIDRS` holds at start.
pub type CidrIds = StableIds<(u32, Ipv4Network)>;

/// The same for IPv6 CIDR classes ((vni, IPv6 CIDR) -> id), a numbering of its own: a class is
/// looked up by packets of its family only. The reconciler seeds it from `VERSE_CIDRS6`.
pub type CidrIds6 = StableIds<(u32, Ipv6Network)>;

/// Stable `VERSE_RULE_HITS` slots of the rules a host's policy entries name (rule id -> slot),
/// so that a rule's count stays in its slot while it exists on the host and a reused slot never
/// mixes two rules' counts. The reconciler seeds it from the values of `VERSE_POLICY` at start.
pub type RuleSlots = StableIds<u32>;

/// The stable numberings [`compile`] keeps from one compile to the next.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    pub cidrs: CidrIds,
    pub rule_slots: RuleSlots,
    pub cidrs6: CidrIds6,
}

/// Compiles `state` for `host`. `ifindex` gives the host-side ifindex of a local endpoint, or
/// `None` while it is not plumbed (it is then left out). Fails with a 409 `limit_exceeded` when
/// the result would not fit the map capacities of `dataplane_common::capacity` (S12).
///
/// On success `ids` holds the numberings of the result; on failure they are left unchanged.
pub fn compile(
    state: &State,
    host: &str,
    ifindex: &dyn Fn(&model::Endpoint) -> Option<u32>,
    ids: &mut Ids,
) -> model::Result<MapContents> {
    let state = &*state.indexed();
    let mut desired = MapContents::default();

    // Local, plumbed endpoints: the keys of VERSE_ENDPOINTS and the routes between them.
    let mut local_identities = BTreeSet::new();
    let mut local_universes = BTreeSet::new();
    let mut slots = Vec::new();
    let local = state.idx.host_endpoints.get(host);
    for ep in local.into_iter().flatten().filter_map(|id| state.endpoints.get(id)) {
        let (Some(index), Some(universe)) = (ifindex(ep), state.universes.get(&ep.universe)) else {
            continue;
        };
        let mac = endpoint_mac(ep)?;
        let ip = ep.ip.octets();
        let slot = ep.slot;
        slots.push((
            slot,
            ep,
            OwnerBudget { serial: ep.serial, budget: u64::from(ep.conntrack_budget) },
        ));
        desired.endpoints.insert(
            index,
            dp::Endpoint {
                ip,
                mac,
                _pad: [0; 2],
                vni: universe.vni,
                identity: ep.identity,
                slot,
                serial: ep.serial,
                ip6: ep.ipv6.map_or([0; 16], |a| a.octets()),
                gateway6: ep
                    .ipv6
                    .and_then(|a| model::gateway6(universe, a))
                    .map_or([0; 16], |g| g.octets()),
            },
        );
        let route = dp::Route {
            ifindex: index,
            identity: ep.identity,
            mac,
            _pad: [0; 2],
            underlay: [0; 4],
            slot,
            serial: ep.serial,
        };
        desired.routes.insert(dp::RouteKey { vni: universe.vni, ip }, route);
        if let Some(ip6) = ep.ipv6 {
            desired.ipv6.routes.insert(dp::Route6Key::new(universe.vni, ip6.octets()), route);
        }
        local_identities.insert(ep.identity);
        local_universes.insert(universe.id.as_str());
    }
    fits(host, dp::map_names::ENDPOINTS, desired.endpoints.len(), dp::capacity::ENDPOINTS)?;
    // The model gives every endpoint of a host its own slot; a state that does not (corrupt)
    // would mix two endpoints' budgets, so it is refused.
    for (slot, ep, owner) in slots {
        let taken = desired.ct_owners.insert(slot, owner).is_some();
        if taken || !(1..=dp::capacity::ENDPOINTS).contains(&slot) {
            return Err(model::Error::invalid(
                "slot",
                format!(
                    "endpoint {} has slot {slot}, not one of its own in 1..={} on host {host}",
                    ep.id,
                    dp::capacity::ENDPOINTS
                ),
            ));
        }
    }

    // Only the universes present here: a host holds the routes its endpoints can use, and knows
    // only the other hosts that hold an endpoint of one of them: reached through the underlay,
    // the only senders of encapsulated traffic it accepts, and the only sources each may claim
    // (S10). What it holds grows with its own endpoints' universes, not with the fleet. A host
    // without an underlay address is unreachable, so its endpoints get no route.
    let remote: Vec<&model::Endpoint> = local_universes
        .iter()
        .filter_map(|u| state.idx.universe_endpoints.get(*u))
        .flatten()
        .filter_map(|id| state.endpoints.get(id))
        .filter(|e| e.host != host)
        .collect();
    let mut underlays: HashMap<&str, [u8; 4]> = HashMap::new();
    for ep in &remote {
        if underlays.contains_key(ep.host.as_str()) {
            continue;
        }
        let Some(ip) = state.hosts.get(&ep.host).and_then(|r| r.underlay_ip) else { continue };
        underlays.insert(ep.host.as_str(), ip.octets());
        desired.hosts.insert(ip.octets(), dp::HOST_KNOWN);
    }
    fits(host, dp::map_names::HOSTS, desired.hosts.len(), dp::capacity::HOSTS)?;
    for ep in remote {
        let (Some(&underlay), Some(universe)) =
            (underlays.get(ep.host.as_str()), state.universes.get(&ep.universe))
        else {
            continue;
        };
        let mac = endpoint_mac(ep)?;
        let route = dp::Route {
            ifindex: 0,
            identity: ep.identity,
            mac,
            _pad: [0; 2],
            underlay,
            slot: 0,
            serial: ep.serial,
        };
        // An address taken by a local endpoint stays local: the model refuses duplicates, so
        // this only guards against a corrupt state sending local traffic away.
        let key = dp::RouteKey { vni: universe.vni, ip: ep.ip.octets() };
        desired.routes.entry(key).or_insert(route);
        if let Some(ip6) = ep.ipv6 {
            let key = dp::Route6Key::new(universe.vni, ip6.octets());
            desired.ipv6.routes.entry(key).or_insert(route);
        }
    }
    fits(host, dp::map_names::ROUTES, desired.routes.len(), dp::capacity::ROUTES)?;
    fits(host, dp::map_names::ROUTES6, desired.ipv6.routes.len(), dp::capacity::ROUTES6)?;
    desired.vnis =
        local_universes.iter().filter_map(|u| state.universes.get(*u)).map(|u| u.vni).collect();
    fits(host, dp::map_names::VNIS, desired.vnis.len(), dp::capacity::VNIS)?;

    // CIDR classes of the universes present here.
    let mut wanted = BTreeSet::new();
    let mut wanted6 = BTreeSet::new();
    let local_groups = local_universes
        .iter()
        .filter_map(|u| state.idx.universe_groups.get(*u))
        .flatten()
        .filter_map(|g| state.groups.get(g));
    for group in local_groups {
        let Some(universe) = state.universes.get(&group.universe) else { continue };
        for rule in group.ingress.iter().chain(&group.egress) {
            if let Some(cidr) = class_cidr(rule) {
                wanted.insert((universe.vni, cidr));
            }
            if let Some(cidr) = class_cidr6(rule).filter(|_| !universe.ipv6_cidrs.is_empty()) {
                wanted6.insert((universe.vni, cidr));
            }
        }
    }
    let numbered = ids.cidrs.renumber(&wanted)?;
    fits(host, dp::map_names::CIDRS, numbered.ids.len(), dp::capacity::CIDRS)?;
    // Per universe, classes ordered by (network, prefix): the classes nested in a rule CIDR are
    // a contiguous range of networks, so expansion is a range scan, not a search of all.
    let mut nested: BTreeMap<u32, BTreeMap<(u32, u8), u32>> = BTreeMap::new();
    for (&(vni, cidr), &id) in &numbered.ids {
        desired.cidrs.insert(
            dp::CidrKey::encode(vni, cidr.network().octets(), cidr.prefix()),
            dp::peer::CIDR_FLAG | id,
        );
        nested.entry(vni).or_default().insert((u32::from(cidr.network()), cidr.prefix()), id);
    }
    let numbered6 = ids.cidrs6.renumber(&wanted6)?;
    fits(host, dp::map_names::CIDRS6, numbered6.ids.len(), dp::capacity::CIDRS6)?;
    let mut nested6: BTreeMap<u32, BTreeMap<(u128, u8), u32>> = BTreeMap::new();
    for (&(vni, cidr), &id) in &numbered6.ids {
        desired.ipv6.cidrs.insert(
            dp::Cidr6Key::encode(vni, cidr.network().octets(), cidr.prefix()),
            dp::peer::CIDR_FLAG | id,
        );
        nested6.entry(vni).or_default().insert((u128::from(cidr.network()), cidr.prefix()), id);
    }

    // Group peers (S5): the identities whose sets of groups contain the group (indexed).
    let members = &state.idx.group_identities;

    let mut policy = PolicyEntries::new(host);
    let mut policy6 = PolicyEntries::new(host);
    let mut peers = Vec::new();
    let mut matches = Vec::new();
    let no_classes = BTreeMap::new();
    let no_classes6 = BTreeMap::new();
    for &local in &local_identities {
        let Some(identity) = state.identities.get(&local) else { continue };
        let Some(universe) = state.universes.get(&identity.universe) else { continue };
        let classes = nested.get(&universe.vni).unwrap_or(&no_classes);
        let classes6 = nested6.get(&universe.vni).unwrap_or(&no_classes6);
        let families: &[Family] =
            if universe.ipv6_cidrs.is_empty() { &[Family::V4] } else { &[Family::V4, Family::V6] };
        for (direction, rule) in identity_rules(state, &universe.id, &identity.groups) {
            // A rule id that is no `sgr-` id (a corrupt state) allows without a name.
            // The slot is given once the entries are known (below).
            let id = model::rule_bits(&rule.id).unwrap_or(0);
            let value = dp::PolicyValue { rule: id, slot: 0 };
            for &family in families {
                peers.clear();
                matches.clear();
                let (entries, direction) = match family {
                    Family::V4 => {
                        rule_peers(rule, members, classes, &mut peers);
                        (&mut policy, direction)
                    }
                    Family::V6 => {
                        rule_peers6(rule, members, classes6, &mut peers);
                        (&mut policy6, direction + dp::DIRECTION_IPV6)
                    }
                };
                rule_matches(rule, family, &mut matches);
                for &peer in &peers {
                    for &(prefix, proto, port) in &matches {
                        entries.push(
                            prefix,
                            dp::PolicyKey {
                                identity: local.to_be_bytes(),
                                direction,
                                peer: peer.to_be_bytes(),
                                proto,
                                port: port.to_be_bytes(),
                            },
                            value,
                        )?;
                    }
                }
            }
        }
    }
    desired.policy = policy.finish()?;
    desired.policy_kinds = policy_kinds(&desired.policy);
    desired.ipv6.policy = policy6.finish()?;
    desired.ipv6.policy_kinds = policy_kinds(&desired.ipv6.policy);
    // One trie will hold both families' entries.
    let both = desired.policy.len() + desired.ipv6.policy.len();
    fits(host, dp::map_names::POLICY, both, dp::capacity::POLICY)?;
    // Slots for the rules that kept an entry of either family (a rule whose every entry another
    // rule names first counts nothing, and needs no slot; a rule that admits only IPv6, `::/0`
    // or `icmpv6`, has IPv6 entries only).
    let named: BTreeSet<u32> = desired
        .policy
        .values()
        .chain(desired.ipv6.policy.values())
        .map(|v| v.rule)
        .filter(|r| *r != 0)
        .collect();
    fits_rules(host, named.len())?;
    let slots = ids.rule_slots.renumber(&named)?;
    for value in desired.policy.values_mut() {
        value.slot = slots.ids.get(&value.rule).copied().unwrap_or(0);
    }
    for value in desired.ipv6.policy.values_mut() {
        value.slot = slots.ids.get(&value.rule).copied().unwrap_or(0);
    }
    desired.rules = slots.ids.iter().map(|(&rule, &slot)| (slot, rule)).collect();
    ids.cidrs = numbered;
    ids.cidrs6 = numbered6;
    ids.rule_slots = slots;
    Ok(desired)
}

/// The MAC of `ep`, local or remote. The model stores only well-formed ones: a malformed one
/// is a corrupt state, refused naming the field rather than compiled into the maps.
fn endpoint_mac(ep: &model::Endpoint) -> model::Result<[u8; 6]> {
    model::parse_mac(&ep.mac).ok_or_else(|| {
        model::Error::invalid("mac", format!("endpoint {} has a malformed MAC {:?}", ep.id, ep.mac))
    })
}

/// The rules that apply to an identity of `universe` with `groups`, each with the direction it
/// matches in: the ingress then the egress rules of each of its groups (a group of another
/// universe, which only a corrupt state holds, gives none).
pub(crate) fn identity_rules<'a>(
    state: &'a State,
    universe: &'a str,
    groups: &'a [String],
) -> impl Iterator<Item = (u8, &'a model::Rule)> + 'a {
    let groups = groups.iter().filter_map(|g| state.groups.get(g));
    groups.filter(move |g| g.universe == universe).flat_map(|g| {
        let ingress = g.ingress.iter().map(|r| (dp::DIRECTION_INGRESS, r));
        ingress.chain(g.egress.iter().map(|r| (dp::DIRECTION_EGRESS, r)))
    })
}

/// The `VERSE_POLICY_KINDS` values of `policy`'s entries: per identity, the kinds of peer they
/// name, per direction (the IPv6 directions in the upper bits).
pub fn policy_kinds(
    policy: &BTreeMap<(u32, dp::PolicyKey), dp::PolicyValue>,
) -> BTreeMap<u32, u32> {
    let mut kinds = BTreeMap::new();
    for (_, key) in policy.keys() {
        let kind = dp::peer_kind::of(u32::from_be_bytes(key.peer));
        *kinds.entry(u32::from_be_bytes(key.identity)).or_insert(0) |=
            dp::peer_kind::bit(key.direction, kind);
    }
    kinds
}

/// The `VERSE_POLICY_KINDS` writes an apply from `current` to `desired` makes before it writes
/// any policy entry: for every identity whose kinds grow, the union of both (see
/// `dataplane_common::peer_kind`: the map stays a superset of the entries' kinds).
pub fn policy_kinds_before(current: &MapContents, desired: &MapContents) -> Vec<(u32, u32)> {
    desired
        .kinds_identities()
        .into_iter()
        .map(|identity| (identity, current.kinds(identity), desired.kinds(identity)))
        .map(|(identity, now, want)| (identity, now, now | want))
        .filter(|&(_, now, union)| union != now)
        .map(|(identity, _, union)| (identity, union))
        .collect()
}

/// The writes the same apply makes once the removed policy entries are gone: every identity
/// whose kinds the union left wider than `desired`'s gets exactly those (0: none).
pub fn policy_kinds_after(current: &MapContents, desired: &MapContents) -> Vec<(u32, u32)> {
    let mut identities = current.kinds_identities();
    identities.extend(desired.kinds_identities());
    identities
        .into_iter()
        .map(|identity| (identity, current.kinds(identity), desired.kinds(identity)))
        .filter(|&(_, was, want)| want != was | want)
        .map(|(identity, _, want)| (identity, want))
        .collect()
}

/// S12 at the API: whether the state, compiled for every host that has endpoints, fits the
/// dataplane's maps. Every endpoint counts as plumbed; CIDR classes are numbered afresh.
pub fn check_fits(state: &State) -> model::Result<()> {
    let mut by_host: BTreeMap<&str, HashMap<&str, u32>> = BTreeMap::new();
    for ep in state.endpoints.values() {
        let indexes = by_host.entry(ep.host.as_str()).or_default();
        // Any distinct number will do: only the count of endpoints matters here.
        let next = u32::try_from(indexes.len()).unwrap_or(u32::MAX).saturating_add(1);
        indexes.insert(ep.id.as_str(), next);
    }
    for (host, indexes) in &by_host {
        let ifindex = |ep: &model::Endpoint| indexes.get(ep.id.as_str()).copied();
        compile(state, host, &ifindex, &mut Ids::default())?;
    }
    Ok(())
}

impl<K: Ord + Copy> StableIds<K> {
    /// The numbering of `wanted`: keys already numbered keep their id; new ones take the smallest
    /// id (from 1) that neither the old nor the new numbering holds; the rest are dropped. Ids
    /// stay below `end`; when none is left the error is `exhausted(ids taken)`.
    ///
    /// An id dropped here is not reused before the next renumbering: the reconciler adds entries
    /// before it removes others, so the maps still carry the dropped id for its old key meanwhile.
    fn renumber_below(
        &self,
        wanted: &BTreeSet<K>,
        end: u32,
        exhausted: impl FnOnce(usize) -> model::Error,
    ) -> model::Result<Self> {
        let mut ids = BTreeMap::new();
        let mut taken: BTreeSet<u32> = self.ids.values().copied().collect();
        let mut fresh = Vec::new();
        let mut kept = BTreeSet::new();
        for key in wanted {
            match self.ids.get(key) {
                // A seed read back from the maps could hold an id twice or out of range: such a
                // key gets a fresh id rather than a shared one.
                Some(&id) if id != 0 && id < end && kept.insert(id) => {
                    ids.insert(*key, id);
                }
                _ => fresh.push(*key),
            }
        }
        let mut next = 1u32;
        for key in fresh {
            while taken.contains(&next) {
                next += 1;
            }
            if next >= end {
                return Err(exhausted(taken.len()));
            }
            taken.insert(next);
            ids.insert(key, next);
        }
        Ok(StableIds { ids })
    }

    /// `self` (what the maps hold) plus the keys of `other` that `self` lacks, unless their id is
    /// already taken in `self`: after a failed apply, every id the maps still carry stays
    /// reserved for the key they carry it for.
    pub fn merged_with(mut self, other: &Self) -> Self {
        let taken: BTreeSet<u32> = self.ids.values().copied().collect();
        for (key, &id) in &other.ids {
            if !self.ids.contains_key(key) && !taken.contains(&id) {
                self.ids.insert(*key, id);
            }
        }
        self
    }
}

impl RuleSlots {
    /// The slots of `wanted` (rule ids, never 0), by [`StableIds`]'s discipline. A fresh slot is
    /// zeroed before use. With at most `rule_slots::MAX_RULES` rules on each side, the two
    /// numberings together always fit the array.
    pub fn renumber(&self, wanted: &BTreeSet<u32>) -> model::Result<RuleSlots> {
        self.renumber_below(wanted, dp::capacity::RULE_HITS, |taken| {
            limit(format!(
                "{} slots exhausted ({taken} in use or freed by this edit); retry once the edit \
                 that freed them is realized",
                dp::map_names::RULE_HITS,
            ))
        })
    }
}

impl CidrIds {
    /// The numbering of the CIDR classes `wanted`, by [`StableIds`]'s discipline; ids stay below
    /// `peer::CIDR_FLAG`.
    fn renumber(&self, wanted: &BTreeSet<(u32, Ipv4Network)>) -> model::Result<CidrIds> {
        self.renumber_below(wanted, dp::peer::CIDR_FLAG, |taken| {
            limit(format!("CIDR class ids exhausted ({taken} in use)"))
        })
    }
}

impl CidrIds6 {
    /// [`CidrIds::renumber`] for the IPv6 classes.
    fn renumber(&self, wanted: &BTreeSet<(u32, Ipv6Network)>) -> model::Result<CidrIds6> {
        self.renumber_below(wanted, dp::peer::CIDR_FLAG, |taken| {
            limit(format!("IPv6 CIDR class ids exhausted ({taken} in use)"))
        })
    }
}

/// The CIDR class a rule contributes: its IPv4 CIDR, canonical, unless it is /0 (the `ANY`
/// peer) or the rule has a group peer or an IPv6 CIDR.
fn class_cidr(rule: &model::Rule) -> Option<Ipv4Network> {
    match rule.peer {
        Peer::Cidr(IpNetwork::V4(c)) if c.prefix() > 0 => {
            Ipv4Network::new(c.network(), c.prefix()).ok()
        }
        _ => None,
    }
}

/// The IPv6 CIDR class a rule contributes: its IPv6 CIDR, canonical, unless it is `::/0`.
fn class_cidr6(rule: &model::Rule) -> Option<Ipv6Network> {
    match rule.peer {
        Peer::Cidr(IpNetwork::V6(c)) if c.prefix() > 0 => {
            Ipv6Network::new(c.network(), c.prefix()).ok()
        }
        _ => None,
    }
}

/// The peer values a rule matches for an IPv6 peer: identities for a group peer, `ANY` for
/// `::/0`, the IPv6 classes nested in (or equal to) its IPv6 CIDR; nothing for an IPv4 CIDR.
fn rule_peers6(
    rule: &model::Rule,
    members: &imbl::OrdMap<String, imbl::OrdSet<u32>>,
    classes: &BTreeMap<(u128, u8), u32>,
    out: &mut Vec<u32>,
) {
    match &rule.peer {
        Peer::Group(group) => {
            out.extend(members.get(group.as_str()).into_iter().flatten().copied())
        }
        Peer::Cidr(IpNetwork::V6(c)) if c.prefix() == 0 => out.push(dp::peer::ANY),
        Peer::Cidr(IpNetwork::V6(c)) => {
            let first = u128::from(c.network());
            let last = u128::from(c.broadcast());
            let nested = classes
                .range((first, 0)..=(last, 128))
                .filter(|((_, prefix), _)| *prefix >= c.prefix())
                .map(|(_, id)| dp::peer::CIDR_FLAG | id);
            out.extend(nested);
        }
        Peer::Cidr(IpNetwork::V4(_)) => {}
    }
}

/// The peer values a rule matches for an IPv4 peer: identities for a group peer, `ANY` for
/// 0.0.0.0/0, the CIDR classes nested in (or equal to) its CIDR otherwise; nothing for an IPv6
/// CIDR.
fn rule_peers(
    rule: &model::Rule,
    members: &imbl::OrdMap<String, imbl::OrdSet<u32>>,
    classes: &BTreeMap<(u32, u8), u32>,
    out: &mut Vec<u32>,
) {
    match &rule.peer {
        Peer::Group(group) => {
            out.extend(members.get(group.as_str()).into_iter().flatten().copied())
        }
        Peer::Cidr(IpNetwork::V4(c)) if c.prefix() == 0 => out.push(dp::peer::ANY),
        Peer::Cidr(IpNetwork::V4(c)) => {
            let first = u32::from(c.network());
            let last = u32::from(c.broadcast());
            let nested = classes
                .range((first, 0)..=(last, 32))
                .filter(|((_, prefix), _)| *prefix >= c.prefix())
                .map(|(_, id)| dp::peer::CIDR_FLAG | id);
            out.extend(nested);
        }
        Peer::Cidr(IpNetwork::V6(_)) => {}
    }
}

/// What a rule matches after the peer, as (prefix length, protocol, port) of `PolicyKey`, for a
/// packet of `family`: `icmp` matches IPv4 only and `icmpv6` IPv6 only (type and code alike);
/// every other protocol either.
pub(crate) fn rule_matches(rule: &model::Rule, family: Family, out: &mut Vec<(u32, u8, u16)>) {
    use dp::policy_prefix::{FULL, PEER, PROTO};
    let icmp = |proto: u8, out: &mut Vec<(u32, u8, u16)>| match rule.icmp {
        None | Some((None, _)) => out.push((PROTO, proto, 0)),
        Some((Some(t), None)) => out.push((PROTO + 8, proto, u16::from(t) << 8)),
        Some((Some(t), Some(c))) => out.push((FULL, proto, u16::from(t) << 8 | u16::from(c))),
    };
    match rule.protocol {
        Protocol::All => out.push((PEER, 0, 0)),
        p @ (Protocol::TCP | Protocol::UDP) => {
            let Protocol::Number(proto) = p else { return };
            let (from, to) = rule.ports.unwrap_or((0, u16::MAX));
            out.extend(
                port_blocks(from, to).map(|(start, bits)| (PROTO + 16 - bits, proto, start)),
            );
        }
        Protocol::ICMP if family == Family::V4 => icmp(dp::wire::IPPROTO_ICMP, out),
        Protocol::ICMPV6 if family == Family::V6 => icmp(dp::wire::IPPROTO_ICMPV6, out),
        Protocol::ICMP | Protocol::ICMPV6 => {}
        Protocol::Number(proto) => out.push((PROTO, proto, 0)),
    }
}

/// Splits `from..=to` into aligned power-of-two blocks, as (first port, log2 of the block size).
/// At most 30 blocks for any range (two per bit of the port).
pub fn port_blocks(from: u16, to: u16) -> impl Iterator<Item = (u16, u32)> {
    let mut next = u32::from(from);
    let end = u32::from(to);
    std::iter::from_fn(move || {
        if from > to || next > end {
            return None;
        }
        // The largest block aligned at `next` (its lowest set bit; 0 is aligned to everything)
        // that does not pass `end`.
        let mut bits = if next == 0 { 16 } else { next.trailing_zeros().min(16) };
        while next + (1 << bits) - 1 > end {
            bits -= 1;
        }
        let start = next as u16;
        next += 1 << bits;
        Some((start, bits))
    })
}

fn limit(message: String) -> model::Error {
    model::Error::conflict("limit_exceeded", None, message)
}

/// S12 for rule counters: a host's policy entries may name at most `rule_slots::MAX_RULES`
/// distinct rules (half the slots of `VERSE_RULE_HITS`, see `dataplane_common::rule_slots`).
pub(crate) fn fits_rules(host: &str, rules: usize) -> model::Result<()> {
    let max = dp::rule_slots::MAX_RULES;
    if rules > max as usize {
        return Err(limit(format!(
            "the compiled state of host {host} names {rules} rules, more than the {max} whose \
             new flows one host can count in {} (S12)",
            dp::map_names::RULE_HITS
        )));
    }
    Ok(())
}

fn fits(host: &str, map: &str, len: usize, capacity: u32) -> model::Result<()> {
    if len > capacity as usize {
        return Err(limit(format!(
            "the compiled state of host {host} needs {len} entries in {map}, which holds {capacity} (S12)"
        )));
    }
    Ok(())
}

/// Policy entries as they are produced: collected unsorted (rules of several groups repeat each
/// other), compacted whenever they pass twice the capacity, so memory stays bounded while a
/// state too big for the map is detected. When several rules produce the same entry, the first
/// pushed names it (`dataplane_common::PolicyValue`): compaction is a stable sort that keeps the
/// first of equal keys.
struct PolicyEntries<'a> {
    host: &'a str,
    entries: Vec<((u32, dp::PolicyKey), dp::PolicyValue)>,
}

impl<'a> PolicyEntries<'a> {
    fn new(host: &'a str) -> Self {
        PolicyEntries { host, entries: Vec::new() }
    }

    fn push(
        &mut self,
        prefix: u32,
        key: dp::PolicyKey,
        value: dp::PolicyValue,
    ) -> model::Result<()> {
        self.entries.push(((prefix, key), value));
        if self.entries.len() > 2 * dp::capacity::POLICY as usize {
            self.compact();
            fits(self.host, dp::map_names::POLICY, self.entries.len(), dp::capacity::POLICY)?;
        }
        Ok(())
    }

    fn compact(&mut self) {
        self.entries.sort_by_key(|(k, _)| *k);
        self.entries.dedup_by_key(|(k, _)| *k);
    }

    fn finish(mut self) -> model::Result<BTreeMap<(u32, dp::PolicyKey), dp::PolicyValue>> {
        self.compact();
        fits(self.host, dp::map_names::POLICY, self.entries.len(), dp::capacity::POLICY)?;
        Ok(self.entries.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CreateRule, Direction, PatchEndpoint};
    use crate::testkit;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const HOST: &str = "h1";

    // ---- Building states ----

    fn universe(s: &mut State, cidr: &str) -> model::Universe {
        let name = format!("u{}", s.universes.len());
        testkit::universe(s, &name, cidr)
    }

    fn group(s: &mut State, universe: &str, name: &str) -> String {
        testkit::group(s, universe, name).id
    }

    fn default_group(s: &State, universe: &str) -> String {
        s.groups
            .values()
            .find(|g| g.universe == universe && g.name == model::DEFAULT_GROUP)
            .unwrap()
            .id
            .clone()
    }

    fn rule(s: &mut State, group: &str, body: serde_json::Value) -> model::Rule {
        let req: CreateRule = serde_json::from_value(body).unwrap();
        s.add_rule(group, req).unwrap()
    }

    fn endpoint(s: &mut State, universe: &str, ip: &str, groups: &[&str]) -> model::Endpoint {
        endpoint_on(s, HOST, universe, ip, groups)
    }

    fn endpoint_on(
        s: &mut State,
        host: &str,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> model::Endpoint {
        testkit::endpoint(s, universe, host, ip, groups)
    }

    /// Every endpoint is plumbed, at an ifindex derived from its address.
    fn plumbed(ep: &model::Endpoint) -> Option<u32> {
        Some(u32::from(ep.ip) & 0xFFFF)
    }

    fn compile_all(s: &State, ids: &mut Ids) -> MapContents {
        compile(s, HOST, &plumbed, ids).unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    // ---- The dataplane's lookups, emulated ----

    fn key_bytes(k: &dp::PolicyKey) -> [u8; 12] {
        let mut b = [0; 12];
        b[0..4].copy_from_slice(&k.identity);
        b[4] = k.direction;
        b[5..9].copy_from_slice(&k.peer);
        b[9] = k.proto;
        b[10..12].copy_from_slice(&k.port);
        b
    }

    fn key_from(b: [u8; 12]) -> dp::PolicyKey {
        dp::PolicyKey {
            identity: b[0..4].try_into().unwrap(),
            direction: b[4],
            peer: b[5..9].try_into().unwrap(),
            proto: b[9],
            port: b[10..12].try_into().unwrap(),
        }
    }

    fn mask<const N: usize>(mut b: [u8; N], bits: u32) -> [u8; N] {
        for (i, byte) in b.iter_mut().enumerate() {
            let first = 8 * i as u32;
            if bits <= first {
                *byte = 0;
            } else if bits < first + 8 {
                *byte &= 0xFFu8 << (first + 8 - bits);
            }
        }
        b
    }

    /// The kernel's LPM semantics, reduced to what the dataplane asks: is there an entry whose
    /// first `prefix` bits equal the key's? Entries are stored canonical, so masking finds them.
    /// One trie holds the entries of both families, as `VERSE_POLICY` will.
    struct Lpm {
        policy: HashSet<(u32, dp::PolicyKey)>,
        prefixes: Vec<u32>,
    }

    impl Lpm {
        fn new(d: &MapContents) -> Lpm {
            let keys = || d.policy.keys().chain(d.ipv6.policy.keys());
            let prefixes: BTreeSet<u32> = keys().map(|(p, _)| *p).collect();
            let policy: HashSet<(u32, dp::PolicyKey)> = keys().copied().collect();
            assert_eq!(policy.len(), d.policy.len() + d.ipv6.policy.len(), "families are disjoint");
            Lpm { policy, prefixes: prefixes.into_iter().collect() }
        }

        fn hit(&self, key: dp::PolicyKey) -> bool {
            let bytes = key_bytes(&key);
            self.prefixes.iter().any(|&p| self.policy.contains(&(p, key_from(mask(bytes, p)))))
        }
    }

    /// Longest match of (vni, ip) in `VERSE_CIDRS`.
    fn class_of(d: &MapContents, vni: u32, addr: Ipv4Addr) -> Option<u32> {
        (1..=32u8)
            .rev()
            .find_map(|len| d.cidrs.get(&dp::CidrKey::encode(vni, addr.octets(), len)).copied())
    }

    /// Longest match of (vni, ip) in `VERSE_CIDRS6`.
    fn class_of6(d: &MapContents, vni: u32, addr: Ipv6Addr) -> Option<u32> {
        (1..=128u8).rev().find_map(|len| {
            d.ipv6.cidrs.get(&dp::Cidr6Key::encode(vni, addr.octets(), len)).copied()
        })
    }

    /// A packet as policy sees it: the local endpoint's identity, the direction, the peer (its
    /// identity when it is an endpoint, and its address, IPv4 or IPv6), protocol and port
    /// (ICMP and ICMPv6: type << 8 | code).
    #[derive(Clone, Copy, Debug)]
    struct Query {
        policy: u32,
        direction: u8,
        peer_identity: Option<u32>,
        vni: u32,
        peer_ip: IpAddr,
        proto: u8,
        port: u16,
    }

    /// The dataplane's verdict: three lookups (identity, CIDR class, ANY), each skipped when
    /// the identity's `policy_kinds` has no entry of its kind (as `policy::rule` in the kernel
    /// does); any hit allows. An IPv6 peer is looked up under the IPv6 directions, its class in
    /// `VERSE_CIDRS6`.
    fn dataplane_allows(lpm: &Lpm, d: &MapContents, q: Query) -> bool {
        let (direction, class) = match q.peer_ip {
            IpAddr::V4(a) => (q.direction, class_of(d, q.vni, a)),
            IpAddr::V6(a) => (q.direction + dp::DIRECTION_IPV6, class_of6(d, q.vni, a)),
        };
        let kind_bits = |m: &BTreeMap<u32, u32>| m.get(&q.policy).copied().unwrap_or(0);
        let kinds = kind_bits(&d.policy_kinds) | kind_bits(&d.ipv6.policy_kinds);
        let has = |kind| kinds & dp::peer_kind::bit(direction, kind) != 0;
        let peers = [
            q.peer_identity.filter(|_| has(dp::peer_kind::IDENTITY)),
            class.filter(|_| has(dp::peer_kind::CIDR)),
            Some(dp::peer::ANY).filter(|_| has(dp::peer_kind::ANY)),
        ];
        peers.into_iter().flatten().any(|peer| {
            lpm.hit(dp::PolicyKey {
                identity: q.policy.to_be_bytes(),
                direction,
                peer: peer.to_be_bytes(),
                proto: q.proto,
                port: q.port.to_be_bytes(),
            })
        })
    }

    /// S1 straight from the rules: some rule of some group of the identity matches. A rule
    /// CIDR matches peers of its family only (`0.0.0.0/0` no IPv6 peer, `::/0` no IPv4 peer),
    /// `icmp` IPv4 peers only and `icmpv6` IPv6 peers only; in a universe without IPv6 CIDRs no
    /// IPv6 packet is admitted.
    fn reference_allows(s: &State, q: Query) -> bool {
        let identity = &s.identities[&q.policy];
        if q.peer_ip.is_ipv6() && s.universes[&identity.universe].ipv6_cidrs.is_empty() {
            return false;
        }
        let peer_groups = q.peer_identity.map(|p| &s.identities[&p].groups);
        identity.groups.iter().map(|g| &s.groups[g]).any(|g| {
            let rules = if q.direction == dp::DIRECTION_INGRESS { &g.ingress } else { &g.egress };
            rules.iter().any(|r| {
                let peer = match (&r.peer, q.peer_ip) {
                    (Peer::Group(id), _) => peer_groups.is_some_and(|groups| groups.contains(id)),
                    (Peer::Cidr(IpNetwork::V4(c)), IpAddr::V4(a)) => c.contains(a),
                    (Peer::Cidr(IpNetwork::V6(c)), IpAddr::V6(a)) => c.contains(a),
                    (Peer::Cidr(_), _) => false,
                };
                let what = match r.protocol {
                    Protocol::All => true,
                    Protocol::ICMP if q.peer_ip.is_ipv6() => false,
                    Protocol::ICMPV6 if q.peer_ip.is_ipv4() => false,
                    Protocol::Number(p) if p != q.proto => false,
                    Protocol::TCP | Protocol::UDP => {
                        r.ports.is_none_or(|(a, b)| (a..=b).contains(&q.port))
                    }
                    Protocol::ICMP | Protocol::ICMPV6 => match r.icmp {
                        None | Some((None, _)) => true,
                        Some((Some(t), c)) => {
                            (q.port >> 8) as u8 == t && c.is_none_or(|c| (q.port & 0xFF) as u8 == c)
                        }
                    },
                    Protocol::Number(_) => true,
                };
                peer && what
            })
        })
    }

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;
    const ICMPV6: u8 = dp::wire::IPPROTO_ICMPV6;

    fn query(
        policy: u32,
        direction: u8,
        vni: u32,
        peer: (Option<u32>, &str),
        proto: u8,
        port: u16,
    ) -> Query {
        let peer_ip = peer.1.parse().unwrap();
        Query { policy, direction, peer_identity: peer.0, vni, peer_ip, proto, port }
    }

    // ---- Port ranges ----

    fn check_blocks(from: u16, to: u16) {
        let blocks: Vec<(u16, u32)> = port_blocks(from, to).collect();
        assert!(blocks.len() <= 30, "{from}-{to}: {} blocks", blocks.len());
        let mut next = u32::from(from);
        for &(start, bits) in &blocks {
            let size = 1u32 << bits;
            assert_eq!(u32::from(start), next, "{from}-{to}: blocks are contiguous, in order");
            assert_eq!(u32::from(start) % size, 0, "{from}-{to}: block {start}/{bits} is aligned");
            next += size;
        }
        assert_eq!(
            next,
            u32::from(to) + 1,
            "{from}-{to}: the blocks end exactly at the range's end"
        );
    }

    #[test]
    fn port_blocks_cover_every_small_range_exactly() {
        for from in 0..=300u16 {
            for to in from..=300 {
                check_blocks(from, to);
            }
        }
    }

    #[test]
    fn port_blocks_cover_random_and_edge_ranges_exactly() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let (a, b): (u16, u16) = (rng.random(), rng.random());
            check_blocks(a.min(b), a.max(b));
        }
        for (from, to) in [
            (0, 0),
            (0, 65535),
            (65535, 65535),
            (1, 65534),
            (0, 1023),
            (1024, 65535),
            (32768, 65535),
        ] {
            check_blocks(from, to);
        }
        assert_eq!(port_blocks(0, 65535).collect::<Vec<_>>(), vec![(0, 16)]);
        assert_eq!(port_blocks(80, 80).collect::<Vec<_>>(), vec![(80, 0)]);
        assert_eq!(port_blocks(8000, 8003).collect::<Vec<_>>(), vec![(8000, 2)]);
        assert_eq!(port_blocks(1, 65534).count(), 30, "the worst case");
    }

    // ---- What the maps hold ----

    #[test]
    fn endpoints_and_routes_of_plumbed_local_endpoints_only() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let a = endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        let unplumbed = endpoint(&mut s, &u.id, "10.0.0.11", &[]);
        let remote = endpoint_on(&mut s, "h2", &u.id, "10.0.0.12", &[]);
        let ifindex = |ep: &model::Endpoint| (ep.id != unplumbed.id).then_some(7u32);
        let d = compile(&s, HOST, &ifindex, &mut Ids::default()).unwrap();
        let mac = model::parse_mac(&a.mac).unwrap();
        assert_eq!(
            d.endpoints,
            BTreeMap::from([(
                7,
                dp::Endpoint {
                    ip: [10, 0, 0, 10],
                    mac,
                    _pad: [0; 2],
                    vni: u.vni,
                    identity: a.identity,
                    slot: a.slot,
                    serial: a.serial,
                    ip6: [0; 16],
                    gateway6: [0; 16],
                }
            )])
        );
        assert_eq!(
            d.routes,
            BTreeMap::from([(
                dp::RouteKey { vni: u.vni, ip: [10, 0, 0, 10] },
                dp::Route {
                    ifindex: 7,
                    identity: a.identity,
                    mac,
                    _pad: [0; 2],
                    underlay: [0; 4],
                    slot: a.slot,
                    serial: a.serial,
                }
            )])
        );
        // S14: the plumbed local endpoint's budget, in its slot.
        assert_eq!(
            d.ct_owners,
            BTreeMap::from([(
                a.slot,
                OwnerBudget { serial: a.serial, budget: u64::from(a.conntrack_budget) }
            )])
        );
        assert_eq!((a.slot, unplumbed.slot), (1, 2));
        let _ = remote;
        // On h2 only the remote endpoint is local.
        let d2 = compile(&s, "h2", &plumbed, &mut Ids::default()).unwrap();
        assert_eq!(d2.endpoints.len(), 1);
        assert_eq!(d2.endpoints.values().next().unwrap().ip, [10, 0, 0, 12]);
    }

    #[test]
    fn s3_default_group_compiles_to_ingress_from_itself_and_egress_any() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let a = endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        let d = compile_all(&s, &mut Ids::default());
        let l = a.identity.to_be_bytes();
        let entry = |direction, peer: u32| {
            (
                dp::policy_prefix::PEER,
                dp::PolicyKey {
                    identity: l,
                    direction,
                    peer: peer.to_be_bytes(),
                    proto: 0,
                    port: [0; 2],
                },
            )
        };
        let g = &s.groups[&default_group(&s, &u.id)];
        let named = |r: &model::Rule| {
            let rule = model::rule_bits(&r.id).unwrap();
            let slot = d.rules.iter().find(|(_, held)| **held == rule).map(|(s, _)| *s);
            dp::PolicyValue { rule, slot: slot.expect("every rule named has a slot") }
        };
        assert_eq!(d.rules.keys().copied().collect::<Vec<_>>(), [1, 2], "dense, from 1");
        let v4_egress =
            g.egress.iter().find(|r| r.peer == Peer::Cidr("0.0.0.0/0".parse().unwrap()));
        assert_eq!(
            d.policy,
            BTreeMap::from([
                (entry(dp::DIRECTION_INGRESS, a.identity), named(&g.ingress[0])),
                (entry(dp::DIRECTION_EGRESS, dp::peer::ANY), named(v4_egress.unwrap())),
            ]),
            "S3 ingress all from default, S2 egress all to 0.0.0.0/0; ::/0 compiles to nothing; \
             each entry names its rule"
        );
        assert!(d.cidrs.is_empty(), "/0 is the ANY peer, not a class");
        assert_eq!(
            d.policy_kinds,
            BTreeMap::from([(
                a.identity,
                dp::peer_kind::bit(dp::DIRECTION_INGRESS, dp::peer_kind::IDENTITY)
                    | dp::peer_kind::bit(dp::DIRECTION_EGRESS, dp::peer_kind::ANY)
            )]),
            "ingress names an identity, egress only 0.0.0.0/0: the egress check is one lookup"
        );
    }

    #[test]
    fn protocols_compile_to_their_prefix_lengths() {
        use dp::policy_prefix::{FULL, PEER, PROTO};
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let g = group(&mut s, &u.id, "g");
        let e = endpoint(&mut s, &u.id, "10.0.0.10", &[&g]);
        let egress: Vec<String> = s.groups[&g].egress.iter().map(|r| r.id.clone()).collect();
        for id in egress {
            s.delete_rule(&g, &id).unwrap();
        }
        let any = "0.0.0.0/0";
        let mut made = Vec::new();
        for body in [
            json!({"protocol": "all"}),
            json!({"protocol": "tcp", "from_port": 0, "to_port": 65535}),
            json!({"protocol": "udp", "from_port": 53, "to_port": 53}),
            json!({"protocol": "tcp", "from_port": 8000, "to_port": 8003}),
            json!({"protocol": "icmp"}),
            json!({"protocol": "icmp", "icmp_type": 8}),
            json!({"protocol": "icmp", "icmp_type": 3, "icmp_code": 4}),
            json!({"protocol": "icmpv6"}),
            json!({"protocol": 47}),
        ] {
            let mut body = body;
            body["direction"] = json!("ingress");
            // ICMPv6 only with an IPv6 CIDR (the model refuses it with 0.0.0.0/0).
            body["cidr"] = json!(if body["protocol"] == "icmpv6" { "::/0" } else { any });
            made.push(rule(&mut s, &g, body));
        }
        rule(&mut s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": "fd00::/8"}));
        let d = compile_all(&s, &mut Ids::default());
        let l = e.identity.to_be_bytes();
        let k = |prefix, proto, port: u16| {
            (
                prefix,
                dp::PolicyKey {
                    identity: l,
                    direction: dp::DIRECTION_INGRESS,
                    peer: [0; 4],
                    proto,
                    port: port.to_be_bytes(),
                },
            )
        };
        // The entries of the first seven rules, in the order they were added.
        let in_order = [
            k(PEER, 0, 0),
            k(PROTO, TCP, 0),
            k(FULL, UDP, 53),
            k(PROTO + 14, TCP, 8000),
            k(PROTO, ICMP, 0),
            k(PROTO + 8, ICMP, 8 << 8),
            k(FULL, ICMP, 3 << 8 | 4),
        ];
        let expected: BTreeSet<_> = in_order.iter().copied().chain([k(PROTO, 47, 0)]).collect();
        assert_eq!(d.policy.keys().copied().collect::<BTreeSet<_>>(), expected);
        // Each entry names the rule it came from, one entry each.
        let rules = &made;
        let by_rule: Vec<u32> = in_order.iter().map(|key| d.policy[key].rule).collect();
        let want: Vec<u32> = rules[..7].iter().map(|r| model::rule_bits(&r.id).unwrap()).collect();
        assert_eq!(by_rule, want);
        assert_eq!(d.policy[&k(PROTO, 47, 0)].rule, model::rule_bits(&rules[8].id).unwrap());
    }

    /// A dual-stack universe: every endpoint with an IPv6 address gets a `VERSE_ROUTES6` route
    /// with the value of its IPv4 route, local or remote; an IPv4-only universe gets none.
    #[test]
    fn ipv6_addresses_are_routed_beside_their_ipv4_ones() {
        let mut s = State::default();
        host(&mut s, HOST, Some("198.18.0.1"));
        host(&mut s, "h2", Some("198.18.0.2"));
        let u = dual_universe(&mut s, "10.0.0.0/16", Some(CIDR6));
        let v = dual_universe(&mut s, "10.1.0.0/16", None);
        let local = dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.10", Some("fd00:ab::10")), &[]);
        let v4_only = dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.11", None), &[]);
        let remote = dual_endpoint(&mut s, "h2", &u.id, ("10.0.0.12", Some("fd00:ab::12")), &[]);
        let _other = dual_endpoint(&mut s, HOST, &v.id, ("10.1.0.20", None), &[]);
        let d = compile_all(&s, &mut Ids::default());
        let six = |ep: &model::Endpoint| dp::Route6Key::new(u.vni, ep.ipv6.unwrap().octets());
        let four = |ep: &model::Endpoint| dp::RouteKey { vni: u.vni, ip: ep.ip.octets() };
        assert_eq!(
            d.ipv6.routes,
            BTreeMap::from([
                (six(&local), d.routes[&four(&local)]),
                (six(&remote), d.routes[&four(&remote)]),
            ]),
            "the same route under both addresses; none for an endpoint without IPv6"
        );
        assert_eq!(d.ipv6.routes[&six(&remote)].underlay, [198, 18, 0, 2]);
        assert_eq!(d.ipv6.routes[&six(&local)].ifindex, plumbed(&local).unwrap());
        assert!(d.routes.contains_key(&four(&v4_only)));
        assert_eq!(d.endpoints.len(), 3, "one endpoint entry each, whatever its addresses");
    }

    /// S2 and S3 in a dual-stack universe: the default group admits its members over IPv6 too
    /// (a group peer has both families) and its `::/0` egress rule is the IPv6 `ANY` entry,
    /// named after it; `0.0.0.0/0` makes no IPv6 entry and `::/0` no IPv4 one. The IPv6 kinds
    /// sit in the upper half of the identity's bits.
    #[test]
    fn s2_s3_default_group_in_a_dual_stack_universe_covers_both_families_apart() {
        let mut s = State::default();
        let u = dual_universe(&mut s, "10.0.0.0/16", Some(CIDR6));
        let a = dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.10", Some("fd00:ab::10")), &[]);
        let d = compile_all(&s, &mut Ids::default());
        let g = &s.groups[&default_group(&s, &u.id)];
        let egress = |cidr: &str| {
            let r = g.egress.iter().find(|r| r.peer == Peer::Cidr(cidr.parse().unwrap()));
            model::rule_bits(&r.unwrap().id).unwrap()
        };
        let entry = |direction, peer: u32| {
            (
                dp::policy_prefix::PEER,
                dp::PolicyKey {
                    identity: a.identity.to_be_bytes(),
                    direction,
                    peer: peer.to_be_bytes(),
                    proto: 0,
                    port: [0; 2],
                },
            )
        };
        let (in6, out6) =
            (dp::DIRECTION_INGRESS + dp::DIRECTION_IPV6, dp::DIRECTION_EGRESS + dp::DIRECTION_IPV6);
        let rules = |m: &BTreeMap<(u32, dp::PolicyKey), dp::PolicyValue>| {
            m.iter().map(|(k, v)| (*k, v.rule)).collect::<BTreeMap<_, _>>()
        };
        let ingress = model::rule_bits(&g.ingress[0].id).unwrap();
        assert_eq!(
            rules(&d.ipv6.policy),
            BTreeMap::from([
                (entry(in6, a.identity), ingress),
                (entry(out6, dp::peer::ANY), egress("::/0")),
            ])
        );
        assert_eq!(
            rules(&d.policy),
            BTreeMap::from([
                (entry(dp::DIRECTION_INGRESS, a.identity), ingress),
                (entry(dp::DIRECTION_EGRESS, dp::peer::ANY), egress("0.0.0.0/0")),
            ])
        );
        use dp::peer_kind::{bit, ANY, IDENTITY};
        assert_eq!(d.ipv6.policy_kinds[&a.identity], bit(in6, IDENTITY) | bit(out6, ANY));
        assert_eq!(d.ipv6.policy_kinds[&a.identity] & 0xFFFF, 0, "no IPv4 bit");
        // The group rule's entries carry its one slot in both families; ::/0, a rule with IPv6
        // entries only, has a slot of its own (its new flows are counted).
        let slot = |rule| d.rules.iter().find(|(_, r)| **r == rule).map(|(s, _)| *s);
        assert_eq!(d.ipv6.policy[&entry(in6, a.identity)].slot, slot(ingress).unwrap());
        let any6 = d.ipv6.policy[&entry(out6, dp::peer::ANY)];
        assert_eq!(Some(any6.slot), slot(any6.rule));
        assert_ne!(any6.slot, 0);
        assert_ne!(Some(any6.slot), slot(egress("0.0.0.0/0")));
        assert!(d.ipv6.cidrs.is_empty(), "::/0 is the ANY peer, not a class");

        // The same universe without IPv6 CIDRs compiles no IPv6 contents at all.
        let mut v4 = s.clone();
        v4.universes.update_all(|_, u| u.ipv6_cidrs.clear());
        v4.endpoints.update_all(|_, e| e.ipv6 = None);
        let d4 = compile_all(&v4, &mut Ids::default());
        assert_eq!(d4.ipv6, Ipv6Contents::default());
        assert_eq!(ipv4_part(&d4), ipv4_part(&d));
    }

    #[test]
    fn ipv6_rules_compile_to_ipv6_classes_and_protocols() {
        use dp::policy_prefix::{FULL, PEER, PROTO};
        let mut s = State::default();
        let u = dual_universe(&mut s, "10.0.0.0/16", Some(CIDR6));
        let g = group(&mut s, &u.id, "g");
        let peers = group(&mut s, &u.id, "peers");
        let e = dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.10", Some("fd00:ab::10")), &[&g]);
        let p = dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.11", None), &[&peers]);
        let egress: Vec<String> = s.groups[&g].egress.iter().map(|r| r.id.clone()).collect();
        for id in egress {
            s.delete_rule(&g, &id).unwrap();
        }
        let add = |s: &mut State, mut body: serde_json::Value| {
            body["direction"] = json!("ingress");
            model::rule_bits(&rule(s, &g, body).id).unwrap()
        };
        let v6_wide = add(
            &mut s,
            json!({"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "fd00:ab::/48"}),
        );
        let v6_narrow = add(
            &mut s,
            json!({"protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "fd00:ab:0:1::/64"}),
        );
        let echo6 = add(&mut s, json!({"protocol": "icmpv6", "icmp_type": 128, "cidr": "::/0"}));
        let unreach6 = add(
            &mut s,
            json!({"protocol": "icmpv6", "icmp_type": 1, "icmp_code": 4, "group": peers}),
        );
        let icmp_group = add(&mut s, json!({"protocol": "icmp", "group": peers}));
        let v4 = add(&mut s, json!({"protocol": "all", "cidr": "10.0.0.0/8"}));
        // icmp with an IPv6 CIDR, icmpv6 with an IPv4 one: accepted, as AWS does, and matching
        // nothing (CIDRs of classes already there, so the classes below stay as they are).
        for (protocol, cidr) in
            [("icmp", "fd00:ab::/48"), ("icmpv6", "0.0.0.0/0"), ("1", "::/0"), ("58", "10.0.0.0/8")]
        {
            add(&mut s, json!({"protocol": protocol, "cidr": cidr}));
        }
        let d = compile_all(&s, &mut Ids::default());
        let vni = u.vni.to_be_bytes();
        let class = |addr: &str| {
            let a: Ipv6Addr = addr.parse().unwrap();
            a.octets()
        };
        assert_eq!(
            d.ipv6.cidrs,
            BTreeMap::from([
                (
                    (32 + 48, dp::Cidr6Key { vni, addr: class("fd00:ab::") }),
                    dp::peer::CIDR_FLAG | 1
                ),
                (
                    (32 + 64, dp::Cidr6Key { vni, addr: class("fd00:ab:0:1::") }),
                    dp::peer::CIDR_FLAG | 2
                ),
            ]),
            "IPv6 classes are numbered apart, from 1"
        );
        assert_eq!(
            d.cidrs.values().copied().collect::<Vec<_>>(),
            [dp::peer::CIDR_FLAG | 1],
            "the IPv4 class 10.0.0.0/8 has its own 1"
        );
        let in6 = dp::DIRECTION_INGRESS + dp::DIRECTION_IPV6;
        let k = |prefix, peer: u32, proto, port: u16| {
            (
                prefix,
                dp::PolicyKey {
                    identity: e.identity.to_be_bytes(),
                    direction: in6,
                    peer: peer.to_be_bytes(),
                    proto,
                    port: port.to_be_bytes(),
                },
            )
        };
        let (wide, narrow) = (dp::peer::CIDR_FLAG | 1, dp::peer::CIDR_FLAG | 2);
        let got: BTreeMap<_, _> = d
            .ipv6
            .policy
            .iter()
            .filter(|((_, k), _)| k.identity == e.identity.to_be_bytes())
            .map(|(k, v)| (*k, v.rule))
            .collect();
        assert_eq!(
            got,
            BTreeMap::from([
                // The /48 rule expands over both classes nested in it; the /64 over its own.
                (k(FULL, wide, TCP, 80), v6_wide),
                (k(FULL, narrow, TCP, 80), v6_wide),
                (k(FULL, narrow, UDP, 53), v6_narrow),
                (k(PROTO + 8, dp::peer::ANY, ICMPV6, 128 << 8), echo6),
                (k(FULL, p.identity, ICMPV6, 1 << 8 | 4), unreach6),
            ]),
            "icmp (even from a group) and 10.0.0.0/8 make no IPv6 entry"
        );
        let v4_rules: BTreeSet<u32> = d
            .policy
            .iter()
            .filter(|((_, k), _)| k.identity == e.identity.to_be_bytes())
            .map(|(_, v)| v.rule)
            .collect();
        assert_eq!(v4_rules, BTreeSet::from([icmp_group, v4]), "no IPv6-only rule in IPv4");
        let _ = PEER;
    }

    /// When several rules produce the same entry, it names the first the compiler visits: the
    /// identity's groups by id, each group's rules in order.
    #[test]
    fn an_entry_produced_by_several_rules_names_the_first() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let g1 = group(&mut s, &u.id, "one");
        let g2 = group(&mut s, &u.id, "two");
        let (first, second) = if g1 < g2 { (g1, g2) } else { (g2, g1) };
        let body = || json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/8"});
        let wide = || json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "0.0.0.0/0"});
        let in_second = rule(&mut s, &second, body());
        let in_first_wide = rule(&mut s, &first, wide());
        let in_first = rule(&mut s, &first, body());
        let e = endpoint(&mut s, &u.id, "10.0.0.10", &[&first, &second]);
        let d = compile_all(&s, &mut Ids::default());
        let class_entries: Vec<dp::PolicyValue> = d
            .policy
            .iter()
            .filter(|((_, k), _)| {
                u32::from_be_bytes(k.identity) == e.identity
                    && k.direction == dp::DIRECTION_INGRESS
                    && u32::from_be_bytes(k.peer) & dp::peer::CIDR_FLAG != 0
            })
            .map(|(_, v)| *v)
            .collect();
        assert!(!class_entries.is_empty());
        for v in class_entries {
            assert_eq!(
                v.rule,
                model::rule_bits(&in_first.id).unwrap(),
                "{in_first:?} over {in_second:?}"
            );
        }
        let any = d
            .policy
            .iter()
            .find(|((_, k), _)| k.direction == dp::DIRECTION_INGRESS && k.peer == [0; 4])
            .map(|(_, v)| v.rule);
        assert_eq!(any, model::rule_bits(&in_first_wide.id));
    }

    #[test]
    fn every_entry_is_canonical_below_its_prefix() {
        let (s, _) = random_state(&mut StdRng::seed_from_u64(1));
        let d = compile_all(&s, &mut Ids::default());
        for (prefix, key) in d.policy.keys() {
            assert_eq!(key_from(mask(key_bytes(key), *prefix)), *key, "{prefix} {key:?}");
        }
        for ((prefix, key), value) in &d.cidrs {
            assert_eq!(mask(key.addr, prefix - dp::CIDR_KEY_VNI_BITS), key.addr);
            assert!(value & dp::peer::CIDR_FLAG != 0);
        }
    }

    #[test]
    fn cidr_classes_are_emitted_with_vni_prefix_and_flagged_ids() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let v = universe(&mut s, "10.0.0.0/16");
        let g = default_group(&s, &u.id);
        let h = default_group(&s, &v.id);
        endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        rule(&mut s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": "10.1.0.0/16"}));
        rule(
            &mut s,
            &g,
            json!({"direction": "egress", "protocol": "all", "cidr": "192.168.1.7/24"}),
        );
        rule(&mut s, &g, json!({"direction": "egress", "protocol": "all", "cidr": "fd00::/8"}));
        // A universe without local endpoints contributes no classes.
        rule(
            &mut s,
            &h,
            json!({"direction": "ingress", "protocol": "all", "cidr": "172.16.0.0/12"}),
        );
        let d = compile_all(&s, &mut Ids::default());
        let vni = u.vni.to_be_bytes();
        assert_eq!(
            d.cidrs,
            BTreeMap::from([
                ((48, dp::CidrKey { vni, addr: [10, 1, 0, 0] }), dp::peer::CIDR_FLAG | 1),
                ((56, dp::CidrKey { vni, addr: [192, 168, 1, 0] }), dp::peer::CIDR_FLAG | 2),
            ])
        );
    }

    /// The trap that CIDR classes avoid (README, "How it works"): one address matched by a /16
    /// rule, a /24 rule and a group peer must get the union of all three (S1), not only the
    /// longest prefix or the identity.
    #[test]
    fn s1_nested_cidrs_and_group_peer_all_allow_the_same_address() {
        let mut s = State::default();
        let u = universe(&mut s, "10.1.0.0/16");
        let server_g = group(&mut s, &u.id, "server");
        let client_g = group(&mut s, &u.id, "client");
        rule(
            &mut s,
            &server_g,
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.1.0.0/16"}),
        );
        rule(
            &mut s,
            &server_g,
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": "10.1.2.0/24"}),
        );
        rule(
            &mut s,
            &server_g,
            json!({"direction": "ingress", "protocol": "udp", "from_port": 53, "to_port": 53, "group": client_g}),
        );
        rule(
            &mut s,
            &server_g,
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.1.2.5/32"}),
        );
        let server = endpoint(&mut s, &u.id, "10.1.9.9", &[&server_g]);
        let client = endpoint(&mut s, &u.id, "10.1.2.5", &[&client_g]);
        let near = endpoint(&mut s, &u.id, "10.1.2.6", &[&client_g]);
        let far = endpoint(&mut s, &u.id, "10.1.7.7", &[]);
        let d = compile_all(&s, &mut Ids::default());
        let lpm = Lpm::new(&d);
        let ask = |peer: &model::Endpoint, proto, port| {
            let q = query(
                server.identity,
                dp::DIRECTION_INGRESS,
                u.vni,
                (Some(peer.identity), &peer.ip.to_string()),
                proto,
                port,
            );
            let verdict = dataplane_allows(&lpm, &d, q);
            assert_eq!(verdict, reference_allows(&s, q), "{q:?}");
            verdict
        };
        // The client is in the /16, the /24, the /32 and the group: all four rules hold.
        assert!(ask(&client, TCP, 80), "the /16 rule");
        assert!(ask(&client, TCP, 443), "the /24 rule");
        assert!(ask(&client, UDP, 53), "the group rule");
        assert!(ask(&client, TCP, 22), "the /32 rule");
        assert!(!ask(&client, TCP, 8080));
        assert!(ask(&near, TCP, 80) && ask(&near, TCP, 443) && ask(&near, UDP, 53));
        assert!(!ask(&near, TCP, 22), "not the /32");
        assert!(ask(&far, TCP, 80), "in the /16 only");
        assert!(!ask(&far, TCP, 443) && !ask(&far, UDP, 53) && !ask(&far, TCP, 22));
        // An address outside every rule CIDR and not an endpoint.
        let q = query(server.identity, dp::DIRECTION_INGRESS, u.vni, (None, "10.2.0.1"), TCP, 80);
        assert!(!dataplane_allows(&lpm, &d, q));
    }

    fn host(s: &mut State, name: &str, underlay: Option<&str>) {
        let underlay_ip = underlay.map(|ip| ip.parse().unwrap());
        s.hosts.insert(name.into(), model::HostRecord::at(name, underlay_ip));
    }

    #[test]
    fn endpoints_of_other_hosts_are_routed_through_their_host_underlay() {
        let mut s = State::default();
        host(&mut s, HOST, Some("198.18.0.1"));
        host(&mut s, "h2", Some("198.18.0.2"));
        host(&mut s, "h3", Some("198.18.0.3"));
        host(&mut s, "no-underlay", None);
        let u = universe(&mut s, "10.0.0.0/16");
        let v = universe(&mut s, "10.1.0.0/16");
        let local = endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        let on_h2 = endpoint_on(&mut s, "h2", &u.id, "10.0.0.12", &[]);
        let on_h3 = endpoint_on(&mut s, "h3", &v.id, "10.1.0.13", &[]);
        let _unreachable = endpoint_on(&mut s, "no-underlay", &u.id, "10.0.0.14", &[]);
        let _unknown_host = endpoint_on(&mut s, "h9", &u.id, "10.0.0.15", &[]);
        let d = compile_all(&s, &mut Ids::default());

        let route = |ep: &model::Endpoint, ifindex, underlay| {
            let vni = s.universes[&ep.universe].vni;
            let mac = model::parse_mac(&ep.mac).unwrap();
            (
                dp::RouteKey { vni, ip: ep.ip.octets() },
                dp::Route {
                    ifindex,
                    identity: ep.identity,
                    mac,
                    _pad: [0; 2],
                    underlay,
                    // S7: every route names its endpoint's serial; S14: a local one its slot.
                    slot: if ifindex == 0 { 0 } else { ep.slot },
                    serial: ep.serial,
                },
            )
        };
        assert_eq!(
            d.routes,
            BTreeMap::from([
                route(&local, plumbed(&local).unwrap(), [0; 4]),
                route(&on_h2, 0, [198, 18, 0, 2]),
            ]),
            "local endpoints by ifindex, remote ones by their host's underlay; none for hosts \
             without an underlay address or unknown to the state, none for universes without \
             an endpoint here (a host holds what its endpoints can reach)"
        );
        let d3 = compile(&s, "h3", &plumbed, &mut Ids::default()).unwrap();
        assert!(d3.routes.contains_key(&route(&on_h3, 0, [0; 4]).0), "{on_h3:?} is local on h3");
        assert!(!d3.routes.contains_key(&route(&on_h2, 0, [0; 4]).0), "h3 has nothing in u");
        assert_eq!(d.endpoints.len(), 1, "only local endpoints are endpoints here");
        let hosts: Vec<[u8; 4]> = d.hosts.keys().copied().collect();
        assert_eq!(
            hosts,
            vec![[198, 18, 0, 2]],
            "the other hosts with an endpoint of a universe present here: not h3 (only v), not \
             this one"
        );
        assert!(d.hosts.values().all(|&n| n != 0), "host numbers are non-zero");
        assert_eq!(d.vnis, BTreeSet::from([u.vni]), "only the universes present here");

        // A host with no endpoint holds nothing of the fleet: no route, no host, no universe.
        let idle = compile(&s, "no-endpoints-here", &plumbed, &mut Ids::default()).unwrap();
        assert_eq!(idle, MapContents::default(), "a host holds what its own endpoints need");

        // Seen from h2, this host is the remote one.
        let d2 = compile(&s, "h2", &plumbed, &mut Ids::default()).unwrap();
        assert_eq!(d2.hosts.keys().copied().collect::<Vec<_>>(), vec![[198, 18, 0, 1]]);
        assert_eq!(d2.routes[&route(&local, 0, [0; 4]).0].underlay, [198, 18, 0, 1]);
        assert_eq!(d2.routes[&route(&on_h2, 0, [0; 4]).0].ifindex, plumbed(&on_h2).unwrap());

        // Without hosts in the state (one host), nothing changes from before.
        let mut single = s.clone();
        single.hosts.clear();
        let d1 = compile_all(&single, &mut Ids::default());
        assert_eq!(d1.routes.len(), 1);
        assert!(d1.hosts.is_empty());
    }

    #[test]
    fn group_rules_admit_members_on_other_hosts_by_identity() {
        let mut s = State::default();
        host(&mut s, HOST, Some("198.18.0.1"));
        host(&mut s, "h2", Some("198.18.0.2"));
        let u = universe(&mut s, "10.0.0.0/16");
        let web = group(&mut s, &u.id, "web");
        let db = group(&mut s, &u.id, "db");
        rule(
            &mut s,
            &db,
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": web}),
        );
        let local_db = endpoint(&mut s, &u.id, "10.0.0.10", &[&db]);
        let remote_web = endpoint_on(&mut s, "h2", &u.id, "10.0.0.20", &[&web]);
        let d = compile_all(&s, &mut Ids::default());
        let lpm = Lpm::new(&d);
        let q = |port| {
            query(
                local_db.identity,
                dp::DIRECTION_INGRESS,
                u.vni,
                (Some(remote_web.identity), "10.0.0.20"),
                TCP,
                port,
            )
        };
        assert!(dataplane_allows(&lpm, &d, q(5432)), "the remote member's identity is admitted");
        assert!(!dataplane_allows(&lpm, &d, q(5433)));
        // Only local identities have policies here: the remote endpoint's are compiled on h2.
        assert!(d.policy.keys().all(|(_, k)| u32::from_be_bytes(k.identity) == local_db.identity));
    }

    /// S5: membership moves an endpoint between identities; rules are untouched.
    #[test]
    fn s5_joining_a_group_changes_what_is_allowed() {
        let mut s = State::default();
        let u = universe(&mut s, "10.1.0.0/16");
        let db = group(&mut s, &u.id, "db");
        let app = group(&mut s, &u.id, "app");
        rule(
            &mut s,
            &db,
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": app}),
        );
        let server = endpoint(&mut s, &u.id, "10.1.0.5", &[&db]);
        let client = endpoint(&mut s, &u.id, "10.1.0.6", &[]);
        let allowed = |s: &State| {
            let d = compile_all(s, &mut Ids::default());
            let c = &s.endpoints[&client.id];
            let q = query(
                server.identity,
                dp::DIRECTION_INGRESS,
                u.vni,
                (Some(c.identity), "10.1.0.6"),
                TCP,
                5432,
            );
            dataplane_allows(&Lpm::new(&d), &d, q)
        };
        assert!(!allowed(&s));
        let default = default_group(&s, &u.id);
        s.patch_endpoint(&client.id, PatchEndpoint::groups(vec![default.clone(), app.clone()]))
            .unwrap();
        assert!(allowed(&s));
        s.patch_endpoint(&client.id, PatchEndpoint::groups(vec![default])).unwrap();
        assert!(!allowed(&s));
    }

    // ---- Differential test against the reference model ----

    /// The IPv6 CIDR of the dual-stack universes of these tests.
    const CIDR6: &str = "fd00:ab::/48";

    /// A universe of `cidr` and, when given, the IPv6 CIDR `cidr6`, through the model.
    fn dual_universe(s: &mut State, cidr: &str, cidr6: Option<&str>) -> model::Universe {
        let req = model::CreateUniverse {
            name: format!("u{}", s.universes.len()),
            cidr: Some(cidr.into()),
            cidrs: None,
            ipv6_cidrs: cidr6.map(|c| vec![c.into()]),
        };
        s.create_universe(req).unwrap()
    }

    /// An endpoint at `ip` and, when given, `ipv6`, on `host`.
    fn dual_endpoint(
        s: &mut State,
        host: &str,
        universe: &str,
        (ip, ipv6): (&str, Option<&str>),
        groups: &[&str],
    ) -> model::Endpoint {
        let mut req = testkit::endpoint_req(universe, host, ip, groups);
        req.ipv6 = ipv6.map(str::to_owned);
        s.create_endpoint(req, host).unwrap()
    }

    /// A random universe whose rule CIDRs nest around a few addresses, with endpoints on them:
    /// dual-stack when `dual` (IPv6 addresses, IPv6 rule CIDRs nesting around them, `::/0`,
    /// `icmpv6`), IPv4 only otherwise. Returns the addresses of both families it placed
    /// endpoints on and around.
    fn random_state(rng: &mut StdRng) -> (State, Vec<IpAddr>) {
        random_state_of(rng, true)
    }

    fn random_state_of(rng: &mut StdRng, dual: bool) -> (State, Vec<IpAddr>) {
        let mut s = State::default();
        let u = dual_universe(&mut s, "10.0.0.0/8", dual.then_some(CIDR6));
        let mut groups = vec![default_group(&s, &u.id)];
        for i in 0..4 {
            groups.push(group(&mut s, &u.id, &format!("g{i}")));
        }
        // Without the S2 egress rules, egress verdicts depend on the random rules too.
        for g in &groups {
            if rng.random_bool(0.6) {
                let egress: Vec<String> = s.groups[g].egress.iter().map(|r| r.id.clone()).collect();
                for r in egress {
                    s.delete_rule(g, &r).unwrap();
                }
            }
        }
        let bases =
            [ip("10.1.2.3"), ip("10.1.2.200"), ip("10.1.77.7"), ip("10.200.0.9"), ip("10.1.3.30")];
        let bases6: [Ipv6Addr; 5] = [
            "fd00:ab:0:1::3".parse().unwrap(),
            "fd00:ab:0:1::c8".parse().unwrap(),
            "fd00:ab:0:4d::7".parse().unwrap(),
            "fd00:ab:0:c800::9".parse().unwrap(),
            "fd00:ab:0:1:8000::1e".parse().unwrap(),
        ];
        // Endpoints sit on and next to the base addresses so that CIDRs of every length catch
        // some and miss others; an endpoint's IPv6 address sits likewise on its base.
        let mut addresses: Vec<(Ipv4Addr, Ipv6Addr)> = Vec::new();
        for (base, base6) in bases.into_iter().zip(bases6) {
            for delta in [0u32, 1, 64, 256] {
                let six = Ipv6Addr::from(u128::from(base6) + u128::from(delta) * 0x1_0001);
                addresses.push((Ipv4Addr::from(u32::from(base) + delta), six));
            }
        }
        for (i, &(addr, addr6)) in addresses.iter().enumerate() {
            if rng.random_bool(0.3) {
                continue;
            }
            let mut mine: Vec<&str> =
                groups.iter().filter(|_| rng.random_bool(0.4)).map(String::as_str).collect();
            if mine.is_empty() {
                mine.push(&groups[i % groups.len()]);
            }
            let host = if rng.random_bool(0.2) { "h2" } else { HOST };
            let six = (dual && rng.random_bool(0.7)).then(|| addr6.to_string());
            let _ = dual_endpoint(&mut s, host, &u.id, (&addr.to_string(), six.as_deref()), &mine);
        }
        for _ in 0..rng.random_range(5..40) {
            let g = &groups[rng.random_range(0..groups.len())];
            let direction = if rng.random_bool(0.5) { "ingress" } else { "egress" };
            let icmp = if dual && rng.random_bool(0.5) { "icmpv6" } else { "icmp" };
            let mut body = match rng.random_range(0..8) {
                0 => json!({"protocol": "all"}),
                1 | 2 => {
                    let a: u16 = rng.random_range(0..2000);
                    let b = a + rng.random_range(0..300);
                    json!({"protocol": if rng.random_bool(0.5) { "tcp" } else { "udp" }, "from_port": a, "to_port": b})
                }
                3 => json!({"protocol": "tcp", "from_port": 0, "to_port": 65535}),
                4 => json!({"protocol": icmp}),
                5 => {
                    json!({"protocol": icmp, "icmp_type": rng.random_range(0..4), "icmp_code": if rng.random_bool(0.5) { -1 } else { rng.random_range(0..3) }})
                }
                6 => {
                    json!({"protocol": if rng.random_bool(0.5) { json!(47) } else { json!("icmpv6") }})
                }
                _ => json!({"protocol": "udp", "from_port": 53, "to_port": 53}),
            };
            body["direction"] = json!(direction);
            let six = dual && rng.random_bool(0.5);
            match rng.random_range(0..10) {
                0..=2 => body["group"] = json!(groups[rng.random_range(0..groups.len())]),
                3 => {
                    body["cidr"] = json!(match (rng.random_bool(0.5), six) {
                        (true, false) => "0.0.0.0/0",
                        (true, true) => "::/0",
                        (false, false) => "fd00::/16",
                        (false, true) => "10.0.0.0/8",
                    })
                }
                _ if six => {
                    let base = bases6[rng.random_range(0..bases6.len())];
                    let len = rng.random_range(1..=128u8);
                    body["cidr"] = json!(format!("{base}/{len}"));
                }
                _ => {
                    let base = bases[rng.random_range(0..bases.len())];
                    let len = rng.random_range(1..=32u8);
                    body["cidr"] = json!(format!("{base}/{len}"));
                }
            }
            let req: CreateRule = serde_json::from_value(body).unwrap();
            // Random rules may repeat one another (409); fine here.
            let _ = s.add_rule(g, req);
        }
        // Rules whose protocol and CIDR are of different families (accepted, as AWS does):
        // they must match nothing in either.
        if rng.random_bool(0.5) {
            let g = s.groups.get_mut(&groups[rng.random_range(0..groups.len())]).unwrap();
            for (n, (protocol, cidr)) in
                [(Protocol::ICMPV6, "10.1.0.0/16"), (Protocol::ICMP, "fd00:ab::/32")]
                    .into_iter()
                    .enumerate()
            {
                let rule = model::Rule {
                    id: format!("sgr-0000fe{n:02x}"),
                    direction: Direction::Ingress,
                    protocol,
                    ports: None,
                    icmp: Some((None, None)),
                    peer: Peer::Cidr(cidr.parse().unwrap()),
                    description: String::new(),
                };
                model::insert_by_id(&mut g.ingress, rule);
            }
        }
        let mut all: Vec<IpAddr> = addresses.iter().map(|(a, _)| IpAddr::V4(*a)).collect();
        if dual {
            all.extend(addresses.iter().map(|(_, a)| IpAddr::V6(*a)));
        }
        (s, all)
    }

    /// The verdicts of every local identity of `s` towards every address (and a few outside
    /// every rule), both directions, a mix of protocols: (query, dataplane's verdict), checked
    /// against the reference on the way.
    fn verdicts(s: &State, d: &MapContents, addresses: &[IpAddr], seed: u64) -> Vec<(Query, bool)> {
        let mut rng = StdRng::seed_from_u64(seed);
        let lpm = Lpm::new(d);
        let vni = s.universes.values().next().unwrap().vni;
        let mut by_ip: HashMap<IpAddr, u32> = HashMap::new();
        for e in s.endpoints.values() {
            by_ip.insert(IpAddr::V4(e.ip), e.identity);
            if let Some(a) = e.ipv6 {
                by_ip.insert(IpAddr::V6(a), e.identity);
            }
        }
        let local: BTreeSet<u32> =
            s.endpoints.values().filter(|e| e.host == HOST).map(|e| e.identity).collect();
        let outside: [IpAddr; 4] = [
            "10.9.9.9".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            "fd00:ab:ff::1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let mut out = Vec::new();
        for &policy in &local {
            for &peer_ip in addresses.iter().chain(&outside) {
                for direction in [dp::DIRECTION_INGRESS, dp::DIRECTION_EGRESS] {
                    let mut icmp = [0u16; 2];
                    for t in &mut icmp {
                        *t = u16::from_be_bytes([rng.random_range(0..5), rng.random_range(0..4)]);
                    }
                    let probes: [(u8, u16); 9] = [
                        (TCP, rng.random_range(0..2400)),
                        (UDP, rng.random_range(0..2400)),
                        (UDP, 53),
                        (TCP, rng.random()),
                        (ICMP, icmp[0]),
                        (ICMPV6, icmp[1]),
                        (47, 0),
                        (ICMPV6, 0),
                        (99, 0),
                    ];
                    for (proto, port) in probes {
                        let q = Query {
                            policy,
                            direction,
                            peer_identity: by_ip.get(&peer_ip).copied(),
                            vni,
                            peer_ip,
                            proto,
                            port,
                        };
                        let verdict = dataplane_allows(&lpm, d, q);
                        assert_eq!(verdict, reference_allows(s, q), "{q:?}\n{s:#?}");
                        out.push((q, verdict));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn s1_compiled_policy_agrees_with_the_rules_on_random_states() {
        let mut rng = StdRng::seed_from_u64(0x5e75e);
        let (mut checked, mut allowed) = ([0u64; 2], [0u64; 2]);
        for round in 0..80 {
            let (s, addresses) = random_state(&mut rng);
            let d = compile_all(&s, &mut Ids::default());
            for (q, verdict) in verdicts(&s, &d, &addresses, round) {
                let family = usize::from(q.peer_ip.is_ipv6());
                checked[family] += 1;
                allowed[family] += u64::from(verdict);
            }
        }
        println!("{checked:?} verdicts checked (IPv4, IPv6), {allowed:?} allowed");
        for f in 0..2 {
            assert!(
                allowed[f] > checked[f] / 10 && allowed[f] < checked[f] * 9 / 10,
                "the cases of each family must mix verdicts"
            );
        }
    }

    /// `s` without the rules `drop` names (a new revision of each group that had one).
    fn without(s: &State, drop: impl Fn(&model::Rule) -> bool) -> State {
        let mut out = s.clone();
        let ids: Vec<String> = out.groups.keys().cloned().collect();
        for id in ids {
            let g = &s.groups[&id];
            if g.ingress.iter().chain(&g.egress).any(&drop) {
                let g = out.groups.get_mut(&id).unwrap();
                g.ingress.retain(|r| !drop(r));
                g.egress.retain(|r| !drop(r));
            }
        }
        out
    }

    /// Whether a rule makes entries for peers of `family` only: a CIDR of that family, or a
    /// group peer with `icmp` (IPv4) / `icmpv6` (IPv6).
    fn only(family: Family, r: &model::Rule) -> bool {
        match (&r.peer, family) {
            (Peer::Cidr(IpNetwork::V4(_)), Family::V4) => true,
            (Peer::Cidr(IpNetwork::V6(_)), Family::V6) => true,
            (Peer::Group(_), Family::V4) => r.protocol == Protocol::ICMP,
            (Peer::Group(_), Family::V6) => r.protocol == Protocol::ICMPV6,
            (Peer::Cidr(_), _) => false,
        }
    }

    /// The IPv4 maps of `d`: everything but its IPv6 contents.
    /// What IPv4 packets are judged by: everything but the IPv6 contents and the endpoints'
    /// IPv6 addresses and gateways.
    /// Rule slots are numbered over the rules of both families, so they are left out too: what
    /// counts is the rule each IPv4 entry names (and `rules` lists those rules).
    fn ipv4_part(d: &MapContents) -> MapContents {
        let mut endpoints = d.endpoints.clone();
        endpoints.values_mut().for_each(|e| (e.ip6, e.gateway6) = ([0; 16], [0; 16]));
        let mut policy = d.policy.clone();
        policy.values_mut().for_each(|v| v.slot = 0);
        let named: BTreeSet<u32> = policy.values().map(|v| v.rule).collect();
        let rules = d.rules.values().filter(|r| named.contains(r)).map(|&r| (r, r)).collect();
        MapContents { ipv6: Ipv6Contents::default(), endpoints, policy, rules, ..d.clone() }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]

        /// AWS semantics: a rule of one family never admits a peer of the other. Removing every
        /// rule that can only match IPv6 (IPv6 CIDRs, `::/0`, `icmpv6`) changes no IPv4 verdict
        /// and not one byte of the IPv4 maps; removing every rule that can only match IPv4
        /// (`0.0.0.0/0` included, `icmp`) changes no IPv6 verdict.
        #[test]
        fn a_rule_of_one_family_never_admits_a_peer_of_the_other(seed in proptest::prelude::any::<u64>()) {
            let (s, addresses) = random_state(&mut StdRng::seed_from_u64(seed));
            let d = compile_all(&s, &mut Ids::default());
            let all = verdicts(&s, &d, &addresses, seed);
            for (family, peers_of) in [(Family::V4, Family::V6), (Family::V6, Family::V4)] {
                // Drop the rules that only match the *other* family: this family's verdicts stay.
                let fewer = without(&s, |r| only(peers_of, r));
                let d2 = compile_all(&fewer, &mut Ids::default());
                if family == Family::V4 {
                    proptest::prop_assert_eq!(ipv4_part(&d2), ipv4_part(&d));
                }
                let again = verdicts(&fewer, &d2, &addresses, seed);
                proptest::prop_assert_eq!(again.len(), all.len());
                for ((q, before), (_, after)) in all.iter().zip(&again) {
                    if q.peer_ip.is_ipv6() == (family == Family::V6) {
                        proptest::prop_assert_eq!(before, after, "{:?}", q);
                    }
                }
            }
        }

        /// Adding IPv6 (the universe's IPv6 CIDRs, endpoints' IPv6 addresses, IPv6 rules) to an
        /// IPv4 state leaves every IPv4 map as it was.
        #[test]
        fn ipv4_maps_are_unchanged_by_ipv6(seed in proptest::prelude::any::<u64>()) {
            let (dual, _) = random_state_of(&mut StdRng::seed_from_u64(seed), true);
            let d = compile_all(&dual, &mut Ids::default());
            let mut v4 = without(&dual, |r| only(Family::V6, r));
            v4.universes.update_all(|_, u| u.ipv6_cidrs.clear());
            v4.endpoints.update_all(|_, e| e.ipv6 = None);
            let d4 = compile_all(&v4, &mut Ids::default());
            proptest::prop_assert_eq!(d4.ipv6.clone(), Ipv6Contents::default());
            proptest::prop_assert_eq!(ipv4_part(&d4), ipv4_part(&d));
        }
    }

    // ---- Determinism and stable numbering ----

    #[test]
    fn compile_is_deterministic() {
        let (s, _) = random_state(&mut StdRng::seed_from_u64(3));
        let mut ids = Ids::default();
        let first = compile_all(&s, &mut ids);
        let numbering = ids.cidrs.ids.clone();
        assert_eq!(compile_all(&s, &mut ids), first);
        assert_eq!(ids.cidrs.ids, numbering);
        assert_eq!(compile_all(&s.clone(), &mut Ids::default()), first);
    }

    fn class_ids(d: &MapContents) -> BTreeMap<String, u32> {
        d.cidrs
            .iter()
            .map(|((p, k), v)| {
                (format!("{}/{}", Ipv4Addr::from(k.addr), p - 32), v & !dp::peer::CIDR_FLAG)
            })
            .collect()
    }

    #[test]
    fn cidr_ids_stay_stable_across_edits() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let g = default_group(&s, &u.id);
        endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        let add = |s: &mut State, cidr: &str| {
            rule(s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": cidr})).id
        };
        let r1 = add(&mut s, "10.1.0.0/16");
        let r2 = add(&mut s, "10.2.0.0/16");
        let r3 = add(&mut s, "10.3.0.0/16");
        let mut ids = Ids::default();
        let d = compile_all(&s, &mut ids);
        let before = class_ids(&d);
        assert_eq!(
            before,
            BTreeMap::from([
                ("10.1.0.0/16".into(), 1),
                ("10.2.0.0/16".into(), 2),
                ("10.3.0.0/16".into(), 3)
            ])
        );

        // A new class sorting before the others takes a new number; nothing is renumbered.
        add(&mut s, "10.0.5.0/24");
        let d = compile_all(&s, &mut ids);
        assert_eq!(class_ids(&d)["10.0.5.0/24"], 4);
        for (cidr, id) in &before {
            assert_eq!(class_ids(&d)[cidr], *id, "{cidr} kept its id");
        }

        // Removing a class and adding another in one edit: the freed id waits a compile.
        s.delete_rule(&g, &r2).unwrap();
        add(&mut s, "10.9.0.0/16");
        let d = compile_all(&s, &mut ids);
        let now = class_ids(&d);
        assert!(!now.contains_key("10.2.0.0/16"), "unused classes are dropped");
        assert_eq!(now["10.9.0.0/16"], 5, "id 2 was freed by this very compile");
        assert_eq!((now["10.1.0.0/16"], now["10.3.0.0/16"], now["10.0.5.0/24"]), (1, 3, 4));
        assert_eq!(ids.cidrs.ids.len(), 4);
        add(&mut s, "10.10.0.0/16");
        let d = compile_all(&s, &mut ids);
        assert_eq!(class_ids(&d)["10.10.0.0/16"], 2, "then the smallest free id is reused");

        // A class that stays through its rules being replaced keeps its id.
        s.delete_rule(&g, &r1).unwrap();
        rule(
            &mut s,
            &g,
            json!({"direction": "egress", "protocol": "tcp", "from_port": 1, "to_port": 1, "cidr": "10.1.0.0/16"}),
        );
        let _ = r3;
        let d = compile_all(&s, &mut ids);
        assert_eq!(class_ids(&d)["10.1.0.0/16"], 1);
    }

    #[test]
    fn a_seed_with_a_duplicate_id_is_renumbered_not_trusted() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let g = default_group(&s, &u.id);
        endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        rule(&mut s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": "10.1.0.0/16"}));
        rule(&mut s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": "10.2.0.0/16"}));
        let mut ids = Ids::default();
        ids.cidrs.ids.insert((u.vni, "10.1.0.0/16".parse().unwrap()), 7);
        ids.cidrs.ids.insert((u.vni, "10.2.0.0/16".parse().unwrap()), 7);
        let d = compile_all(&s, &mut ids);
        let classes = class_ids(&d);
        assert_eq!(classes["10.1.0.0/16"], 7);
        assert_eq!(classes["10.2.0.0/16"], 1);
    }

    #[test]
    fn a_failed_compile_leaves_the_numbering_alone() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let g = default_group(&s, &u.id);
        endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        rule(&mut s, &g, json!({"direction": "ingress", "protocol": "all", "cidr": "10.1.0.0/16"}));
        let mut ids = Ids::default();
        ids.cidrs.ids.insert((u.vni, "10.7.0.0/16".parse().unwrap()), 1);
        let before = ids.cidrs.ids.clone();
        let bad_mac = |ep: &model::Endpoint| Some(u32::from(ep.ip));
        let mut broken = s.clone();
        broken.endpoints.update_all(|_, e| e.mac = "nonsense".into());
        assert!(compile(&broken, HOST, &bad_mac, &mut ids).is_err());
        assert_eq!(ids.cidrs.ids, before);
    }

    /// rule id -> the slot every one of its policy entries carries (and `rules` names).
    fn rule_slots_of(d: &MapContents) -> BTreeMap<u32, u32> {
        let mut out = BTreeMap::new();
        for v in d.policy.values().chain(d.ipv6.policy.values()) {
            let slot = *out.entry(v.rule).or_insert(v.slot);
            assert_eq!(slot, v.slot, "every entry of rule {:08x} carries one slot", v.rule);
        }
        let held: BTreeMap<u32, u32> = d.rules.iter().map(|(&s, &r)| (r, s)).collect();
        assert_eq!(out, held, "the slots in use are those the entries carry");
        out
    }

    /// A rule that admits only IPv6 (`::/0`, an IPv6 CIDR, `icmpv6`) has IPv6 entries only, and
    /// a slot all the same: its new flows are counted like any rule's.
    #[test]
    fn a_rule_that_admits_only_ipv6_has_a_slot() {
        let mut s = State::default();
        let u = dual_universe(&mut s, "10.0.0.0/24", Some(CIDR6));
        let g = default_group(&s, &u.id);
        dual_endpoint(&mut s, HOST, &u.id, ("10.0.0.10", Some("fd00:ab::10")), &[&g]);
        let only6 = [
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "::/0"}),
            json!({"direction": "ingress", "protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "fd00:ab::/64"}),
            json!({"direction": "ingress", "protocol": "icmpv6", "cidr": "::/0"}),
        ];
        let ids: Vec<u32> = only6
            .iter()
            .map(|r| {
                let rule = s.add_rule(&g, serde_json::from_value(r.clone()).unwrap()).unwrap();
                model::rule_bits(&rule.id).unwrap()
            })
            .collect();
        let d = compile_all(&s, &mut Ids::default());
        let slots = rule_slots_of(&d);
        for id in ids {
            assert!(d.policy.values().all(|v| v.rule != id), "{id:08x} has no IPv4 entry");
            assert!(slots.get(&id).is_some_and(|&s| s != 0), "{id:08x} has a slot: {slots:?}");
        }
    }

    #[test]
    fn rule_slots_stay_with_their_rule_and_a_freed_slot_waits_a_compile() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let g = default_group(&s, &u.id);
        endpoint(&mut s, &u.id, "10.0.0.10", &[]);
        let add = |s: &mut State, port: u16| {
            let body = json!({"direction": "ingress", "protocol": "tcp", "from_port": port,
                              "to_port": port, "cidr": "0.0.0.0/0"});
            model::rule_bits(&rule(s, &g, body).id).unwrap()
        };
        let mut ids = Ids::default();
        let first = rule_slots_of(&compile_all(&s, &mut ids));
        let mut slots: Vec<u32> = first.values().copied().collect();
        slots.sort();
        assert_eq!(slots, (1..=first.len() as u32).collect::<Vec<_>>(), "dense from 1");

        let a = add(&mut s, 80);
        let now = rule_slots_of(&compile_all(&s, &mut ids));
        for (rule, slot) in &first {
            assert_eq!(now[rule], *slot, "an edit moves no rule's slot");
        }
        let slot_a = now[&a];
        assert_eq!(slot_a, first.len() as u32 + 1);

        // Deleting a and adding b in one edit: a's slot is not b's.
        let id_a = s.groups[&g].ingress.iter().find(|r| model::rule_bits(&r.id) == Some(a));
        let id_a = id_a.unwrap().id.clone();
        s.delete_rule(&g, &id_a).unwrap();
        let b = add(&mut s, 81);
        let now = rule_slots_of(&compile_all(&s, &mut ids));
        assert!(!now.contains_key(&a), "a's last entry left: its slot is freed");
        assert_eq!(now[&b], slot_a + 1, "the slot freed by this very compile waits");
        // The next compile hands it out again.
        let c = add(&mut s, 82);
        let now = rule_slots_of(&compile_all(&s, &mut ids));
        assert_eq!(now[&c], slot_a, "then the smallest free slot is reused");
        assert_eq!(now[&b], slot_a + 1);

        // A recompile of the same state changes nothing; a fresh allocator may number otherwise
        // but names the same rules.
        let again = rule_slots_of(&compile_all(&s, &mut ids));
        assert_eq!(again, now);
        let fresh = rule_slots_of(&compile_all(&s, &mut Ids::default()));
        assert_eq!(fresh.keys().collect::<Vec<_>>(), now.keys().collect::<Vec<_>>());
    }

    #[test]
    fn a_seeded_slot_is_kept_and_a_shared_or_bad_one_is_replaced() {
        let held =
            RuleSlots { ids: BTreeMap::from([(7, 5), (8, 5), (9, dp::capacity::RULE_HITS)]) };
        let wanted = BTreeSet::from([7, 8, 9, 10]);
        let got = held.renumber(&wanted).unwrap();
        assert_eq!(got.ids[&7], 5, "kept");
        // 8 shared 5 with 7, 9's slot is beyond the array: both get fresh ones, as does 10,
        // none of them 5 (still held).
        let fresh: BTreeSet<u32> = [8, 9, 10].iter().map(|r| got.ids[r]).collect();
        assert_eq!(fresh, BTreeSet::from([1, 2, 3]));
    }

    #[test]
    fn policy_kinds_are_widened_before_the_entries_and_narrowed_after_them() {
        use dp::peer_kind::{bit, ANY, CIDR, IDENTITY};
        let (i, e) = (dp::DIRECTION_INGRESS, dp::DIRECTION_EGRESS);
        let with = |kinds: &[(u32, u32)]| MapContents {
            policy_kinds: kinds.iter().copied().collect(),
            ..MapContents::default()
        };
        // Identity 7 moves from an identity peer to 0.0.0.0/0, 8 keeps its kinds, 9 is new and
        // 10 loses every entry.
        let current =
            with(&[(7, bit(i, IDENTITY) | bit(e, ANY)), (8, bit(i, CIDR)), (10, bit(e, ANY))]);
        let desired = with(&[(7, bit(i, ANY) | bit(e, ANY)), (8, bit(i, CIDR)), (9, bit(i, CIDR))]);
        assert_eq!(
            policy_kinds_before(&current, &desired),
            [(7, bit(i, IDENTITY) | bit(i, ANY) | bit(e, ANY)), (9, bit(i, CIDR))],
            "before the entries: the union, only where it grows"
        );
        assert_eq!(
            policy_kinds_after(&current, &desired),
            [(7, bit(i, ANY) | bit(e, ANY)), (10, 0)],
            "after the removals: exactly the new kinds, only where the union was wider"
        );
        assert!(policy_kinds_before(&desired, &desired).is_empty());
        assert!(policy_kinds_after(&desired, &desired).is_empty());
    }

    #[test]
    fn rule_slots_that_run_out_are_refused_naming_the_map() {
        let max = dp::capacity::RULE_HITS;
        let held = RuleSlots { ids: (1..max).map(|slot| (slot, slot)).collect() };
        // Every slot is held (by rules this edit drops): none is free for a new rule now.
        let err = held.renumber(&BTreeSet::from([max + 1])).unwrap_err();
        assert!(err.to_string().contains(dp::map_names::RULE_HITS), "{err}");
        // Within MAX_RULES on each side, the two numberings always fit together.
        let old: BTreeSet<u32> = (1..=dp::rule_slots::MAX_RULES).collect();
        let new: BTreeSet<u32> = old.iter().map(|r| r + dp::rule_slots::MAX_RULES).collect();
        let first = RuleSlots::default().renumber(&old).unwrap();
        let second = first.renumber(&new).unwrap();
        let held: BTreeSet<u32> = first.ids.values().copied().collect();
        assert!(second.ids.values().all(|s| *s < max && !held.contains(s)));
        assert!(fits_rules(HOST, dp::rule_slots::MAX_RULES as usize).is_ok());
        let err = fits_rules(HOST, dp::rule_slots::MAX_RULES as usize + 1).unwrap_err();
        assert!(err.to_string().contains(dp::map_names::RULE_HITS), "{err}");
    }

    proptest::proptest! {
        /// The counters of `VERSE_RULE_HITS` as the kernel keeps them, through edits applied in
        /// `Dataplane::apply`'s order (slots zeroed, then the new entries, then the old ones
        /// removed), with new flows counted by old and new entries alike while both are in the
        /// map: every rule reads exactly the flows it admitted since it came to the host.
        #[test]
        fn rule_counts_never_move_to_another_rule(
            steps in proptest::collection::vec(
                (
                    proptest::collection::btree_set(1u32..24, 0..12),
                    proptest::collection::vec(0usize..64, 0..16),
                    proptest::collection::vec(0usize..64, 0..16),
                ),
                1..30,
            )
        ) {
            let mut slots = RuleSlots::default();
            let mut counts = vec![0u64; 64];
            let mut truth: BTreeMap<u32, u64> = BTreeMap::new();
            for (wanted, during, after) in steps {
                let old = slots.clone();
                let new = old.renumber(&wanted).unwrap();
                let held: BTreeSet<u32> = old.ids.values().copied().collect();
                for (rule, &slot) in &new.ids {
                    proptest::prop_assert!(slot >= 1);
                    if old.ids.get(rule) != Some(&slot) {
                        proptest::prop_assert!(!held.contains(&slot), "a held slot reused at once");
                        counts[slot as usize] = 0;
                        truth.insert(*rule, 0);
                    }
                }
                let distinct: BTreeSet<u32> = new.ids.values().copied().collect();
                proptest::prop_assert_eq!(distinct.len(), new.ids.len());
                // Both old and new entries are in the map: either may admit a flow.
                let live: Vec<(u32, u32)> = old.ids.iter().chain(&new.ids).map(|(r, s)| (*r, *s)).collect();
                for i in during.iter().filter(|_| !live.is_empty()) {
                    let (rule, slot) = live[i % live.len()];
                    counts[slot as usize] += 1;
                    *truth.entry(rule).or_default() += 1;
                }
                // The old entries are removed.
                let live: Vec<(u32, u32)> = new.ids.iter().map(|(r, s)| (*r, *s)).collect();
                for i in after.iter().filter(|_| !live.is_empty()) {
                    let (rule, slot) = live[i % live.len()];
                    counts[slot as usize] += 1;
                    *truth.entry(rule).or_default() += 1;
                }
                for (rule, &slot) in &new.ids {
                    proptest::prop_assert_eq!(counts[slot as usize], truth[rule], "rule {}", rule);
                }
                slots = new;
            }
        }
    }

    // ---- S12: what does not fit is refused ----

    #[test]
    fn s12_too_many_endpoints_on_a_host_is_refused() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/16");
        let g = default_group(&s, &u.id);
        for i in 0..=dp::capacity::ENDPOINTS {
            let n = 10 + i;
            let ep = model::Endpoint {
                id: format!("ep-{n:08x}"),
                universe: u.id.clone(),
                host: HOST.into(),
                netns: format!("ns{n}"),
                ip: Ipv4Addr::from(u32::from(ip("10.0.0.0")) + n),
                mac: "02:00:00:00:00:01".into(),
                interface: format!("vx{n:08x}"),
                security_groups: vec![g.clone()],
                identity: 1,
                conntrack_budget: 1,
                serial: u64::from(n),
                slot: i + 1,
                flow_logs: false,
                ipv6: None,
            };
            s.endpoints.insert(ep.id.clone(), ep);
        }
        s.identities.insert(1, model::Identity { universe: u.id.clone(), groups: vec![g] });
        let err = check_fits(&s).unwrap_err();
        assert_eq!((err.kind, err.code), (model::ErrorKind::Conflict, "limit_exceeded"));
        assert!(err.message.contains(dp::map_names::ENDPOINTS), "{}", err.message);
        let one_less = s.endpoints.keys().next_back().unwrap().clone();
        s.endpoints.remove(&one_less);
        check_fits(&s).unwrap();
    }

    #[test]
    fn s12_a_policy_too_big_for_the_map_is_refused() {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let classes = group(&mut s, &u.id, "classes");
        // 998 /24 classes under 10.0.0.0/8; every rule for the /8 expands over all of them.
        for i in 0..998u32 {
            let cidr = format!("10.{}.{}.0/24", i / 250, i % 250);
            rule(&mut s, &classes, json!({"direction": "egress", "protocol": "all", "cidr": cidr}));
        }
        let mut groups = vec![classes];
        for k in 0..3u16 {
            let g = group(&mut s, &u.id, &format!("wide{k}"));
            for j in 0..800u16 {
                let port = 1000 * k + j;
                rule(
                    &mut s,
                    &g,
                    json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "cidr": "10.0.0.0/8"}),
                );
            }
            groups.push(g);
        }
        let g: Vec<&str> = groups.iter().map(String::as_str).collect();
        endpoint(&mut s, &u.id, "10.9.0.5", &g);
        let started = std::time::Instant::now();
        let err = check_fits(&s).unwrap_err();
        println!("refused in {:?}: {err}", started.elapsed());
        assert_eq!((err.kind, err.code), (model::ErrorKind::Conflict, "limit_exceeded"));
        assert!(err.message.contains(dp::map_names::POLICY), "{}", err.message);
    }

    #[test]
    fn check_fits_accepts_an_ordinary_state_without_interfaces() {
        let (s, _) = random_state(&mut StdRng::seed_from_u64(11));
        check_fits(&s).unwrap();
        check_fits(&State::default()).unwrap();
    }

    // ---- Speed ----

    /// 100,000 rules in 100 groups of one universe, with every group on some local endpoint.
    fn big_state() -> State {
        let mut s = State::default();
        let u = universe(&mut s, "10.0.0.0/8");
        let mut rng = StdRng::seed_from_u64(100_000);
        let groups: Vec<String> =
            (0..100).map(|i| group(&mut s, &u.id, &format!("g{i}"))).collect();
        let mut next_rule = 0u32;
        for g in &groups {
            let sg = s.groups.get_mut(g).unwrap();
            sg.egress.clear();
            for _ in 0..model::MAX_RULES_PER_GROUP {
                next_rule += 1;
                let peer = match rng.random_range(0..100) {
                    0..=9 => Peer::Group(groups[rng.random_range(0..groups.len())].clone()),
                    10..=14 => Peer::Cidr("0.0.0.0/0".parse().unwrap()),
                    15 => Peer::Cidr(
                        format!("10.{}.0.0/16", rng.random_range(0..20)).parse().unwrap(),
                    ),
                    16..=59 => Peer::Cidr(
                        format!("10.{}.{}.0/24", rng.random_range(0..20), rng.random_range(0..100))
                            .parse()
                            .unwrap(),
                    ),
                    _ => Peer::Cidr(
                        format!("172.16.{}.{}/32", rng.random_range(0..40), rng.random::<u8>())
                            .parse()
                            .unwrap(),
                    ),
                };
                let (protocol, ports, icmp) = match rng.random_range(0..10) {
                    0 => (Protocol::All, None, None),
                    1 => (Protocol::ICMP, None, Some((Some(rng.random_range(0..20)), None))),
                    2 => {
                        let a: u16 = rng.random_range(1024..60000);
                        (Protocol::TCP, Some((a, a + rng.random_range(1..1000))), None)
                    }
                    3..=5 => (Protocol::UDP, Some((rng.random_range(1..65535), 0)), None),
                    _ => (Protocol::TCP, Some((rng.random_range(1..65535), 0)), None),
                };
                let ports = ports.map(|(a, b): (u16, u16)| (a, b.max(a)));
                let direction =
                    if rng.random_bool(0.7) { Direction::Ingress } else { Direction::Egress };
                let rule = model::Rule {
                    id: format!("sgr-{next_rule:08x}"),
                    direction,
                    protocol,
                    ports,
                    icmp,
                    peer,
                    description: String::new(),
                };
                match direction {
                    Direction::Ingress => sg.ingress.push(rule),
                    Direction::Egress => sg.egress.push(rule),
                }
            }
        }
        for (i, chunk) in groups.chunks(model::MAX_GROUPS_PER_ENDPOINT).enumerate() {
            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
            for j in 0..3 {
                endpoint(&mut s, &u.id, &format!("10.{i}.{j}.10"), &chunk);
            }
        }
        s
    }

    #[test]
    fn compiles_100_000_rules_fast() {
        let s = big_state();
        let rules: usize = s.groups.values().map(|g| g.ingress.len() + g.egress.len()).sum();
        assert!(rules >= 100_000);
        let mut ids = Ids::default();
        let started = std::time::Instant::now();
        let d = compile_all(&s, &mut ids);
        let first = started.elapsed();
        let started = std::time::Instant::now();
        let again = compile_all(&s, &mut ids);
        let second = started.elapsed();
        assert_eq!(again, d);
        println!(
            "compiled {rules} rules into {} policy and {} CIDR entries in {first:?} (again: {second:?}, {} build)",
            d.policy.len(),
            d.cidrs.len(),
            if cfg!(debug_assertions) { "debug" } else { "release" },
        );
        let budget = if cfg!(debug_assertions) { 20.0 } else { 1.0 };
        assert!(first.as_secs_f64() < budget, "{first:?}");
    }
}
