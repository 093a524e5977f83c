//! The desired state as keys and values: the layout both stores keep, what an edit writes, and
//! how keys read back (one at a time, as a watch delivers them) become a [`State`].
//!
//! Contract. Keys are relative (the etcd store puts its prefix before them); values are JSON.
//!
//! ```text
//! universes/<uni>               a universe (the fleet's catalog of universes)
//! catalog                       guard of every universe creation and deletion (empty value)
//! u/<uni>/version               guard of every edit inside the universe but one of a single
//!                               group's rules, which only compares it (empty value)
//! holds/<uni>/<holder>          an edit of the whole universe that edits of one group's rules
//!                               kept refusing holds them off until it commits (empty value,
//!                               under a lease: see [`Guard::InUniverse`])
//! u/<uni>/groups/<sg>           a security group without its rules; guard of an edit of its
//!                               rules alone
//! u/<uni>/rules/<sg>/<sgr>      one rule of a group
//! u/<uni>/endpoints/<ep>        an endpoint
//! u/<uni>/identities/<n>        a security identity
//! ids/<sg|ep>                   claim of a group's or an endpoint's id (value: its universe)
//! identities/<n>                claim of an identity number (value: its universe)
//! placement/<host>/<netns>      an endpoint on a host ({"endpoint", "universe"}); claims the
//!                               namespace on that host
//! hosts/<name>                  a host of the fleet
//! tokens/<id>                   an API token (the hash of its secret, never the secret)
//! counters/vnis                 the last VNI handed out (decimal; never handed out again, S7)
//! counters/serials              the last endpoint serial handed out (decimal; likewise)
//! slots/<host>                  guard of the endpoints placed on a host: their slots and
//!                               conntrack budgets (S14) (empty value)
//! ```
//!
//! Everything of a universe lives under `u/<uni>/`: deleting a universe is one range delete,
//! however many groups and rules it has, and a host can follow one universe by watching one
//! prefix. A rule is its own key, so adding a rule writes one rule and the universe's guard,
//! never the whole group.
//!
//! [`delta`] turns the journal of an edit (see [`crate::table`]) into the writes it needs and
//! the guards that make it safe ([`Guard`]): an edit inside a universe compares that universe's
//! `version` key (and rewrites it), so edits of different universes never conflict and edits of
//! one universe serialize, except an edit of one group's rules that no other edit's checks
//! read (see [`one_group_alone`]): it compares and rewrites the group's key and only compares
//! the universe's `version`, so edits of different groups of a universe do not conflict;
//! universes are created and deleted under the `catalog` key (names and
//! VNIs are unique in the fleet); ids, identity numbers and namespaces are claimed by keys that
//! must be absent (`create`), so two universes cannot take the same one at once. What is unique
//! across universes without a key of its own is guarded by a key every edit that takes it
//! rewrites: the counters (an edit that hands out a VNI or a serial compares and rewrites its
//! counter, so no two edits hand out the same one), and a host's `slots/<host>` (an edit that
//! places an endpoint on a host compares and rewrites it, so two universes' endpoints cannot take
//! the same slot or together over-commit the host's conntrack budgets).
//!
//! [`Loader`] builds a state from keys read back (a full read, a watch's events, an embedded
//! log's records), one batch (one transaction) at a time.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Error;
use crate::model::{
    self, Endpoint, HostRecord, Identity, Rule, SecurityGroup, State, Token, Universe,
};

pub const CATALOG: &str = "catalog";
pub const UNIVERSES: &str = "universes/";
pub const U: &str = "u/";
pub const IDS: &str = "ids/";
pub const IDENTITY_CLAIMS: &str = "identities/";
pub const PLACEMENT: &str = "placement/";
pub const HOSTS: &str = "hosts/";
pub const TOKENS: &str = "tokens/";
pub const VNIS_ISSUED: &str = "counters/vnis";
pub const SERIALS_ISSUED: &str = "counters/serials";
pub const SLOTS: &str = "slots/";
pub const HOLDS: &str = "holds/";

/// The guard key of the endpoints placed on `host`.
pub fn slots_key(host: &str) -> String {
    format!("{SLOTS}{host}")
}

/// The prefix of everything of universe `uni`.
pub fn universe_prefix(uni: &str) -> String {
    format!("{U}{uni}/")
}

pub fn version_key(uni: &str) -> String {
    format!("{U}{uni}/version")
}

/// The prefix of the holds of universe `uni` (see [`Guard::InUniverse`]).
pub fn holds_prefix(uni: &str) -> String {
    format!("{HOLDS}{uni}/")
}

/// The prefix of the keys of every group of universe `uni` (without their rules).
pub fn groups_prefix(uni: &str) -> String {
    format!("{U}{uni}/groups/")
}

fn group_key(g: &SecurityGroup) -> String {
    format!("{U}{}/groups/{}", g.universe, g.id)
}

fn rules_prefix(uni: &str, group: &str) -> String {
    format!("{U}{uni}/rules/{group}/")
}

fn rule_key(uni: &str, group: &str, rule: &str) -> String {
    format!("{U}{uni}/rules/{group}/{rule}")
}

fn endpoint_key(e: &Endpoint) -> String {
    format!("{U}{}/endpoints/{}", e.universe, e.id)
}

fn identity_key(n: u32, i: &Identity) -> String {
    format!("{U}{}/identities/{n}", i.universe)
}

fn placement_key(e: &Endpoint) -> String {
    format!("{PLACEMENT}{}/{}", e.host, e.netns)
}

/// One write of an edit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// Every key that starts with `prefix`.
    DeletePrefix {
        prefix: String,
    },
}

/// What must hold for an edit to commit, checked against the store as it is at commit time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Guard {
    /// `u/<uni>/version` is as the edit's state saw it (then the edit rewrites it), and no
    /// group key of the universe (`u/<uni>/groups/`) changed since the edit's state: nothing
    /// of the universe changed, not even by an edit of one group ([`Guard::InUniverse`]).
    Universe(String),
    /// `u/<uni>/version` is as the edit's state saw it, not rewritten: no edit that changes
    /// what spans the universe (its endpoints, identities, groups, CIDR classes) committed
    /// since. The guard of an edit of one group's rules, with that group's key. And no key is
    /// under `holds/<uni>/`: an edit guarded by [`Guard::Universe`] that such edits kept
    /// refusing (each moves a group key) puts one there, under a short lease, and deletes it in
    /// its own commit; meanwhile the edits of one group wait, so that they cannot starve it.
    InUniverse(String),
    /// `catalog` is as the edit's state saw it (then the edit rewrites it).
    Catalog,
    /// The key is absent: a claim.
    Absent(String),
    /// The key is as the edit's state saw it.
    Unchanged(String),
}

