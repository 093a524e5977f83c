//! Indices of the desired state: what the edits' checks and the S12 fit check look up instead
//! of scanning every object of the fleet.
//!
//! Contract: an [`Index`] is derived from the tables of a [`State`] and never stored. It catches
//! up with the tables' changes ([`State::reindex`], from the tables' own journals, so a change
//! made directly on a table is seen too), at a cost proportional to what changed: a changed
//! group costs its rules (at most 1000, S12), a changed endpoint or identity a few lookups.
//! It is made of persistent maps, so a copy of the state copies it in O(1).
//!
//! Besides lookups (names, addresses, namespaces, memberships, references, rule ids), it keeps
//! per-host counts of what the compiler would put in each dataplane map, so that S12's "would
//! it fit" is checked on the hosts an edit touches only ([`State::check_fits`]): the number of
//! policy entries of each identity is kept (recomputed when its groups' rules, the members of
//! the groups its rules name, or its universe's CIDR classes change), and a host's policy
//! entries are the sum over the identities of its endpoints (identities never share entries:
//! each entry is keyed by its identity). The distinct rules a host's entries name are bounded by
//! the rules of its identities' groups, counted when the host is checked.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use dataplane_common as dp;
use imbl::{OrdMap, OrdSet};
use ipnetwork::IpNetwork;

use crate::model::{self, Endpoint, Identity, Peer, SecurityGroup, State, Universe};

/// See the module docs. Equality is never asked of it: two states with equal tables have equal
/// indices.
#[derive(Clone, Default)]
pub struct Index {
    built: bool,
    pub universe_names: OrdMap<String, String>,
    pub vnis: OrdMap<u32, String>,
    /// (universe, name) -> group.
    pub group_names: OrdMap<(String, String), String>,
    pub universe_groups: OrdMap<String, OrdSet<String>>,
    pub universe_endpoints: OrdMap<String, OrdSet<String>>,
    /// Universe -> its endpoints that have an IPv6 address.
    pub universe_endpoints6: OrdMap<String, OrdSet<String>>,
    pub universe_identities: OrdMap<String, OrdSet<u32>>,
    pub host_endpoints: OrdMap<String, OrdSet<String>>,
    /// (universe, address) -> endpoint.
    pub endpoint_ips: OrdMap<(String, Ipv4Addr), String>,
    /// (universe, IPv6 address) -> endpoint.
    pub endpoint_ips6: OrdMap<(String, Ipv6Addr), String>,
    /// (host, namespace) -> endpoint.
    pub endpoint_netns: OrdMap<(String, String), String>,
    pub identity_endpoints: OrdMap<u32, OrdSet<String>>,
    /// (universe, sorted groups) -> identity.
    pub identity_sets: OrdMap<(String, Vec<String>), u32>,
    /// Group -> the identities whose sets contain it (its members, S5).
    pub group_identities: OrdMap<String, OrdSet<u32>>,
    /// Group -> the groups with rules naming it as peer, with how many such rules.
    pub group_referrers: OrdMap<String, OrdMap<String, usize>>,
    /// Rule id -> its group.
    pub rule_ids: OrdMap<String, String>,
    /// Universe -> its CIDR classes (network, prefix) with how many rules have each.
    pub classes: OrdMap<String, OrdMap<(u32, u8), usize>>,
    /// Universe -> its IPv6 CIDR classes, likewise (compiled only where it has IPv6 CIDRs).
    pub classes6: OrdMap<String, OrdMap<(u128, u8), usize>>,
    /// Host -> identities of its endpoints, with how many endpoints have each.
    pub host_identities: OrdMap<String, OrdMap<u32, usize>>,
    /// Identity -> hosts of its endpoints, with how many endpoints each has.
    pub identity_hosts: OrdMap<u32, OrdMap<String, usize>>,
    /// Identity -> the number of policy entries the compiler makes for it.
    pub policy: OrdMap<u32, usize>,
    /// Hosts whose counts changed since [`State::take_touched_hosts`].
    touched_hosts: BTreeSet<String>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("built", &self.built).finish_non_exhaustive()
    }
}

impl PartialEq for Index {
    fn eq(&self, _: &Index) -> bool {
        true
    }
}
impl Eq for Index {}

