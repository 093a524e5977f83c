//! The rule compiler: desired state -> the entries of this host's dataplane maps. Pure.
//!
//! Contract: [`compile`] is deterministic for a given state, host and CIDR-id allocator, and its
//! output is exactly what the maps must hold (the reconciler writes the difference). Per-packet
//! cost stays constant however many rules there are: every rule becomes LPM entries keyed by
//! (policy, direction, peer, protocol, port prefix) — see `dataplane_common::PolicyKey`.
//!
//! Peers: a group peer matches every identity whose set of groups contains that group (S5); a
//! CIDR peer matches every *CIDR class* nested in it. CIDR classes are the distinct rule CIDRs of
//! a universe, found by longest match in `VERSE_CIDRS`; since CIDRs nest or are disjoint, the
//! longest match of an address determines every rule CIDR that contains it, so expanding a rule
//! over the classes nested in its CIDR keeps the union of S1 exact. `0.0.0.0/0` is the `ANY`
//! peer and needs no expansion.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dataplane_common as dp;
use ipnetwork::{IpNetwork, Ipv4Network};

use crate::model::{self, Peer, Protocol, State};

/// The contents the dataplane maps must have on one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// `VERSE_ENDPOINTS`: host-side ifindex -> endpoint.
    pub endpoints: BTreeMap<u32, dp::Endpoint>,
    /// `VERSE_ROUTES`.
    pub routes: BTreeMap<dp::RouteKey, dp::Route>,
    /// `VERSE_CIDRS`: (prefix length, key) -> CIDR class peer value (`peer::CIDR_FLAG | n`).
    pub cidrs: BTreeMap<(u32, dp::CidrKey), u32>,
    /// `VERSE_POLICY`: (prefix length, key); presence allows.
    pub policy: BTreeSet<(u32, dp::PolicyKey)>,
}

/// Stable numbering of CIDR classes, so that an edit renumbers nothing. The reconciler seeds it
/// from what `VERSE_CIDRS` holds at start.
#[derive(Clone, Debug, Default)]
pub struct CidrIds {
    pub ids: BTreeMap<(u32, Ipv4Network), u32>,
}