/// The writes of one edit and their guards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub ops: Vec<Op>,
    pub guards: BTreeSet<Guard>,
    /// Keys to delete once the edit has committed, apart from it (the id claims of the groups of
    /// a deleted universe: however many there are, the universe goes in one transaction).
    pub cleanup: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn put<V: Serialize>(&mut self, key: String, value: &V) -> Result<(), Error> {
        let value = serde_json::to_string(value).map_err(|e| Error::Corrupt {
            key: key.clone(),
            reason: format!("cannot serialize: {e}"),
        })?;
        self.ops.push(Op::Put { key, value });
        Ok(())
    }

    fn delete(&mut self, key: String) {
        self.ops.push(Op::Delete { key });
    }
}

/// A group as its key holds it: everything but the rules.
#[derive(Serialize, Deserialize)]
struct GroupRecord {
    id: String,
    universe: String,
    name: String,
    description: String,
}

/// The value of a `placement/` key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub endpoint: String,
    pub universe: String,
}

/// The writes and guards of the edit that turned `before` into `after` (whose journals hold the
/// edit's changes: see [`crate::table`]). Costs what the edit changed, plus, for a changed group,
/// a comparison of its rules (at most 1000, S12).
pub fn delta(before: &State, after: &State) -> Result<Delta, Error> {
    delta_guarded(before, after, true)
}

/// [`delta`] for an edit that holds the edits of one group's rules off (see
/// [`Guard::InUniverse`]): it keeps the universe's guard even when it changes one group's rules
/// alone, since as one of those it would wait for its own hold.
pub fn delta_held(before: &State, after: &State) -> Result<Delta, Error> {
    delta_guarded(before, after, false)
}