fn add<K: Ord + Clone>(map: &mut OrdMap<K, usize>, key: K, n: isize) {
    let now = map.get(&key).copied().unwrap_or(0) as isize + n;
    if now <= 0 {
        map.remove(&key);
    } else {
        map.insert(key, now as usize);
    }
}

fn set_insert<K: Ord + Clone, V: Ord + Clone>(map: &mut OrdMap<K, OrdSet<V>>, key: K, v: V) {
    map.entry(key).or_default().insert(v);
}

fn set_remove<K: Ord + Clone, V: Ord + Clone>(map: &mut OrdMap<K, OrdSet<V>>, key: &K, v: &V) {
    if let Some(set) = map.get_mut(key) {
        set.remove(v);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn nested_add<K: Ord + Clone, V: Ord + Clone>(
    map: &mut OrdMap<K, OrdMap<V, usize>>,
    key: K,
    v: V,
    n: isize,
) {
    let inner = map.entry(key.clone()).or_default();
    add(inner, v, n);
    if inner.is_empty() {
        map.remove(&key);
    }
}

/// The CIDR class a rule contributes (see `compile`): its IPv4 CIDR unless /0.
pub(crate) fn class_of(rule: &model::Rule) -> Option<(u32, u8)> {
    match rule.peer {
        Peer::Cidr(IpNetwork::V4(c)) if c.prefix() > 0 => {
            Some((u32::from(c.network()), c.prefix()))
        }
        _ => None,
    }
}

/// The IPv6 CIDR class a rule contributes: its IPv6 CIDR unless `::/0`.
pub(crate) fn class6_of(rule: &model::Rule) -> Option<(u128, u8)> {
    match rule.peer {
        Peer::Cidr(IpNetwork::V6(c)) if c.prefix() > 0 => {
            Some((u128::from(c.network()), c.prefix()))
        }
        _ => None,
    }
}

/// Applies the changes in the rule counts of classes to `classes`: the universes whose set of
/// classes changed.
fn apply_class_delta<C: Ord + Clone>(
    classes: &mut OrdMap<String, OrdMap<C, usize>>,
    delta: BTreeMap<(String, C), isize>,
    changed: &mut Option<String>,
) {
    for ((uni, class), n) in delta {
        if n == 0 {
            continue;
        }
        let had = classes.get(&uni).is_some_and(|m| m.contains_key(&class));
        nested_add(classes, uni.clone(), class.clone(), n);
        let has = classes.get(&uni).is_some_and(|m| m.contains_key(&class));
        if had != has {
            *changed = Some(uni);
        }
    }
}

impl State {
    /// Brings the indices up to date with the tables (see the module docs).
    pub fn reindex(&mut self) {
        if !self.idx.built {
            self.build_index();
            return;
        }
        let universes = self.universes.take_pending();
        let groups = self.groups.take_pending();
        let endpoints = self.endpoints.take_pending();
        let identities = self.identities.take_pending();
        self.hosts.take_pending();
        self.tokens.take_pending();
        let mut dirty: BTreeSet<u32> = BTreeSet::new();
        let mut dirty_universes: BTreeSet<String> = BTreeSet::new();
        for (id, before) in universes {
            let now = self.universes.get_shared(&id).cloned();
            self.idx.universe(before.as_deref(), now.as_deref());
        }
        for (id, before) in groups {
            let now = self.groups.get_shared(&id).cloned();
            let rules =
                |g: Option<&SecurityGroup>| g.map_or(0, |g| g.ingress.len() + g.egress.len());
            let rules_changed = rules(before.as_deref()) != rules(now.as_deref());
            let classes_changed = self.idx.group(before.as_deref(), now.as_deref());
            if let Some(ids) = self.idx.group_identities.get(&id) {
                dirty.extend(ids.iter().copied());
                // The rules a host's counters must hold changed even when its policy entries
                // did not (a rule that makes no entry): its hosts are checked by this edit, not
                // by the next one that happens to touch them.
                if rules_changed {
                    for n in ids {
                        if let Some(hosts) = self.idx.identity_hosts.get(n) {
                            self.idx.touched_hosts.extend(hosts.keys().cloned());
                        }
                    }
                }
            }
            if let Some(u) = classes_changed {
                dirty_universes.insert(u);
            }
        }
        for (n, before) in identities {
            let now = self.identities.get_shared(&n).cloned();
            dirty.insert(n);
            // Its groups gained or lost a member: the rules naming them change.
            let groups = before.iter().chain(now.iter()).flat_map(|i| i.groups.iter());
            for g in groups.collect::<BTreeSet<_>>() {
                if let Some(referrers) = self.idx.group_referrers.get(g) {
                    for r in referrers.keys() {
                        if let Some(ids) = self.idx.group_identities.get(r) {
                            dirty.extend(ids.iter().copied());
                        }
                    }
                }
            }
            self.idx.identity(n, before.as_deref(), now.as_deref());
        }
        for (id, before) in endpoints {
            let now = self.endpoints.get_shared(&id).cloned();
            self.idx.endpoint(before.as_deref(), now.as_deref());
        }
        for u in &dirty_universes {
            if let Some(ids) = self.idx.universe_identities.get(u) {
                dirty.extend(ids.iter().copied());
            }
        }
        for n in dirty {
            self.recount(n);
        }
    }

    fn build_index(&mut self) {
        self.universes.take_pending();
        self.groups.take_pending();
        self.endpoints.take_pending();
        self.identities.take_pending();
        self.hosts.take_pending();
        self.tokens.take_pending();
        let mut idx = Index { built: true, ..Index::default() };
        for u in self.universes.values() {
            idx.universe(None, Some(u));
        }
        for g in self.groups.values() {
            idx.group(None, Some(g));
        }
        for (n, i) in &self.identities {
            idx.identity(*n, None, Some(i));
        }
        for e in self.endpoints.values() {
            idx.endpoint(None, Some(e));
        }
        self.idx = idx;
        let all: Vec<u32> = self.identities.keys().copied().collect();
        for n in all {
            self.recount(n);
        }
    }

    /// Recomputes the policy entries of identity `n`, marking its hosts touched if they change.
    fn recount(&mut self, n: u32) {
        let count = self.identities.get(&n).map(|i| policy_entries(self, i));
        let before = self.idx.policy.get(&n).copied();
        if before == count {
            return;
        }
        match count {
            Some(c) => self.idx.policy.insert(n, c),
            None => self.idx.policy.remove(&n),
        };
        if let Some(hosts) = self.idx.identity_hosts.get(&n) {
            self.idx.touched_hosts.extend(hosts.keys().cloned());
        }
    }

    /// Whether the indices are up to date with every table.
    pub fn is_indexed(&self) -> bool {
        self.idx.built
            && !self.universes.has_pending()
            && !self.groups.has_pending()
            && !self.endpoints.has_pending()
            && !self.identities.has_pending()
    }

    /// This state with its indices up to date: itself, or an O(1) copy brought up to date.
    pub fn indexed(&self) -> std::borrow::Cow<'_, State> {
        if self.is_indexed() {
            std::borrow::Cow::Borrowed(self)
        } else {
            let mut copy = self.clone();
            copy.reindex();
            std::borrow::Cow::Owned(copy)
        }
    }

    /// The hosts whose dataplane counts changed since the last call (indices up to date).
    pub fn take_touched_hosts(&mut self) -> BTreeSet<String> {
        self.reindex();
        std::mem::take(&mut self.idx.touched_hosts)
    }

    /// S12 at the API, incrementally: whether the state, compiled for each host its last edits
    /// touched, fits the dataplane's maps (every endpoint counted as plumbed). Costs the
    /// identities and universes of those hosts, never the fleet.
    pub fn check_fits(&mut self) -> model::Result<()> {
        let hosts = self.take_touched_hosts();
        let with_underlay = self.hosts.values().filter(|h| h.underlay_ip.is_some()).count();
        fits(
            "every host",
            dp::map_names::HOSTS,
            with_underlay.saturating_sub(1),
            dp::capacity::HOSTS,
        )?;
        fits("every host", dp::map_names::VNIS, self.universes.len(), dp::capacity::VNIS)?;
        for host in &hosts {
            let counts = self.host_counts(host);
            fits(host, dp::map_names::ENDPOINTS, counts.endpoints, dp::capacity::ENDPOINTS)?;
            fits(host, dp::map_names::ROUTES, counts.routes, dp::capacity::ROUTES)?;
            fits(host, dp::map_names::CIDRS, counts.cidrs, dp::capacity::CIDRS)?;
            fits(host, dp::map_names::ROUTES6, counts.routes6, dp::capacity::ROUTES6)?;
            fits(host, dp::map_names::CIDRS6, counts.cidrs6, dp::capacity::CIDRS6)?;
            fits(host, dp::map_names::POLICY, counts.policy, dp::capacity::POLICY)?;
            crate::compile::fits_rules(host, counts.rules)?;
        }
        Ok(())
    }

    /// What the compiler would put in host `host`'s maps, counted from the indices (an upper
    /// bound for routes: every endpoint of the universes present on the host, as if every host
    /// had an underlay address).
    pub fn host_counts(&self, host: &str) -> HostCounts {
        let endpoints = self.idx.host_endpoints.get(host).map_or(0, OrdSet::len);
        let mut universes = BTreeSet::new();
        if let Some(eps) = self.idx.host_endpoints.get(host) {
            for e in eps {
                if let Some(e) = self.endpoints.get(e) {
                    universes.insert(e.universe.as_str());
                }
            }
        }
        let cidrs = universes.iter().map(|u| self.idx.classes.get(*u).map_or(0, OrdMap::len)).sum();
        // IPv6 classes and routes only of the universes with IPv6 CIDRs (see `compile`).
        let dual: Vec<&str> = universes
            .iter()
            .copied()
            .filter(|u| self.universes.get(*u).is_some_and(|u| !u.ipv6_cidrs.is_empty()))
            .collect();
        let cidrs6 = dual.iter().map(|u| self.idx.classes6.get(*u).map_or(0, OrdMap::len)).sum();
        let routes6 =
            dual.iter().map(|u| self.idx.universe_endpoints6.get(*u).map_or(0, OrdSet::len)).sum();
        let policy = self.idx.host_identities.get(host).map_or(0, |ids| {
            ids.keys().map(|n| self.idx.policy.get(n).copied().unwrap_or(0)).sum()
        });
        let routes = universes
            .iter()
            .map(|u| self.idx.universe_endpoints.get(*u).map_or(0, OrdSet::len))
            .sum();
        // Every rule of the groups of the host's identities, whether or not it makes an entry.
        let mut groups = BTreeSet::new();
        for n in self.idx.host_identities.get(host).into_iter().flat_map(OrdMap::keys) {
            if let Some(identity) = self.identities.get(n) {
                groups.extend(identity.groups.iter().map(String::as_str));
            }
        }
        let rules = groups
            .iter()
            .filter_map(|g| self.groups.get(*g))
            .map(|g| g.ingress.len() + g.egress.len())
            .sum();
        HostCounts { endpoints, routes, cidrs, policy, rules, routes6, cidrs6 }
    }
}

/// Entries a host's maps would hold (see [`State::host_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounts {
    pub endpoints: usize,
    pub routes: usize,
    pub cidrs: usize,
    pub policy: usize,
    /// An upper bound of the distinct rules the policy entries name (counted in
    /// `VERSE_RULE_HITS`): the rules of the groups of the host's identities.
    pub rules: usize,
    /// `VERSE_ROUTES6` (an upper bound, as `routes`) and `VERSE_CIDRS6` (issue 13: compiled,
    /// not in the kernel yet). `policy` counts the entries of both families (one trie).
    pub routes6: usize,
    pub cidrs6: usize,
}

