//! Simulated hosts: many hosts of a fleet in one process, each running the real control plane
//! (its own etcd watch and liveness lease, the compiler, the reconciler, realized-revision
//! reports) with the kernel replaced by an in-memory map set, so that a fleet of a thousand
//! hosts can join one etcd from one machine (`versed --simulate-hosts N`, see the README,
//! "Scale").
//!
//! Contract:
//! - [`SimMaps`] holds what a host's eBPF maps would hold and applies the differences the
//!   reconciler asks for as [`Dataplane::apply`](crate::dataplane::Dataplane::apply) does: puts
//!   of what is new or changed first, removals after, each map bounded by its capacity in
//!   `dataplane_common::capacity` (a put into a full map fails, as the kernel's would, and
//!   leaves what was written so far). It counts every entry written and removed.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common as dp;
use serde::{Deserialize, Serialize};

use crate::compile::Desired;
use crate::reconcile::{MapSet, MapSetError};

/// What a simulated host's maps hold, and how many entries it has written and removed.
#[derive(Debug, Default)]
pub struct SimMaps {
    maps: Desired,
    counts: MapCounts,
}

/// Work done on a simulated host's maps since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCounts {
    /// Calls of `apply` (rounds that changed something).
    pub applies: u64,
    /// Entries put (new or changed).
    pub written: u64,
    /// Entries removed.
    pub removed: u64,
}

/// Why a put into a simulated map failed: the map is full, as a kernel map would be.
#[derive(Debug, thiserror::Error)]
#[error("map {name} is full ({capacity} entries): cannot add {entry}")]
pub struct MapFull {
    pub name: &'static str,
    pub capacity: u32,
    pub entry: String,
}

impl SimMaps {
    /// Empty maps, as a host that never ran.
    pub fn new() -> SimMaps {
        SimMaps::default()
    }

    /// What the maps hold.
    pub fn maps(&self) -> &Desired {
        &self.maps
    }

    /// Entries held, over every map.
    pub fn entries(&self) -> usize {
        let m = &self.maps;
        m.endpoints.len()
            + m.routes.len()
            + m.cidrs.len()
            + m.policy.len()
            + m.hosts.len()
            + m.vnis.len()
    }

    pub fn counts(&self) -> MapCounts {
        self.counts
    }
}

impl MapSet for SimMaps {
    fn read(&self) -> Result<Desired, MapSetError> {
        Ok(self.maps.clone())
    }

    /// The order of [`Dataplane::apply`](crate::dataplane::Dataplane::apply): puts into hosts,
    /// VNIs, CIDR classes, policy, routes, endpoints; then removals in the reverse order.
    fn apply(&mut self, current: &Desired, desired: &Desired) -> Result<(), MapSetError> {
        self.counts.applies += 1;
        let (m, c) = (&mut self.maps, &mut self.counts);
        use dp::{capacity as cap, map_names as names};
        put_changed(&mut m.hosts, &current.hosts, &desired.hosts, names::HOSTS, cap::HOSTS, c)?;
        put_new(&mut m.vnis, &current.vnis, &desired.vnis, names::VNIS, cap::VNIS, c)?;
        put_changed(&mut m.cidrs, &current.cidrs, &desired.cidrs, names::CIDRS, cap::CIDRS, c)?;
        put_new(&mut m.policy, &current.policy, &desired.policy, names::POLICY, cap::POLICY, c)?;
        put_changed(
            &mut m.routes,
            &current.routes,
            &desired.routes,
            names::ROUTES,
            cap::ROUTES,
            c,
        )?;
        // Endpoints below the slot count live in the slot array, the others in the hash.
        let slots = cap::ENDPOINT_SLOTS;
        put_changed(
            &mut m.endpoints,
            &current.endpoints,
            &desired.endpoints,
            names::ENDPOINTS,
            slots,
            c,
        )?;
        remove_gone(
            &mut m.endpoints,
            current.endpoints.keys(),
            |k| desired.endpoints.contains_key(k),
            c,
        );
        remove_gone(&mut m.routes, current.routes.keys(), |k| desired.routes.contains_key(k), c);
        remove_gone_set(&mut m.policy, current.policy.difference(&desired.policy), c);
        remove_gone(&mut m.cidrs, current.cidrs.keys(), |k| desired.cidrs.contains_key(k), c);
        remove_gone_set(&mut m.vnis, current.vnis.difference(&desired.vnis), c);
        remove_gone(&mut m.hosts, current.hosts.keys(), |k| desired.hosts.contains_key(k), c);
        Ok(())
    }
}