/// Compiles `state` for `host`. `ifindex` gives the host-side ifindex of a local endpoint, or
/// `None` while it is not plumbed (it is then left out). Fails with a 409 `limit_exceeded` when
/// the result would not fit the map capacities of `dataplane_common::capacity` (S12).
///
/// On success `cidr_ids` holds the numbering of the result; on failure it is left unchanged.
pub fn compile(
    state: &State,
    host: &str,
    ifindex: &dyn Fn(&model::Endpoint) -> Option<u32>,
    cidr_ids: &mut CidrIds,
) -> model::Result<Desired> {
    let mut desired = Desired::default();

    // Local, plumbed endpoints: the keys of VERSE_ENDPOINTS and the routes between them.
    let mut local_identities = BTreeSet::new();
    let mut local_universes = BTreeSet::new();
    for ep in state.endpoints.values().filter(|e| e.host == host) {
        let (Some(index), Some(universe)) = (ifindex(ep), state.universes.get(&ep.universe)) else {
            continue;
        };
        let mac = model::parse_mac(&ep.mac).ok_or_else(|| {
            model::Error::invalid("mac", format!("endpoint {} has a malformed MAC {:?}", ep.id, ep.mac))
        })?;
        let ip = ep.ip.octets();
        desired.endpoints.insert(
            index,
            dp::Endpoint { ip, mac, _pad: [0; 2], vni: universe.vni, identity: ep.identity },
        );
        desired.routes.insert(
            dp::RouteKey { vni: universe.vni, ip },
            dp::Route { ifindex: index, identity: ep.identity, mac, _pad: [0; 2] },
        );
        local_identities.insert(ep.identity);
        local_universes.insert(universe.id.as_str());
    }
    fits(host, dp::map_names::ENDPOINTS, desired.endpoints.len(), dp::capacity::ENDPOINTS)?;
    fits(host, dp::map_names::ROUTES, desired.routes.len(), dp::capacity::ROUTES)?;

    // CIDR classes of the universes present here.
    let mut wanted = BTreeSet::new();
    for group in state.groups.values().filter(|g| local_universes.contains(g.universe.as_str())) {
        let Some(universe) = state.universes.get(&group.universe) else { continue };
        for rule in group.ingress.iter().chain(&group.egress) {
            if let Some(cidr) = class_cidr(rule) {
                wanted.insert((universe.vni, cidr));
            }
        }
    }
    let numbered = cidr_ids.renumber(&wanted)?;
    fits(host, dp::map_names::CIDRS, numbered.ids.len(), dp::capacity::CIDRS)?;
    // Per universe, classes ordered by (network, prefix): the classes nested in a rule CIDR are
    // a contiguous range of networks, so expansion is a range scan, not a search of all.
    let mut nested: BTreeMap<u32, BTreeMap<(u32, u8), u32>> = BTreeMap::new();
    for (&(vni, cidr), &id) in &numbered.ids {
        let key = dp::CidrKey { vni: vni.to_be_bytes(), addr: cidr.network().octets() };
        desired.cidrs.insert((dp::CIDR_KEY_VNI_BITS + u32::from(cidr.prefix()), key), dp::peer::CIDR_FLAG | id);
        nested.entry(vni).or_default().insert((u32::from(cidr.network()), cidr.prefix()), id);
    }

    // Group peers (S5): the identities whose sets of groups contain the group.
    let mut members: HashMap<&str, Vec<u32>> = HashMap::new();
    for (&n, identity) in &state.identities {
        for group in &identity.groups {
            members.entry(group.as_str()).or_default().push(n);
        }
    }

    let mut policy = PolicyEntries::new(host);
    let mut peers = Vec::new();
    let mut matches = Vec::new();
    let no_classes = BTreeMap::new();
    for &local in &local_identities {
        let Some(identity) = state.identities.get(&local) else { continue };
        let Some(universe) = state.universes.get(&identity.universe) else { continue };
        let classes = nested.get(&universe.vni).unwrap_or(&no_classes);
        for group in identity.groups.iter().filter_map(|g| state.groups.get(g)) {
            if group.universe != universe.id {
                continue;
            }
            let directions =
                [(dp::DIRECTION_INGRESS, &group.ingress), (dp::DIRECTION_EGRESS, &group.egress)];
            for (direction, rules) in directions {
                for rule in rules {
                    peers.clear();
                    rule_peers(rule, &members, classes, &mut peers);
                    matches.clear();
                    rule_matches(rule, &mut matches);
                    for &peer in &peers {
                        for &(prefix, proto, port) in &matches {
                            policy.push(prefix, dp::PolicyKey {
                                policy: local.to_be_bytes(),
                                direction,
                                peer: peer.to_be_bytes(),
                                proto,
                                port: port.to_be_bytes(),
                            })?;
                        }
                    }
                }
            }
        }
    }
    desired.policy = policy.finish()?;
    *cidr_ids = numbered;
    Ok(desired)
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
        compile(state, host, &ifindex, &mut CidrIds::default())?;
    }
    Ok(())
}