fn fits(host: &str, map: &str, len: usize, capacity: u32) -> model::Result<()> {
    if len > capacity as usize {
        return Err(model::Error::conflict(
            "limit_exceeded",
            None,
            format!(
                "the compiled state of host {host} needs {len} entries in {map}, which holds {capacity} (S12)"
            ),
        ));
    }
    Ok(())
}

/// The number of distinct policy entries the compiler makes for identity `i` (see
/// `compile::compile`: per rule of its groups, its peers times its protocol/port blocks).
fn policy_entries(state: &State, i: &Identity) -> usize {
    use crate::compile::Family;
    /// A peer as the entries name it: an identity, `ANY`, or a class by its CIDR.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum P {
        Identity(u32),
        Any,
        Class(u128, u8),
    }
    let Some(universe) = state.universes.get(&i.universe) else { return 0 };
    let classes = state.idx.classes.get(&universe.id);
    let classes6 = state.idx.classes6.get(&universe.id);
    // A universe with IPv6 CIDRs has entries for IPv6 peers too, under their own directions.
    let families: &[Family] =
        if universe.ipv6_cidrs.is_empty() { &[Family::V4] } else { &[Family::V4, Family::V6] };
    let mut entries: HashSet<(u8, P, u32, u8, u16)> = HashSet::new();
    let mut matches = Vec::new();
    let mut peers: Vec<P> = Vec::new();
    for (direction, rule) in crate::compile::identity_rules(state, &universe.id, &i.groups) {
        for &family in families {
            matches.clear();
            crate::compile::rule_matches(rule, family, &mut matches);
            if matches.is_empty() {
                continue;
            }
            peers.clear();
            match (&rule.peer, family) {
                (Peer::Group(g), _) => {
                    if let Some(ids) = state.idx.group_identities.get(g) {
                        peers.extend(ids.iter().map(|n| P::Identity(*n)));
                    }
                }
                (Peer::Cidr(c), _) if c.prefix() == 0 && c.is_ipv4() == (family == Family::V4) => {
                    peers.push(P::Any)
                }
                (Peer::Cidr(IpNetwork::V4(c)), Family::V4) => {
                    let first = u32::from(c.network());
                    let last = u32::from(c.broadcast());
                    for ((net, prefix), _) in
                        classes.into_iter().flat_map(|m| m.range((first, 0)..=(last, 32)))
                    {
                        if *prefix >= c.prefix() {
                            peers.push(P::Class(u128::from(*net), *prefix));
                        }
                    }
                }
                (Peer::Cidr(IpNetwork::V6(c)), Family::V6) => {
                    let first = u128::from(c.network());
                    let last = u128::from(c.broadcast());
                    for ((net, prefix), _) in
                        classes6.into_iter().flat_map(|m| m.range((first, 0)..=(last, 128)))
                    {
                        if *prefix >= c.prefix() {
                            peers.push(P::Class(*net, *prefix));
                        }
                    }
                }
                (Peer::Cidr(_), _) => {}
            }
            let direction = match family {
                Family::V4 => direction,
                Family::V6 => direction + dp::DIRECTION_IPV6,
            };
            for &peer in &peers {
                for &(prefix, proto, port) in &matches {
                    entries.insert((direction, peer, prefix, proto, port));
                }
            }
        }
    }
    entries.len()
}

