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

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common as dp;
use ipnetwork::Ipv4Network;

use crate::model::{self, State};

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
pub fn compile(
    state: &State,
    host: &str,
    ifindex: &dyn Fn(&model::Endpoint) -> Option<u32>,
    cidr_ids: &mut CidrIds,
) -> model::Result<Desired> {
    let _ = (state, host, ifindex, cidr_ids);
    todo!("compile")
}