impl CidrIds {
    /// The numbering of `wanted`: classes already numbered keep their id; new ones take the
    /// smallest id (from 1) that neither the old nor the new numbering holds; the rest is dropped.
    ///
    /// An id dropped here is not reused before the next compile: the reconciler adds before it
    /// removes, and a reused id would meanwhile give the new class the old class's rules.
    fn renumber(&self, wanted: &BTreeSet<(u32, Ipv4Network)>) -> model::Result<CidrIds> {
        let mut ids = BTreeMap::new();
        let mut taken: BTreeSet<u32> = self.ids.values().copied().collect();
        let mut fresh = Vec::new();
        let mut kept = BTreeSet::new();
        for key in wanted {
            match self.ids.get(key) {
                // A seed read back from the maps could hold an id twice or out of range; such a
                // class is numbered afresh rather than trusted.
                Some(&id) if id != 0 && id < dp::peer::CIDR_FLAG && kept.insert(id) => {
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
            if next >= dp::peer::CIDR_FLAG {
                return Err(limit(format!("CIDR class ids exhausted ({} in use)", taken.len())));
            }
            taken.insert(next);
            ids.insert(key, next);
        }
        Ok(CidrIds { ids })
    }
}

/// The CIDR class a rule contributes: its IPv4 CIDR, canonical, unless it is /0 (the `ANY`
/// peer) or the rule has a group peer or an IPv6 CIDR.
fn class_cidr(rule: &model::Rule) -> Option<Ipv4Network> {
    match rule.peer {
        Peer::Cidr(IpNetwork::V4(c)) if c.prefix() > 0 => Ipv4Network::new(c.network(), c.prefix()).ok(),
        _ => None,
    }
}

/// The peer values a rule matches: identities for a group peer, `ANY` for 0.0.0.0/0, the CIDR
/// classes nested in (or equal to) its CIDR otherwise. IPv6 CIDRs match nothing here.
fn rule_peers(
    rule: &model::Rule,
    members: &HashMap<&str, Vec<u32>>,
    classes: &BTreeMap<(u32, u8), u32>,
    out: &mut Vec<u32>,
) {
    match &rule.peer {
        Peer::Group(group) => out.extend(members.get(group.as_str()).into_iter().flatten()),
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

/// What a rule matches after the peer, as (prefix length, protocol, port) of `PolicyKey`.
fn rule_matches(rule: &model::Rule, out: &mut Vec<(u32, u8, u16)>) {
    use dp::policy_prefix::{FULL, PEER, PROTO};
    match rule.protocol {
        Protocol::All => out.push((PEER, 0, 0)),
        p @ (Protocol::TCP | Protocol::UDP) => {
            let Protocol::Number(proto) = p else { return };
            let (from, to) = rule.ports.unwrap_or((0, u16::MAX));
            out.extend(port_blocks(from, to).map(|(start, bits)| (PROTO + 16 - bits, proto, start)));
        }
        Protocol::ICMP => {
            let proto = 1;
            match rule.icmp {
                None | Some((None, _)) => out.push((PROTO, proto, 0)),
                Some((Some(t), None)) => out.push((PROTO + 8, proto, u16::from(t) << 8)),
                Some((Some(t), Some(c))) => out.push((FULL, proto, u16::from(t) << 8 | u16::from(c))),
            }
        }
        // The dataplane is IPv4 only: no ICMPv6 packet reaches policy.
        Protocol::ICMPV6 => {}
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
/// state too big for the map is detected.
struct PolicyEntries<'a> {
    host: &'a str,
    entries: Vec<(u32, dp::PolicyKey)>,
}

impl<'a> PolicyEntries<'a> {
    fn new(host: &'a str) -> Self {
        PolicyEntries { host, entries: Vec::new() }
    }

    fn push(&mut self, prefix: u32, key: dp::PolicyKey) -> model::Result<()> {
        self.entries.push((prefix, key));
        if self.entries.len() > 2 * dp::capacity::POLICY as usize {
            self.compact();
            fits(self.host, dp::map_names::POLICY, self.entries.len(), dp::capacity::POLICY)?;
        }
        Ok(())
    }

    fn compact(&mut self) {
        self.entries.sort_unstable();
        self.entries.dedup();
    }

    fn finish(mut self) -> model::Result<BTreeSet<(u32, dp::PolicyKey)>> {
        self.compact();
        fits(self.host, dp::map_names::POLICY, self.entries.len(), dp::capacity::POLICY)?;
        Ok(self.entries.into_iter().collect())
    }
}