impl Index {
    fn universe(&mut self, before: Option<&Universe>, now: Option<&Universe>) {
        if let Some(u) = before {
            if self.universe_names.get(&u.name) == Some(&u.id) {
                self.universe_names.remove(&u.name);
            }
            if self.vnis.get(&u.vni) == Some(&u.id) {
                self.vnis.remove(&u.vni);
            }
        }
        if let Some(u) = now {
            self.universe_names.insert(u.name.clone(), u.id.clone());
            self.vnis.insert(u.vni, u.id.clone());
        }
    }

    /// Updates the indices for a group that changed from `before` to `now` (the same id), by
    /// what changed only: the fleet-wide maps (rule ids, referrers, names) are touched for the
    /// rules and names that came or went, not for every rule of the group, so that an edit of
    /// one rule costs one rule's entries however many rules the group and the fleet hold.
    /// Returns the universe whose CIDR classes changed, if they did.
    fn group(
        &mut self,
        before: Option<&SecurityGroup>,
        now: Option<&SecurityGroup>,
    ) -> Option<String> {
        let mut classes_changed = None;
        let mut class_delta: BTreeMap<(String, (u32, u8)), isize> = BTreeMap::new();
        let mut class6_delta: BTreeMap<(String, (u128, u8)), isize> = BTreeMap::new();
        let mut referrers: BTreeMap<(&str, &str), isize> = BTreeMap::new();
        fn rules(g: Option<&SecurityGroup>) -> BTreeSet<(&str, &str)> {
            let all = g
                .map(|g| g.ingress.iter().chain(&g.egress).map(|r| (r.id.as_str(), g.id.as_str())));
            all.into_iter().flatten().collect()
        }
        let (rules_before, rules_now) = (rules(before), rules(now));
        let placed = |g: &SecurityGroup| (g.universe.clone(), g.name.clone(), g.id.clone());
        let moved = before.map(placed) != now.map(placed);
        if let Some(g) = before {
            if moved {
                let key = (g.universe.clone(), g.name.clone());
                if self.group_names.get(&key) == Some(&g.id) {
                    self.group_names.remove(&key);
                }
                set_remove(&mut self.universe_groups, &g.universe, &g.id);
            }
            for r in g.ingress.iter().chain(&g.egress) {
                if !rules_now.contains(&(r.id.as_str(), g.id.as_str()))
                    && self.rule_ids.get(&r.id) == Some(&g.id)
                {
                    self.rule_ids.remove(&r.id);
                }
                if let Peer::Group(peer) = &r.peer {
                    *referrers.entry((peer.as_str(), g.id.as_str())).or_default() -= 1;
                }
                if let Some(c) = class_of(r) {
                    *class_delta.entry((g.universe.clone(), c)).or_default() -= 1;
                }
                if let Some(c) = class6_of(r) {
                    *class6_delta.entry((g.universe.clone(), c)).or_default() -= 1;
                }
            }
        }
        if let Some(g) = now {
            if moved {
                self.group_names.insert((g.universe.clone(), g.name.clone()), g.id.clone());
                set_insert(&mut self.universe_groups, g.universe.clone(), g.id.clone());
            }
            for r in g.ingress.iter().chain(&g.egress) {
                if !rules_before.contains(&(r.id.as_str(), g.id.as_str())) {
                    self.rule_ids.insert(r.id.clone(), g.id.clone());
                }
                if let Peer::Group(peer) = &r.peer {
                    *referrers.entry((peer.as_str(), g.id.as_str())).or_default() += 1;
                }
                if let Some(c) = class_of(r) {
                    *class_delta.entry((g.universe.clone(), c)).or_default() += 1;
                }
                if let Some(c) = class6_of(r) {
                    *class6_delta.entry((g.universe.clone(), c)).or_default() += 1;
                }
            }
        }
        for ((peer, group), n) in referrers {
            if n != 0 {
                nested_add(&mut self.group_referrers, peer.to_owned(), group.to_owned(), n);
            }
        }
        apply_class_delta(&mut self.classes, class_delta, &mut classes_changed);
        apply_class_delta(&mut self.classes6, class6_delta, &mut classes_changed);
        classes_changed
    }