fn delta_guarded(before: &State, after: &State, narrow: bool) -> Result<Delta, Error> {
    let mut d = Delta::default();
    let mut gone_universes = BTreeSet::new();
    for (id, was) in after.universes.changes() {
        let now = after.universes.get(id);
        if now == was.as_deref() {
            continue;
        }
        d.guards.insert(Guard::Catalog);
        match now {
            Some(u) => {
                d.put(format!("{UNIVERSES}{id}"), u)?;
                if was.is_none() {
                    // A new universe: its version key must not exist yet.
                    d.guards.insert(Guard::Absent(version_key(id)));
                    d.ops.push(Op::Put { key: version_key(id), value: String::new() });
                }
            }
            None => {
                d.delete(format!("{UNIVERSES}{id}"));
                d.ops.push(Op::DeletePrefix { prefix: universe_prefix(id) });
                d.guards.insert(Guard::Universe(id.clone()));
                gone_universes.insert(id.as_str());
            }
        }
    }
    let inside_gone = |uni: &str| gone_universes.contains(uni);
    let mut touched = BTreeSet::new();

    for (id, was) in after.groups.changes() {
        let now = after.groups.get(id);
        match (was.as_deref(), now) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => continue,
            (_, Some(g)) => {
                touched.insert(g.universe.clone());
                let record = GroupRecord {
                    id: g.id.clone(),
                    universe: g.universe.clone(),
                    name: g.name.clone(),
                    description: g.description.clone(),
                };
                let meta_changed = was.as_deref().is_none_or(|w| {
                    w.name != g.name || w.description != g.description || w.universe != g.universe
                });
                if meta_changed {
                    d.put(group_key(g), &record)?;
                }
                if was.is_none() {
                    d.guards.insert(Guard::Absent(format!("{IDS}{id}")));
                    d.ops.push(Op::Put { key: format!("{IDS}{id}"), value: g.universe.clone() });
                }
                let old: BTreeMap<&str, &Rule> = was
                    .as_deref()
                    .map(|w| {
                        w.ingress.iter().chain(&w.egress).map(|r| (r.id.as_str(), r)).collect()
                    })
                    .unwrap_or_default();
                let new: BTreeMap<&str, &Rule> =
                    g.ingress.iter().chain(&g.egress).map(|r| (r.id.as_str(), r)).collect();
                // In the group's order: a watch appends new rules in the order of the writes.
                for r in g.ingress.iter().chain(&g.egress) {
                    if old.get(r.id.as_str()) != Some(&r) {
                        d.put(rule_key(&g.universe, id, &r.id), r)?;
                    }
                }
                for rid in old.keys().filter(|r| !new.contains_key(*r)) {
                    d.delete(rule_key(&g.universe, id, rid));
                }
            }
            (Some(w), None) => {
                if inside_gone(&w.universe) {
                    // Its keys go with the universe's range delete; its id claim goes after.
                    d.cleanup.push(format!("{IDS}{id}"));
                    continue;
                }
                touched.insert(w.universe.clone());
                d.delete(group_key(w));
                d.ops.push(Op::DeletePrefix { prefix: rules_prefix(&w.universe, id) });
                d.delete(format!("{IDS}{id}"));
            }
        }
    }

    for (id, was) in after.endpoints.changes() {
        let now = after.endpoints.get(id);
        match (was.as_deref(), now) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => continue,
            (was, Some(e)) => {
                touched.insert(e.universe.clone());
                d.put(endpoint_key(e), e)?;
                let placement = Placement { endpoint: e.id.clone(), universe: e.universe.clone() };
                if was.is_none_or(|w| w.host != e.host) {
                    // Placed on a host: its slot and budget were chosen against the host's
                    // other endpoints, whatever their universes.
                    d.guards.insert(Guard::Unchanged(slots_key(&e.host)));
                    d.ops.push(Op::Put { key: slots_key(&e.host), value: String::new() });
                }
                match was {
                    None => {
                        d.guards.insert(Guard::Absent(format!("{IDS}{id}")));
                        d.ops
                            .push(Op::Put { key: format!("{IDS}{id}"), value: e.universe.clone() });
                        d.guards.insert(Guard::Absent(placement_key(e)));
                        d.put(placement_key(e), &placement)?;
                    }
                    Some(w) if w.host != e.host || w.netns != e.netns => {
                        d.delete(placement_key(w));
                        d.guards.insert(Guard::Absent(placement_key(e)));
                        d.put(placement_key(e), &placement)?;
                    }
                    Some(_) => {}
                }
            }
            (Some(w), None) => {
                d.delete(format!("{IDS}{id}"));
                d.delete(placement_key(w));
                if inside_gone(&w.universe) {
                    continue;
                }
                touched.insert(w.universe.clone());
                d.delete(endpoint_key(w));
            }
        }
    }

    for (n, was) in after.identities.changes() {
        let now = after.identities.get(n);
        match (was.as_deref(), now) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => continue,
            (was, Some(i)) => {
                touched.insert(i.universe.clone());
                d.put(identity_key(*n, i), i)?;
                match was {
                    None => {
                        d.guards.insert(Guard::Absent(format!("{IDENTITY_CLAIMS}{n}")));
                        d.ops.push(Op::Put {
                            key: format!("{IDENTITY_CLAIMS}{n}"),
                            value: i.universe.clone(),
                        });
                    }
                    Some(w) if w.universe != i.universe => {
                        // Never done by the model; kept consistent all the same.
                        d.delete(identity_key(*n, w));
                        d.ops.push(Op::Put {
                            key: format!("{IDENTITY_CLAIMS}{n}"),
                            value: i.universe.clone(),
                        });
                    }
                    Some(_) => {}
                }
            }
            (Some(w), None) => {
                d.delete(format!("{IDENTITY_CLAIMS}{n}"));
                if inside_gone(&w.universe) {
                    continue;
                }
                touched.insert(w.universe.clone());
                d.delete(identity_key(*n, w));
            }
        }
    }

    for (name, was) in after.hosts.changes() {
        let now = after.hosts.get(name);
        if now == was.as_deref() {
            continue;
        }
        let key = format!("{HOSTS}{name}");
        match now {
            Some(h) => {
                d.guards.insert(if was.is_none() {
                    Guard::Absent(key.clone())
                } else {
                    Guard::Unchanged(key.clone())
                });
                d.put(key, h)?;
            }
            None => {
                d.guards.insert(Guard::Unchanged(key.clone()));
                d.delete(key);
            }
        }
    }

    for (id, was) in after.tokens.changes() {
        let now = after.tokens.get(id);
        if now == was.as_deref() {
            continue;
        }
        let key = format!("{TOKENS}{id}");
        match now {
            Some(t) => {
                d.guards.insert(if was.is_none() {
                    Guard::Absent(key.clone())
                } else {
                    Guard::Unchanged(key.clone())
                });
                d.put(key, t)?;
            }
            None => {
                d.guards.insert(Guard::Unchanged(key.clone()));
                d.delete(key);
            }
        }
    }

    for (key, before, after) in [
        (VNIS_ISSUED, u64::from(before.vnis_issued), u64::from(after.vnis_issued)),
        (SERIALS_ISSUED, before.serials_issued, after.serials_issued),
    ] {
        if before != after {
            d.guards.insert(Guard::Unchanged(key.to_owned()));
            d.ops.push(Op::Put { key: key.to_owned(), value: after.to_string() });
        }
    }

    for uni in touched {
        if inside_gone(&uni) {
            continue;
        }
        // A universe created by this very edit is guarded by its absent version key.
        if before.universes.contains_key(&uni) || !after.universes.contains_key(&uni) {
            d.guards.insert(Guard::Universe(uni.clone()));
        }
        d.ops.push(Op::Put { key: version_key(&uni), value: String::new() });
    }
    if d.guards.contains(&Guard::Catalog) {
        d.ops.push(Op::Put { key: CATALOG.to_owned(), value: String::new() });
    }
    if let Some(g) = one_group_alone(before, after).filter(|_| narrow) {
        // Guarded by the group's key instead of the universe's: see [`one_group_alone`].
        let uni = g.universe.clone();
        d.guards.remove(&Guard::Universe(uni.clone()));
        d.guards.insert(Guard::InUniverse(uni.clone()));
        d.guards.insert(Guard::Unchanged(group_key(g)));
        let version = version_key(&uni);
        d.ops.retain(|op| !matches!(op, Op::Put { key, .. } if *key == version));
        let record = GroupRecord {
            id: g.id.clone(),
            universe: uni,
            name: g.name.clone(),
            description: g.description.clone(),
        };
        d.put(group_key(g), &record)?;
    }
    // One write per key: the last one wins (the version keys are written once above).
    dedup_ops(&mut d.ops);
    Ok(d)
}

/// The group, if the edit from `before` to `after` changed one group's rules (or description)
/// and nothing else that any check of another edit reads: then its guards are the group's key
/// (compared and rewritten: its rules, S4's duplicates, S12's 1000 rules) and the universe's
/// `version` key compared only ([`Guard::InUniverse`]: the group, its universe and every peer
/// group it names still exist, and no endpoint, identity or other object of the universe
/// changed), and edits of other groups of the universe no longer conflict with it.
///
/// Why the fit of the maps (S12) still holds when such edits of two groups commit together,
/// each checked on a state without the other: the group is in no identity (no endpoint is a
/// member), so its rules are in no host's policy entries or rule counts; and if the universe
/// has endpoints, its set of CIDR classes (which every identity's entries and every host's
/// `VERSE_CIDRS` count) is unchanged by the edit. Two such edits together can only take a
/// class away (each removes a rule of a class another rule still had), and fewer classes never
/// make more entries (an entry's peers are the classes inside its CIDR). Everything else an
/// edit may read (endpoints, identities, group members and names, the universe itself) is
/// changed only by edits guarded by [`Guard::Universe`], which rewrite the `version` key this
/// edit compares and refuse to commit over a group key changed since their state. `None` when
/// `after` is not indexed (the check cannot be made: the universe's guard is kept).
fn one_group_alone<'a>(before: &State, after: &'a State) -> Option<&'a SecurityGroup> {
    if !after.is_indexed()
        || before.vnis_issued != after.vnis_issued
        || before.serials_issued != after.serials_issued
        || after.universes.changes().iter().any(|(k, w)| after.universes.get(k) != w.as_deref())
        || after.endpoints.changes().iter().any(|(k, w)| after.endpoints.get(k) != w.as_deref())
        || after.identities.changes().iter().any(|(k, w)| after.identities.get(k) != w.as_deref())
        || after.hosts.changes().iter().any(|(k, w)| after.hosts.get(k) != w.as_deref())
        || after.tokens.changes().iter().any(|(k, w)| after.tokens.get(k) != w.as_deref())
    {
        return None;
    }
    let mut changed =
        after.groups.changes().iter().filter(|(k, w)| after.groups.get(*k) != w.as_deref());
    let (id, was) = changed.next()?;
    if changed.next().is_some() {
        return None;
    }
    let (was, g) = (was.as_deref()?, after.groups.get(id)?);
    if was.universe != g.universe || was.name != g.name {
        return None;
    }
    if after.idx.group_identities.get(id).is_some_and(|ids| !ids.is_empty()) {
        return None;
    }
    let uni = &g.universe;
    let populated = after.idx.universe_endpoints.get(uni).is_some_and(|e| !e.is_empty())
        || after.idx.universe_identities.get(uni).is_some_and(|i| !i.is_empty());
    if populated && classes_changed(was, g, after) {
        return None;
    }
    Some(g)
}

