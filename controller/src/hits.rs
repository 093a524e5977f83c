//! Per-rule hit counters: how many new flows each user rule admitted, and their packets.
//!
//! Contract: the dataplane counts new flows per rule in `VERSE_RULE_HITS` (every rule that
//! produces policy entries on a host has a slot there, given by the compiler and carried in its
//! entries, see `dataplane_common::rule_slots`; a flow is credited to the rule its policy entry
//! names, see `dataplane_common::PolicyValue`). A host
//! answers for its own counters; `GET /v1/security-groups/{id}` and `GET /v1/rule-stats` sum
//! those of every host of the fleet that answers, and say which did not ([`HitsFrom`]). A rule
//! that never matched shows 0.

use serde::{Deserialize, Serialize};

use crate::model::{Rule, SecurityGroup};

/// What one rule admitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hits {
    /// New flows (conntrack entries) the rule admitted.
    pub flows: u64,
    /// Packets of those flows, both ways, since each host's daemon started: counted in the
    /// flows' conntrack entries and credited to the rule at each flow-log interval (so they
    /// trail the traffic by up to one interval).
    #[serde(default)]
    pub packets: u64,
}

impl std::ops::AddAssign for Hits {
    fn add_assign(&mut self, o: Hits) {
        self.flows = self.flows.saturating_add(o.flows);
        self.packets = self.packets.saturating_add(o.packets);
    }
}

/// One row of `GET /v1/rule-stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStats {
    /// `sgr-…`
    pub rule: String,
    pub group: String,
    pub universe: String,
    #[serde(flatten)]
    pub hits: Hits,
}

/// Which hosts' counters a sum includes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitsFrom {
    /// The hosts whose counters are in the sums.
    pub hosts: Vec<String>,
    /// The hosts that did not answer, and why.
    pub missing: Vec<MissingHost>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingHost {
    pub host: String,
    pub error: String,
}

/// A rule with its hits, as `GET /v1/security-groups/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    #[serde(flatten)]
    pub rule: Rule,
    pub hits: Hits,
}

/// `GET /v1/security-groups/{id}`: the group, each rule with its hits summed over the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub id: String,
    pub universe: String,
    pub name: String,
    pub description: String,
    pub ingress: Vec<RuleView>,
    pub egress: Vec<RuleView>,
    pub hits_from: HitsFrom,
}

impl GroupView {
    /// The group with the hits `hits` gives each rule (0 for a rule it does not know).
    pub fn new(g: &SecurityGroup, hits: impl Fn(&str) -> Hits, from: HitsFrom) -> GroupView {
        let view = |rules: &[Rule]| {
            rules.iter().map(|r| RuleView { rule: r.clone(), hits: hits(&r.id) }).collect()
        };
        GroupView {
            id: g.id.clone(),
            universe: g.universe.clone(),
            name: g.name.clone(),
            description: g.description.clone(),
            ingress: view(&g.ingress),
            egress: view(&g.egress),
            hits_from: from,
        }
    }
}