    fn identity(&mut self, n: u32, before: Option<&Identity>, now: Option<&Identity>) {
        if let Some(i) = before {
            let key = (i.universe.clone(), i.groups.clone());
            if self.identity_sets.get(&key) == Some(&n) {
                self.identity_sets.remove(&key);
            }
            for g in &i.groups {
                set_remove(&mut self.group_identities, g, &n);
            }
            set_remove(&mut self.universe_identities, &i.universe, &n);
        }
        if let Some(i) = now {
            self.identity_sets.insert((i.universe.clone(), i.groups.clone()), n);
            for g in &i.groups {
                set_insert(&mut self.group_identities, g.clone(), n);
            }
            set_insert(&mut self.universe_identities, i.universe.clone(), n);
        }
    }

    fn endpoint(&mut self, before: Option<&Endpoint>, now: Option<&Endpoint>) {
        if let Some(e) = before {
            set_remove(&mut self.universe_endpoints, &e.universe, &e.id);
            set_remove(&mut self.universe_endpoints6, &e.universe, &e.id);
            set_remove(&mut self.host_endpoints, &e.host, &e.id);
            let ip = (e.universe.clone(), e.ip);
            if self.endpoint_ips.get(&ip) == Some(&e.id) {
                self.endpoint_ips.remove(&ip);
            }
            if let Some(ip6) = e.ipv6.map(|a| (e.universe.clone(), a)) {
                if self.endpoint_ips6.get(&ip6) == Some(&e.id) {
                    self.endpoint_ips6.remove(&ip6);
                }
            }
            let ns = (e.host.clone(), e.netns.clone());
            if self.endpoint_netns.get(&ns) == Some(&e.id) {
                self.endpoint_netns.remove(&ns);
            }
            set_remove(&mut self.identity_endpoints, &e.identity, &e.id);
            nested_add(&mut self.host_identities, e.host.clone(), e.identity, -1);
            nested_add(&mut self.identity_hosts, e.identity, e.host.clone(), -1);
            self.touched_hosts.insert(e.host.clone());
        }
        if let Some(e) = now {
            set_insert(&mut self.universe_endpoints, e.universe.clone(), e.id.clone());
            if e.ipv6.is_some() {
                set_insert(&mut self.universe_endpoints6, e.universe.clone(), e.id.clone());
            }
            set_insert(&mut self.host_endpoints, e.host.clone(), e.id.clone());
            self.endpoint_ips.insert((e.universe.clone(), e.ip), e.id.clone());
            if let Some(ip6) = e.ipv6 {
                self.endpoint_ips6.insert((e.universe.clone(), ip6), e.id.clone());
            }
            self.endpoint_netns.insert((e.host.clone(), e.netns.clone()), e.id.clone());
            set_insert(&mut self.identity_endpoints, e.identity, e.id.clone());
            nested_add(&mut self.host_identities, e.host.clone(), e.identity, 1);
            nested_add(&mut self.identity_hosts, e.identity, e.host.clone(), 1);
            self.touched_hosts.insert(e.host.clone());
        }
    }
}