/// Whether the set of CIDR classes of `now`'s universe (IPv4 or IPv6) in `after` differs from
/// what it was with `was` instead of `now` (the classes of `after` are indexed).
fn classes_changed(was: &SecurityGroup, now: &SecurityGroup, after: &State) -> bool {
    use crate::index::{class6_of, class_of};
    let mut v4: BTreeMap<(u32, u8), isize> = BTreeMap::new();
    let mut v6: BTreeMap<(u128, u8), isize> = BTreeMap::new();
    for (rules, n) in [(was, -1), (now, 1)] {
        for r in rules.ingress.iter().chain(&rules.egress) {
            if let Some(c) = class_of(r) {
                *v4.entry(c).or_default() += n;
            }
            if let Some(c) = class6_of(r) {
                *v6.entry(c).or_default() += n;
            }
        }
    }
    let uni = &now.universe;
    let has4 = |c: &(u32, u8)| after.idx.classes.get(uni).and_then(|m| m.get(c)).copied();
    let has6 = |c: &(u128, u8)| after.idx.classes6.get(uni).and_then(|m| m.get(c)).copied();
    let differs = |count: Option<usize>, delta: isize| {
        let now = count.unwrap_or(0) as isize;
        (now > 0) != (now - delta > 0)
    };
    v4.iter().any(|(c, d)| differs(has4(c), *d)) || v6.iter().any(|(c, d)| differs(has6(c), *d))
}

/// Keeps the last write of each key, in order.
fn dedup_ops(ops: &mut Vec<Op>) {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(ops.len());
    for op in ops.drain(..).rev() {
        let key = match &op {
            Op::Put { key, .. } | Op::Delete { key } => key.clone(),
            Op::DeletePrefix { prefix } => format!("{prefix}\u{0}prefix"),
        };
        if seen.insert(key) {
            out.push(op);
        }
    }
    out.reverse();
    *ops = out;
}