/// Puts every entry of `desired` that `current` lacks or holds with another value.
fn put_changed<K: Ord + Copy + std::fmt::Debug, V: PartialEq + Copy>(
    map: &mut BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
    capacity: u32,
    counts: &mut MapCounts,
) -> Result<(), MapFull> {
    for (key, value) in desired {
        if current.get(key) == Some(value) {
            continue;
        }
        if !map.contains_key(key) && map.len() >= capacity as usize {
            return Err(MapFull { name, capacity, entry: format!("{key:?}") });
        }
        map.insert(*key, *value);
        counts.written += 1;
    }
    Ok(())
}

/// Puts every key of `desired` that `current` lacks.
fn put_new<K: Ord + Copy + std::fmt::Debug>(
    set: &mut BTreeSet<K>,
    current: &BTreeSet<K>,
    desired: &BTreeSet<K>,
    name: &'static str,
    capacity: u32,
    counts: &mut MapCounts,
) -> Result<(), MapFull> {
    for key in desired.difference(current) {
        if !set.contains(key) && set.len() >= capacity as usize {
            return Err(MapFull { name, capacity, entry: format!("{key:?}") });
        }
        set.insert(*key);
        counts.written += 1;
    }
    Ok(())
}

/// Removes the keys of `current` that `keep` refuses (absent ones are fine, as in the kernel).
fn remove_gone<'a, K: Ord + 'a, V>(
    map: &mut BTreeMap<K, V>,
    current: impl Iterator<Item = &'a K>,
    keep: impl Fn(&K) -> bool,
    counts: &mut MapCounts,
) {
    for key in current.filter(|k| !keep(k)) {
        map.remove(key);
        counts.removed += 1;
    }
}

fn remove_gone_set<'a, K: Ord + 'a>(
    set: &mut BTreeSet<K>,
    gone: impl Iterator<Item = &'a K>,
    counts: &mut MapCounts,
) {
    for key in gone {
        set.remove(key);
        counts.removed += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(n: u8) -> (dp::RouteKey, dp::Route) {
        (
            dp::RouteKey { vni: 1, ip: [10, 0, 0, n] },
            dp::Route {
                ifindex: 0,
                identity: 1,
                mac: [2, 0, 0, 0, 0, n],
                _pad: [0; 2],
                underlay: [1; 4],
            },
        )
    }

    #[test]
    fn sim_maps_apply_the_differences_and_count_them() {
        let mut sim = SimMaps::new();
        let mut a = Desired::default();
        a.routes.extend([route(1), route(2)]);
        a.vnis.insert(1);
        a.hosts.insert([198, 19, 0, 1], 1);
        sim.apply(&Desired::default(), &a).unwrap();
        assert_eq!(sim.maps(), &a);
        assert_eq!(sim.counts(), MapCounts { applies: 1, written: 4, removed: 0 });
        let mut b = a.clone();
        b.routes.remove(&route(1).0);
        b.routes.insert(route(2).0, dp::Route { identity: 9, ..route(2).1 });
        b.routes.extend([route(3)]);
        sim.apply(&a, &b).unwrap();
        assert_eq!(sim.maps(), &b);
        assert_eq!(sim.counts(), MapCounts { applies: 2, written: 6, removed: 1 });
        assert_eq!(sim.entries(), 4);
        assert_eq!(MapSet::read(&sim).unwrap(), b);
    }

    #[test]
    fn a_full_sim_map_refuses_a_new_entry_and_keeps_what_was_written() {
        let mut sim = SimMaps::new();
        let mut full = Desired::default();
        for n in 0..dp::capacity::HOSTS {
            full.hosts.insert(n.to_be_bytes(), 1);
        }
        sim.apply(&Desired::default(), &full).unwrap();
        let mut more = full.clone();
        more.hosts.insert([255, 255, 255, 255], 1);
        more.vnis.insert(7);
        let err = sim.apply(&full, &more).unwrap_err();
        assert!(err.to_string().contains("VERSE_HOSTS is full"), "{err}");
        // Nothing after the failed put was written: the VNIs come after the hosts.
        assert_eq!(sim.maps(), &full);
    }
}