/// The smallest number in 1..=max that `used` (ascending) does not hold.
pub fn smallest_free(used: impl Iterator<Item = u32>, max: u32) -> Option<u32> {
    let mut candidate = 1u32;
    for n in used {
        if n > candidate {
            break;
        }
        if n == candidate {
            candidate += 1;
        }
    }
    (candidate <= max).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, Ids};
    use crate::model::{CreateEndpoint, CreateGroup, CreateRule, PatchEndpoint};
    use crate::testkit::{endpoint, group, port_rule, universe};

    /// splitmix64: a reproducible sequence of edits.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    /// What the compiler puts in `host`'s maps, every endpoint plumbed.
    fn compiled(s: &State, host: &str) -> (usize, usize, usize, usize) {
        let local: Vec<&String> =
            s.endpoints.values().filter(|e| e.host == host).map(|e| &e.id).collect();
        let ifindex = |e: &model::Endpoint| {
            local.iter().position(|id| **id == e.id).map(|i| u32::try_from(i + 1).unwrap())
        };
        let d = compile(s, host, &ifindex, &mut Ids::default()).unwrap();
        (d.endpoints.len(), d.cidrs.len(), d.ipv6.cidrs.len(), d.policy.len() + d.ipv6.policy.len())
    }

    fn counts(s: &State, host: &str) -> (usize, usize, usize, usize) {
        let c = s.host_counts(host);
        (c.endpoints, c.cidrs, c.cidrs6, c.policy)
    }

    /// A rule added to a group of a host's endpoints makes the edit check that host (S12 for
    /// `VERSE_RULE_HITS`), even when the rule makes no policy entry there (an IPv6 peer): the
    /// tenant who adds rules is refused, never the next edit of someone else on the host.
    #[test]
    fn a_rule_that_makes_no_entry_still_checks_its_hosts() {
        let mut s = State::default();
        let u = universe(&mut s, "a", "10.9.0.0/16");
        let g = group(&mut s, &u.id, "g");
        endpoint(&mut s, &u.id, "h1", "10.9.0.2", &[&g.id]);
        s.take_touched_hosts();
        let policy = s.host_counts("h1").policy;
        s.add_rule(&g.id, port_rule("ingress", "tcp", 80, "2001:db8::/32")).unwrap();
        assert!(s.take_touched_hosts().contains("h1"), "the edit checks h1");
        assert_eq!(s.host_counts("h1").policy, policy, "the rule made no entry");
    }

    /// The incremental counts agree with a full compile after every edit of a random sequence,
    /// and with indices built afresh from the same tables.
    #[test]
    fn incremental_counts_agree_with_the_compiler_after_every_edit() {
        let mut rng = Rng(3);
        let mut s = State::default();
        let hosts = ["h1", "h2", "h3"];
        let cidrs = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "10.2.0.0/16",
            "fd00:9::/48",
            "fd00:9:0:1::/64",
            "fd00:9:0:1::5/128",
            "::/0",
        ];
        // "a" is dual-stack (its IPv6 entries and classes are counted), "b" IPv4 only.
        let dual = model::CreateUniverse {
            name: "a".into(),
            cidr: Some("10.9.0.0/16".into()),
            ipv6_cidrs: Some(vec!["fd00:9::/48".into()]),
            ..Default::default()
        };
        let mut universes = vec![s.create_universe(dual).unwrap().id];
        universes.push(universe(&mut s, "b", "10.9.0.0/16").id);
        s.reindex();
        let mut ns = 0;
        // The most endpoints, IPv6 classes, policy entries and dual-stack endpoints seen.
        let mut most = (0, 0, 0, 0);
        for step in 0..400 {
            let uni = universes[rng.below(universes.len())].clone();
            let groups: Vec<String> =
                s.idx.universe_groups.get(&uni).unwrap().iter().cloned().collect();
            let eps: Vec<String> = s
                .idx
                .universe_endpoints
                .get(&uni)
                .map(|e| e.iter().cloned().collect())
                .unwrap_or_default();
            let _ = match rng.below(7) {
                0 => s
                    .create_group(CreateGroup {
                        universe: uni.clone(),
                        name: format!("g{step}"),
                        description: None,
                    })
                    .map(|_| ()),
                1 | 2 => {
                    let g = &groups[rng.below(groups.len())];
                    let peer = if rng.below(3) == 0 {
                        CreateRule {
                            group: Some(groups[rng.below(groups.len())].clone()),
                            ..Default::default()
                        }
                    } else {
                        CreateRule {
                            cidr: Some(cidrs[rng.below(cidrs.len())].into()),
                            ..Default::default()
                        }
                    };
                    let port = i64::try_from(rng.below(5) * 100 + 1).unwrap();
                    s.add_rule(
                        g,
                        CreateRule {
                            direction: ["ingress", "egress"][rng.below(2)].into(),
                            protocol: serde_json::json!(["tcp", "udp", "all"][rng.below(3)]),
                            from_port: Some(port),
                            to_port: Some(port + i64::try_from(rng.below(40)).unwrap()),
                            ..peer
                        },
                    )
                    .map(|_| ())
                }
                3 => {
                    let g = &groups[rng.below(groups.len())];
                    let rules: Vec<String> = s.groups[g]
                        .ingress
                        .iter()
                        .chain(&s.groups[g].egress)
                        .map(|r| r.id.clone())
                        .collect();
                    match rules.get(rng.below(rules.len().max(1))) {
                        Some(r) => s.delete_rule(g, r),
                        None => Ok(()),
                    }
                }
                4 => {
                    ns += 1;
                    let pick: Vec<String> = (0..1 + rng.below(3))
                        .map(|_| groups[rng.below(groups.len())].clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    s.create_endpoint(
                        CreateEndpoint {
                            universe: uni.clone(),
                            host: Some(hosts[rng.below(3)].into()),
                            netns: format!("n{ns}"),
                            ip: format!("10.9.{}.{}", rng.below(200), 2 + rng.below(200)),
                            security_groups: Some(pick),
                            conntrack_budget: Some(1 + rng.below(64) as i64),
                            flow_logs: None,
                            ipv6: (uni == universes[0] && rng.below(3) > 0).then(|| {
                                format!("fd00:9:0:{}::{}", rng.below(3), 2 + rng.below(200))
                            }),
                        },
                        "h1",
                    )
                    .map(|_| ())
                }
                5 if !eps.is_empty() => {
                    let pick: Vec<String> = (0..1 + rng.below(3))
                        .map(|_| groups[rng.below(groups.len())].clone())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    s.patch_endpoint(&eps[rng.below(eps.len())], PatchEndpoint::groups(pick))
                        .map(|_| ())
                }
                6 if !eps.is_empty() => s.delete_endpoint(&eps[rng.below(eps.len())]).map(|_| ()),
                _ => s.delete_group(&groups[rng.below(groups.len())]),
            };
            s.reindex();
            // The group indices, kept by what each edit changed, are those built afresh.
            let mut fresh = s.clone();
            fresh.idx = Index::default();
            fresh.reindex();
            let of_groups = |i: &Index| {
                let names = (i.group_names.clone(), i.universe_groups.clone());
                (
                    names,
                    i.rule_ids.clone(),
                    i.group_referrers.clone(),
                    i.classes.clone(),
                    i.classes6.clone(),
                )
            };
            assert!(of_groups(&fresh.idx) == of_groups(&s.idx), "step {step}: group indices");
            for h in hosts {
                let c = counts(&s, h);
                assert_eq!(c, compiled(&s, h), "step {step}, host {h}");
                most = (most.0.max(s.endpoints.len()), most.1.max(c.2), most.2.max(c.3), most.3);
            }
            most.3 = most.3.max(s.endpoints.values().filter(|e| e.ipv6.is_some()).count());
        }
        let mut fresh: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        fresh.reindex();
        for h in hosts {
            assert_eq!(counts(&fresh, h), counts(&s, h));
        }
        assert!(
            most.0 > 10 && most.1 >= 2 && most.2 > 50 && most.3 > 3,
            "a real test: (endpoints, IPv6 classes, entries, dual-stack endpoints) {most:?}"
        );
    }
}