/// What a key is, for reading it back.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    Universe(&'a str),
    Catalog,
    Version(&'a str),
    Group {
        uni: &'a str,
        id: &'a str,
    },
    Rule {
        uni: &'a str,
        group: &'a str,
        id: &'a str,
    },
    Endpoint {
        uni: &'a str,
        id: &'a str,
    },
    Identity {
        uni: &'a str,
        n: &'a str,
    },
    Host(&'a str),
    Token(&'a str),
    /// `counters/vnis` or `counters/serials`.
    Counter(&'a str),
    /// `slots/<host>`: a guard, not part of the state.
    Slots(&'a str),
    /// `holds/<uni>/<holder>`: a hold of universe `uni` ([`Guard::InUniverse`]), not part of
    /// the state.
    Hold(&'a str),
    /// Claims and placements: kept by the store, not part of the state.
    Claim,
    /// Anything else (liveness, audit, idempotency records, keys of a newer version).
    Other,
}

pub fn kind(key: &str) -> Kind<'_> {
    if key == CATALOG {
        return Kind::Catalog;
    }
    if let Some(id) = key.strip_prefix(UNIVERSES) {
        return Kind::Universe(id);
    }
    if let Some(name) = key.strip_prefix(HOSTS) {
        return Kind::Host(name);
    }
    if let Some(id) = key.strip_prefix(TOKENS) {
        return Kind::Token(id);
    }
    if key == VNIS_ISSUED || key == SERIALS_ISSUED {
        return Kind::Counter(key);
    }
    if let Some(host) = key.strip_prefix(SLOTS) {
        return Kind::Slots(host);
    }
    if key.starts_with(IDS) || key.starts_with(IDENTITY_CLAIMS) || key.starts_with(PLACEMENT) {
        return Kind::Claim;
    }
    if let Some((uni, _)) = key.strip_prefix(HOLDS).and_then(|rest| rest.split_once('/')) {
        return Kind::Hold(uni);
    }
    let Some(rest) = key.strip_prefix(U) else { return Kind::Other };
    let Some((uni, rest)) = rest.split_once('/') else { return Kind::Other };
    if rest == "version" {
        return Kind::Version(uni);
    }
    let Some((what, rest)) = rest.split_once('/') else { return Kind::Other };
    match what {
        "groups" => Kind::Group { uni, id: rest },
        "rules" => match rest.split_once('/') {
            Some((group, id)) => Kind::Rule { uni, group, id },
            None => Kind::Other,
        },
        "endpoints" => Kind::Endpoint { uni, id: rest },
        "identities" => Kind::Identity { uni, n: rest },
        _ => Kind::Other,
    }
}

/// Whether a key holds part of the desired state (as opposed to guards, claims, liveness...).
pub fn is_state(key: &str) -> bool {
    matches!(
        kind(key),
        Kind::Universe(_)
            | Kind::Group { .. }
            | Kind::Rule { .. }
            | Kind::Endpoint { .. }
            | Kind::Identity { .. }
            | Kind::Host(_)
            | Kind::Token(_)
            | Kind::Counter(_)
    )
}

/// One key read back: put (with its value) or deleted.
pub struct Event<'a> {
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// Applies one batch of events (one transaction, or a whole read) to `state`. Within a batch,
/// groups are applied before their rules and rules are deleted before their groups, so the
/// order of the keys in the batch does not matter; a put of a rule whose group is unknown is
/// ignored with a warning (etcd never shows one: a group and its rules are written and deleted
/// together). Returns whether the state changed. Fails on the first value that does not decode,
/// naming its key; `state` may then hold part of the batch.
pub fn apply(state: &mut State, events: &[Event<'_>]) -> Result<bool, Error> {
    fn json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(value).map_err(|e| Error::Corrupt {
            key: key.to_owned(),
            reason: format!("not the JSON expected: {e}"),
        })
    }
    fn check(key: &str, id: &str, field: &str) -> Result<(), Error> {
        if id == field {
            Ok(())
        } else {
            Err(Error::Corrupt {
                key: key.to_owned(),
                reason: format!("holds the object {field:?}, not {id:?}"),
            })
        }
    }
    let mut changed = false;
    // Rules in key order (by group, then id): new rules of one transaction are appended in the
    // same order however the transaction listed them, so a watch and a full read agree.
    let mut rules: Vec<&Event<'_>> =
        events.iter().filter(|e| matches!(kind(e.key), Kind::Rule { .. })).collect();
    rules.sort_by_key(|e| e.key);
    let others = events.iter().filter(|e| !matches!(kind(e.key), Kind::Rule { .. }));
    // Pass 1: everything but rules; pass 2: rules.
    for pass in [1, 2] {
        let batch: Box<dyn Iterator<Item = &Event<'_>>> =
            if pass == 1 { Box::new(others.clone()) } else { Box::new(rules.iter().copied()) };
        for ev in batch {
            let k = kind(ev.key);
            let is_rule = matches!(k, Kind::Rule { .. });
            if (pass == 2) != is_rule {
                continue;
            }
            match (k, ev.value) {
                (Kind::Universe(id), Some(v)) => {
                    let u: Universe = json(ev.key, v)?;
                    check(ev.key, id, &u.id)?;
                    changed |= state.universes.get(id) != Some(&u);
                    state.universes.insert(id.to_owned(), u);
                }
                (Kind::Universe(id), None) => changed |= state.universes.remove(id).is_some(),
                (Kind::Group { uni, id }, Some(v)) => {
                    let r: GroupRecord = json(ev.key, v)?;
                    check(ev.key, id, &r.id)?;
                    check(ev.key, uni, &r.universe)?;
                    match state.groups.get_mut(id) {
                        Some(g) => {
                            g.name = r.name;
                            g.description = r.description;
                            g.universe = r.universe;
                        }
                        None => {
                            let g = SecurityGroup {
                                id: r.id,
                                universe: r.universe,
                                name: r.name,
                                description: r.description,
                                ingress: Vec::new(),
                                egress: Vec::new(),
                            };
                            state.groups.insert(id.to_owned(), g);
                        }
                    }
                    changed = true;
                }
                (Kind::Group { id, .. }, None) => changed |= state.groups.remove(id).is_some(),
                (Kind::Rule { group, id, .. }, Some(v)) => {
                    let r: Rule = json(ev.key, v)?;
                    check(ev.key, id, &r.id)?;
                    let Some(g) = state.groups.get_mut(group) else {
                        tracing::warn!(key = ev.key, "ignoring a rule of an unknown group");
                        continue;
                    };
                    g.ingress.retain(|x| x.id != r.id || r.direction != model::Direction::Egress);
                    g.egress.retain(|x| x.id != r.id || r.direction != model::Direction::Ingress);
                    let list = match r.direction {
                        model::Direction::Ingress => &mut g.ingress,
                        model::Direction::Egress => &mut g.egress,
                    };
                    match list.iter_mut().find(|x| x.id == r.id) {
                        Some(x) => *x = r,
                        None => model::insert_by_id(list, r),
                    }
                    changed = true;
                }
                (Kind::Rule { group, id, .. }, None) => {
                    // The group may be gone already (deleted in the same batch).
                    if state
                        .groups
                        .get(group)
                        .is_some_and(|g| g.ingress.iter().chain(&g.egress).any(|r| r.id == id))
                    {
                        let g = state.groups.get_mut(group).expect("found just above");
                        g.ingress.retain(|r| r.id != id);
                        g.egress.retain(|r| r.id != id);
                        changed = true;
                    }
                }
                (Kind::Endpoint { uni, id }, Some(v)) => {
                    let e: Endpoint = json(ev.key, v)?;
                    check(ev.key, id, &e.id)?;
                    check(ev.key, uni, &e.universe)?;
                    changed |= state.endpoints.get(id) != Some(&e);
                    state.endpoints.insert(id.to_owned(), e);
                }
                (Kind::Endpoint { id, .. }, None) => {
                    changed |= state.endpoints.remove(id).is_some()
                }
                (Kind::Identity { uni, n }, value) => {
                    let n: u32 = n.parse().map_err(|_| Error::Corrupt {
                        key: ev.key.to_owned(),
                        reason: "not an identity number".into(),
                    })?;
                    match value {
                        Some(v) => {
                            let i: Identity = json(ev.key, v)?;
                            check(ev.key, uni, &i.universe)?;
                            changed |= state.identities.get(&n) != Some(&i);
                            state.identities.insert(n, i);
                        }
                        None => changed |= state.identities.remove(&n).is_some(),
                    }
                }
                (Kind::Host(name), Some(v)) => {
                    let h: HostRecord = json(ev.key, v)?;
                    check(ev.key, name, &h.name)?;
                    changed |= state.hosts.get(name) != Some(&h);
                    state.hosts.insert(name.to_owned(), h);
                }
                (Kind::Host(name), None) => changed |= state.hosts.remove(name).is_some(),
                (Kind::Token(id), Some(v)) => {
                    let t: Token = json(ev.key, v)?;
                    check(ev.key, id, &t.id)?;
                    changed |= state.tokens.get(id) != Some(&t);
                    state.tokens.insert(id.to_owned(), t);
                }
                (Kind::Token(id), None) => changed |= state.tokens.remove(id).is_some(),
                (Kind::Counter(which), Some(v)) => {
                    let n: u64 = std::str::from_utf8(v)
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                        .ok_or_else(|| Error::Corrupt {
                            key: ev.key.to_owned(),
                            reason: "not a decimal counter".into(),
                        })?;
                    if which == VNIS_ISSUED {
                        let n = u32::try_from(n).map_err(|_| Error::Corrupt {
                            key: ev.key.to_owned(),
                            reason: format!("{n} is not a VNI"),
                        })?;
                        changed |= state.vnis_issued != n;
                        state.vnis_issued = n;
                    } else {
                        changed |= state.serials_issued != n;
                        state.serials_issued = n;
                    }
                }
                // A counter is never deleted: handed out stays handed out.
                (Kind::Counter(_), None) => {}
                (
                    Kind::Catalog | Kind::Version(_) | Kind::Claim | Kind::Slots(_) | Kind::Hold(_),
                    _,
                ) => {}
                (Kind::Other, _) => {}
            }
        }
    }
    Ok(changed)
}

/// The keys of `state` under `prefix` (what a range delete of it removes), for stores that
/// keep the state rather than the keys (the embedded store's log). Only the prefixes [`delta`]
/// deletes are known: a universe's, and a group's rules.
pub fn keys_under(state: &State, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Some(rest) = prefix.strip_prefix(U) else { return out };
    let Some((uni, rest)) = rest.split_once('/') else { return out };
    let group_rules = |out: &mut Vec<String>, g: &SecurityGroup| {
        for r in g.ingress.iter().chain(&g.egress) {
            out.push(rule_key(&g.universe, &g.id, &r.id));
        }
    };
    if rest.is_empty() {
        for g in state.groups.values().filter(|g| g.universe == uni) {
            group_rules(&mut out, g);
            out.push(group_key(g));
        }
        for e in state.endpoints.values().filter(|e| e.universe == uni) {
            out.push(endpoint_key(e));
        }
        for (n, i) in state.identities.iter().filter(|(_, i)| i.universe == uni) {
            out.push(identity_key(*n, i));
        }
    } else if let Some(group) = rest.strip_prefix("rules/").and_then(|g| g.strip_suffix('/')) {
        if let Some(g) = state.groups.get(group) {
            group_rules(&mut out, g);
        }
    }
    out
}

/// Every key and value of `state` (what a full write of it would put), in key order. For tests
/// and for the embedded store's snapshots.
pub fn encode_all(state: &State) -> Result<BTreeMap<String, String>, Error> {
    let mut fresh = State::default();
    for (k, v) in &state.universes {
        fresh.universes.insert(k.clone(), v.clone());
    }
    for (k, v) in &state.groups {
        fresh.groups.insert(k.clone(), v.clone());
    }
    for (k, v) in &state.endpoints {
        fresh.endpoints.insert(k.clone(), v.clone());
    }
    for (k, v) in &state.identities {
        fresh.identities.insert(*k, v.clone());
    }
    for (k, v) in &state.hosts {
        fresh.hosts.insert(k.clone(), v.clone());
    }
    for (k, v) in &state.tokens {
        fresh.tokens.insert(k.clone(), v.clone());
    }
    fresh.vnis_issued = state.vnis_issued;
    fresh.serials_issued = state.serials_issued;
    let d = delta(&State::default(), &fresh)?;
    let mut out = BTreeMap::new();
    for op in d.ops {
        if let Op::Put { key, value } = op {
            out.insert(key, value);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CreateEndpoint;
    use crate::testkit::{endpoint, endpoint_req, group, port_rule, universe};

    pub(crate) fn sample() -> State {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        let g = group(&mut s, &u.id, "web");
        s.add_rule(&g.id, port_rule("ingress", "tcp", 80, "10.0.0.0/8")).unwrap();
        endpoint(&mut s, &u.id, "h2", "10.1.0.5", &[&g.id]);
        s.hosts.insert(
            "h2".into(),
            HostRecord {
                name: "h2".into(),
                underlay_ip: Some("198.18.0.2".parse().unwrap()),
                api: Some("https://198.18.0.2:7070".into()),
                api_fingerprint: Some(format!("SHA256:{}", ["AB"; 32].join(":"))),
            },
        );
        s.clear_changes();
        s
    }

    /// `s` with its revision and the order of each group's rules left out: a full read orders
    /// rules by their keys' creation, which a map of keys does not keep.
    fn normal(s: &State) -> State {
        let mut s = s.clone();
        s.revision = 0;
        s.groups.update_all(|_, g| {
            g.ingress.sort_by(|a, b| a.id.cmp(&b.id));
            g.egress.sort_by(|a, b| a.id.cmp(&b.id));
        });
        s.clear_changes();
        s
    }

    fn load(kvs: &BTreeMap<String, String>) -> State {
        let events: Vec<Event> =
            kvs.iter().map(|(k, v)| Event { key: k, value: Some(v.as_bytes()) }).collect();
        let mut s = State::default();
        apply(&mut s, &events).unwrap();
        s.clear_changes();
        s
    }

    /// Applies a delta's ops to a key-value map, as etcd would.
    fn commit(kvs: &mut BTreeMap<String, String>, d: &Delta) -> Vec<(String, Option<String>)> {
        let mut events = Vec::new();
        for op in &d.ops {
            match op {
                Op::Put { key, value } => {
                    kvs.insert(key.clone(), value.clone());
                    events.push((key.clone(), Some(value.clone())));
                }
                Op::Delete { key } => {
                    if kvs.remove(key).is_some() {
                        events.push((key.clone(), None));
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let gone: Vec<String> =
                        kvs.keys().filter(|k| k.starts_with(prefix.as_str())).cloned().collect();
                    for k in gone {
                        kvs.remove(&k);
                        events.push((k, None));
                    }
                }
            }
        }
        for key in &d.cleanup {
            kvs.remove(key);
        }
        events
    }

    #[test]
    fn a_state_round_trips_through_its_keys() {
        let s = sample();
        let kvs = encode_all(&s).unwrap();
        let uni = s.universes.keys().next().unwrap().clone();
        for prefix in [
            format!("universes/{uni}"),
            format!("u/{uni}/version"),
            format!("u/{uni}/groups/"),
            format!("u/{uni}/rules/"),
            format!("u/{uni}/endpoints/"),
            format!("u/{uni}/identities/"),
            "ids/".to_owned(),
            "identities/".to_owned(),
            "placement/h2/ns".to_owned(),
            "hosts/h2".to_owned(),
        ] {
            assert!(kvs.keys().any(|k| k.starts_with(&prefix)), "no {prefix} in {kvs:#?}");
        }
        assert_eq!(normal(&load(&kvs)), normal(&s));
    }

    /// Every edit writes only what it changes, and the keys it writes, applied as a watch
    /// would deliver them, give the state the edit made.
    #[test]
    fn edits_write_what_they_change_and_read_back_as_the_edit_made_them() {
        let mut s = sample();
        let mut kvs = encode_all(&s).unwrap();
        let uni = s.universes.keys().next().unwrap().clone();
        let web = s.groups.values().find(|g| g.name == "web").unwrap().id.clone();
        let check = |before: &State, after: &mut State, kvs: &mut BTreeMap<String, String>| {
            let d = delta(before, after).unwrap();
            let events = commit(kvs, &d);
            let mut cache = before.clone();
            let evs: Vec<Event> = events
                .iter()
                .map(|(k, v)| Event { key: k, value: v.as_ref().map(|v| v.as_bytes()) })
                .collect();
            apply(&mut cache, &evs).unwrap();
            after.clear_changes();
            assert_eq!(normal(&cache), normal(after), "the watch's view of the edit");
            assert_eq!(normal(&load(kvs)), normal(after), "a full read after the edit");
            d
        };
        // A rule: one rule key and the universe's version.
        let before = s.clone();
        s.add_rule(&web, port_rule("egress", "udp", 53, "10.9.0.0/16")).unwrap();
        let d = check(&before, &mut s, &mut kvs);
        assert_eq!(d.ops.len(), 2, "{d:?}");
        assert_eq!(d.guards, BTreeSet::from([Guard::Universe(uni.clone())]));
        // Deleting a group with rules.
        let before = s.clone();
        let g = group(&mut s, &uni, "db");
        let d = check(&before, &mut s, &mut kvs);
        assert!(d.guards.contains(&Guard::Absent(format!("ids/{}", g.id))));
        let before = s.clone();
        s.delete_group(&g.id).unwrap();
        check(&before, &mut s, &mut kvs);
        assert!(!kvs.keys().any(|k| k.contains(&g.id)), "{kvs:#?}");
        // Endpoints: delete the only one (its identity goes), then the universe.
        let ep = s.endpoints.keys().next().unwrap().clone();
        let before = s.clone();
        s.delete_endpoint(&ep).unwrap();
        check(&before, &mut s, &mut kvs);
        let before = s.clone();
        s.delete_universe(&uni).unwrap();
        let d = check(&before, &mut s, &mut kvs);
        assert!(d.ops.contains(&Op::DeletePrefix { prefix: format!("u/{uni}/") }));
        assert!(d.ops.len() < 10, "a universe is deleted by a range: {d:?}");
        let left: Vec<&String> = kvs.keys().filter(|k| !k.starts_with("hosts/")).collect();
        assert_eq!(
            left,
            ["catalog", "counters/serials", "counters/vnis", "slots/h2"],
            "nothing of the universe outlives it but what is never handed out again"
        );
    }

    /// S7 and S14 across universes: handing out a VNI or a serial compares and rewrites its
    /// counter, placing an endpoint compares and rewrites its host's slots key; the counters
    /// read back, so a state rebuilt from the keys goes on from them.
    #[test]
    fn counters_and_host_slots_guard_what_is_unique_across_universes() {
        let mut s = sample();
        let mut kvs = encode_all(&s).unwrap();
        assert_eq!(kvs["counters/vnis"], "1");
        assert_eq!(kvs["counters/serials"], "1");
        let uni = s.universes.keys().next().unwrap().clone();
        let before = s.clone();
        let req = endpoint_req(&uni, "h2", "10.1.0.6", &[]);
        s.create_endpoint(CreateEndpoint { conntrack_budget: Some(10), ..req }, "h2").unwrap();
        let d = delta(&before, &s).unwrap();
        for key in ["counters/serials", "slots/h2"] {
            assert!(d.guards.contains(&Guard::Unchanged(key.into())), "{key}: {d:?}");
        }
        assert!(!d.guards.iter().any(|g| *g == Guard::Unchanged("counters/vnis".into())));
        commit(&mut kvs, &d);
        assert_eq!(kvs["counters/serials"], "2");
        // Deleting the universe keeps the counters; a state read back hands out new numbers.
        let eps: Vec<String> = s.endpoints.keys().cloned().collect();
        for ep in eps {
            let before = s.clone();
            s.delete_endpoint(&ep).unwrap();
            commit(&mut kvs, &delta(&before, &s).unwrap());
        }
        let before = s.clone();
        s.delete_universe(&uni).unwrap();
        commit(&mut kvs, &delta(&before, &s).unwrap());
        let mut back = load(&kvs);
        assert_eq!((back.vnis_issued, back.serials_issued), (1, 2));
        let u = universe(&mut back, "again", "10.1.0.0/16");
        assert_eq!(u.vni, 2, "VNI 1 is never handed out again");
        let e = endpoint(&mut back, &u.id, "h2", "10.1.0.5", &[]);
        assert_eq!(e.serial, 3, "serials 1 and 2 are never handed out again");
    }

    #[test]
    fn keys_are_classified() {
        assert_eq!(
            kind("u/uni-1/rules/sg-1/sgr-2"),
            Kind::Rule { uni: "uni-1", group: "sg-1", id: "sgr-2" }
        );
        assert_eq!(kind("u/uni-1/version"), Kind::Version("uni-1"));
        assert_eq!(kind("alive/h1"), Kind::Other);
        assert_eq!(kind("placement/h1/ns"), Kind::Claim);
        assert_eq!(kind("counters/vnis"), Kind::Counter("counters/vnis"));
        assert_eq!(kind("slots/h1"), Kind::Slots("h1"));
        assert_eq!(kind("holds/u1/x"), Kind::Hold("u1"));
        assert!(!is_state("holds/u1/x"));
        assert!(is_state("counters/serials") && !is_state("slots/h1"));
        assert!(is_state("hosts/h1") && !is_state("catalog"));
    }

    /// An edit of one group's rules alone is guarded by that group's key and the universe's
    /// `version` compared only, so edits of other groups do not conflict with it; anything
    /// another edit's checks read (a group with members, a new CIDR class in a universe with
    /// endpoints, a group created, renamed or deleted) keeps the universe's guard. Its writes
    /// read back as the edit made them.
    #[test]
    fn an_edit_of_one_groups_rules_alone_is_guarded_by_the_group() {
        let mut s = sample();
        let uni = s.universes.keys().next().unwrap().clone();
        let web = s.groups.values().find(|g| g.name == "web").unwrap().id.clone();
        let spare = group(&mut s, &uni, "spare").id;
        let empty = universe(&mut s, "empty", "10.2.0.0/16").id;
        let lone = group(&mut s, &empty, "lone").id;
        s.clear_changes();
        let mut kvs = encode_all(&s).unwrap();
        let mut edit = |s: &mut State, f: &dyn Fn(&mut State)| {
            let before = s.clone();
            f(s);
            // As the store runs an edit: the fit check has indexed the state.
            s.reindex();
            let d = delta(&before, s).unwrap();
            let events = commit(&mut kvs, &d);
            let mut watched = before.clone();
            let evs: Vec<Event> = events
                .iter()
                .map(|(k, v)| Event { key: k, value: v.as_ref().map(|v| v.as_bytes()) })
                .collect();
            apply(&mut watched, &evs).unwrap();
            s.clear_changes();
            assert_eq!(normal(&watched), normal(s), "the watch's view of the edit");
            assert_eq!(normal(&load(&kvs)), normal(s), "a full read after the edit");
            d
        };
        let alone = |uni: &str, g: &str| {
            BTreeSet::from([
                Guard::InUniverse(uni.to_owned()),
                Guard::Unchanged(format!("u/{uni}/groups/{g}")),
            ])
        };
        let whole = |uni: &str| BTreeSet::from([Guard::Universe(uni.to_owned())]);

        // A rule of a group without members, of a CIDR class the universe has (web's rule).
        let d = edit(&mut s, &|s| {
            s.add_rule(&spare, port_rule("ingress", "tcp", 22, "10.0.0.0/8")).unwrap();
        });
        assert_eq!(d.guards, alone(&uni, &spare), "{d:?}");
        assert!(
            d.ops.iter().all(|op| !matches!(op, Op::Put { key, .. } if key.ends_with("/version"))),
            "the universe's version is not rewritten: {d:?}"
        );
        assert!(d.ops.iter().any(
            |op| matches!(op, Op::Put { key, .. } if *key == format!("u/{uni}/groups/{spare}"))
        ));
        let rule = s.groups[&spare].ingress[0].id.clone();
        // A rule naming another group of the universe as its peer.
        let d = edit(&mut s, &|s| {
            let mut r = port_rule("ingress", "tcp", 23, "10.0.0.0/8");
            r.cidr = None;
            r.group = Some(web.clone());
            s.add_rule(&spare, r).unwrap();
        });
        assert_eq!(d.guards, alone(&uni, &spare), "{d:?}");
        // A new class in a universe with an endpoint: every identity's entries may change.
        let d = edit(&mut s, &|s| {
            s.add_rule(&spare, port_rule("ingress", "tcp", 24, "10.9.0.0/16")).unwrap();
        });
        assert_eq!(d.guards, whole(&uni), "{d:?}");
        // A rule of a group with a member: its host's policy entries change.
        let d = edit(&mut s, &|s| {
            s.add_rule(&web, port_rule("ingress", "tcp", 25, "10.0.0.0/8")).unwrap();
        });
        assert_eq!(d.guards, whole(&uni), "{d:?}");
        // Deleting a rule whose class another rule still has.
        let d = edit(&mut s, &|s| s.delete_rule(&spare, &rule).unwrap());
        assert_eq!(d.guards, alone(&uni, &spare), "{d:?}");
        // A new class in a universe without endpoints counts in no host's maps.
        let d = edit(&mut s, &|s| {
            s.add_rule(&lone, port_rule("egress", "udp", 53, "192.168.0.0/16")).unwrap();
        });
        assert_eq!(d.guards, alone(&empty, &lone), "{d:?}");
        // A description changed: still one group alone; a name: unique in the universe.
        let d = edit(&mut s, &|s| {
            s.groups.get_mut(&lone).unwrap().description = "the lone group".into();
        });
        assert_eq!(d.guards, alone(&empty, &lone), "{d:?}");
        // The same kind of edit by an edit that holds the others off keeps the universe's
        // guard, and rewrites its `version` as any edit guarded so does.
        let before = s.clone();
        let mut held = s.clone();
        held.add_rule(&lone, port_rule("egress", "udp", 55, "192.168.0.0/16")).unwrap();
        held.reindex();
        assert_eq!(delta(&before, &held).unwrap().guards, alone(&empty, &lone));
        let d = delta_held(&before, &held).unwrap();
        assert_eq!(d.guards, whole(&empty), "{d:?}");
        assert!(d
            .ops
            .iter()
            .any(|op| matches!(op, Op::Put { key, .. } if *key == version_key(&empty))));
        let d = edit(&mut s, &|s| s.groups.get_mut(&lone).unwrap().name = "solo".into());
        assert_eq!(d.guards, whole(&empty), "{d:?}");
        // Two groups in one edit, a group created, a group deleted: the universe's guard.
        let d = edit(&mut s, &|s| {
            s.add_rule(&spare, port_rule("ingress", "tcp", 26, "10.0.0.0/8")).unwrap();
            s.add_rule(&web, port_rule("ingress", "tcp", 27, "10.0.0.0/8")).unwrap();
        });
        assert_eq!(d.guards, whole(&uni), "{d:?}");
        let d = edit(&mut s, &|s| {
            group(s, &empty, "more");
        });
        assert!(d.guards.contains(&Guard::Universe(empty.clone())), "{d:?}");
        let d = edit(&mut s, &|s| s.delete_group(&spare).unwrap());
        assert_eq!(d.guards, whole(&uni), "{d:?}");
        // Not indexed (the check cannot be made): the universe's guard.
        let before = s.clone();
        s.add_rule(&lone, port_rule("egress", "udp", 54, "192.168.0.0/16")).unwrap();
        s.groups.get_mut(&lone).unwrap().description = "unindexed".into();
        assert!(!s.is_indexed());
        assert_eq!(delta(&before, &s).unwrap().guards, whole(&empty));
    }
}
