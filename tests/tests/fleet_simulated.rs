//! Simulated hosts join a real fleet (see the README, "Scale"): three real hosts and 50 hosts of
//! `versed --simulate-hosts` on one three-member etcd. Each simulated host registers, stays
//! healthy on its own lease, follows the state on its own watch and realizes every revision in
//! its in-memory maps; endpoints placed on simulated hosts through a real host's API are in their
//! maps. A host holds only what its endpoints need: a simulated host without an endpoint holds
//! no map entry at all, and a real host's dataplane knows as peers (VERSE_HOSTS, their
//! 198.19.0.0/16 underlay addresses) exactly the simulated hosts holding an endpoint of a
//! universe it has an endpoint of. A simulated host follows only the universes with an endpoint
//! on it: an edit of the universe sends the others nothing, and is still realized by all 53 as
//! the API judges it. When the simulation stops, its hosts' leases lapse and the
//! API no longer waits for them.
use std::time::{Duration, Instant};

use tests::*;

const SIMULATED: usize = 50;
/// Bound of every wait here (a debug build, 53 hosts, two shared cores).
const WAIT: Duration = Duration::from_secs(60);

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// The simulated host `name` in a `GET /v1/simulation` report.
fn sim_host(report: &Value, name: &str) -> Value {
    report["per_host"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not in the simulation's report"))
}

/// The keys of the `VERSE_HOSTS` map pinned under `bpf_dir`: the underlay addresses of the
/// other hosts this dataplane accepts encapsulated traffic from.
fn pinned_hosts(bpf_dir: &std::path::Path) -> Vec<std::net::Ipv4Addr> {
    pinned_keys(bpf_dir, dataplane_common::map_names::HOSTS)
        .into_iter()
        .map(|b| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        .collect()
}

#[test]
fn fifty_simulated_hosts_join_three_real_ones_and_realize_every_edit() {
    assert!(is_root(), "needs root: network namespaces, bpffs, eBPF");
    let fleet = Fleet::start(3);
    let sim = fleet.simulate(SIMULATED, "sim-", 0, WAIT);
    let names = sim.names();
    let mut all: Vec<String> = fleet.hosts().iter().map(|h| h.name().to_owned()).collect();
    all.extend(names.iter().cloned());

    let api = fleet.api(0).clone();
    let uni = api.create_universe("scale", "10.50.0.0/16");
    let uni = id(&uni).to_owned();
    let web = api.create_group(&uni, "web");
    let clients = api.create_group(&uni, "clients");
    let (web, clients) = (id(&web).to_owned(), id(&clients).to_owned());
    let client = fleet.endpoint(0, &uni, "10.50.0.2", &[&clients]);

    // Two endpoints on each of the first ten simulated hosts, placed through the real hosts'
    // APIs in turn.
    let mut placed = Vec::new();
    for (i, name) in names.iter().take(10).enumerate() {
        for k in 0..2 {
            let body = json!({"universe": uni, "host": name, "netns": format!("sim-ns-{k}"),
                "ip": format!("10.50.1.{}", i * 2 + k + 1), "security_groups": [web]});
            let r = fleet.api(i % 3).post("/v1/endpoints", &body);
            assert_eq!(r.status, 201, "POST /v1/endpoints {body}: {}", r.body);
            placed.push((name.clone(), id(&r.json()).to_owned()));
        }
    }

    // One edit, realized by all 53 hosts: the simulated hosts without an endpoint of the
    // universe follow only their own (none), so it reaches none of them and is realized there
    // trivially (their revision as the real hosts judge it).
    let quiet = sim.report();
    let started = Instant::now();
    let rule = json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80,
        "group": clients});
    let r = api.post(&format!("/v1/security-groups/{web}/rules"), &rule);
    assert_eq!(r.status, 201, "{}", r.body);
    let revision = r.revision().expect("a revision");
    assert!(
        fleet.wait_names_realized(1, &all, revision, WAIT),
        "not every host realized revision {revision} within {WAIT:?}: {:?}",
        fleet.api(1).hosts()
    );
    eprintln!("revision {revision} realized by {} hosts in {:?}", all.len(), started.elapsed());

    let report = sim.report();
    assert_eq!(report["started"], SIMULATED, "{:?}", sim.summary());
    let holding: Vec<&String> = names.iter().take(10).collect();
    for name in &names {
        let h = sim_host(&report, name);
        assert!(h["watch"]["events"].as_u64().is_some_and(|e| e > 0), "{h}");
        assert!(h["watch"]["bytes"].as_u64().is_some_and(|b| b > 0), "{h}");
        if holding.contains(&name) {
            assert!(h["revision"].as_u64().is_some_and(|r| r >= revision), "{h}");
            assert!(h["maps"]["written"].as_u64().is_some_and(|w| w > 0), "{h}");
        } else {
            assert_eq!(
                h["watch"],
                sim_host(&quiet, name)["watch"],
                "{name} holds no endpoint of the universe: the edit sent it nothing"
            );
            // No endpoint here: nothing of the universe, nor of the fleet's other hosts.
            assert_eq!(
                (h["map_entries"].as_u64(), h["maps"]["written"].as_u64()),
                (Some(0), Some(0)),
                "{h}"
            );
        }
    }
    // A simulated host holds its own endpoints and their policy; the rule added policy entries.
    let first = sim_host(&report, &names[0]);
    let entries = first["map_entries"].as_u64().unwrap();
    assert!(entries >= 4, "two endpoints and their routes at least: {first}");

    // The real host holding the client accepts encapsulated traffic from the simulated hosts
    // holding the universe's other endpoints, and from no other; the two real hosts without an
    // endpoint from none.
    for (i, host) in fleet.hosts().iter().enumerate() {
        let peers = pinned_hosts(host.bpf_dir());
        for h in report["per_host"].as_array().unwrap() {
            let ip: std::net::Ipv4Addr = h["underlay_ip"].as_str().unwrap().parse().unwrap();
            let name = h["name"].as_str().unwrap().to_owned();
            let peer = i == 0 && holding.contains(&&name);
            assert_eq!(
                peers.contains(&ip),
                peer,
                "{} and simulated host {name} ({ip})",
                host.name()
            );
        }
    }

    // Deleting an endpoint of a simulated host removes its entries there.
    let (owner, endpoint) = placed[0].clone();
    let removed_before = sim_host(&report, &owner)["maps"]["removed"].as_u64().unwrap();
    let r = fleet.api(2).delete(&format!("/v1/endpoints/{endpoint}"));
    assert_eq!(r.status, 204, "{}", r.body);
    let revision = r.revision().expect("a revision");
    assert!(fleet.wait_names_realized(0, &all, revision, WAIT), "{:?}", fleet.api(0).hosts());
    let after = sim_host(&sim.report(), &owner);
    assert!(after["maps"]["removed"].as_u64().unwrap() > removed_before, "{after}");
    assert!(after["map_entries"].as_u64().unwrap() < entries, "{after} after {first}");

    // The simulation stops: its hosts turn unhealthy once their leases lapse, and an edit is
    // then acknowledged without waiting for them.
    drop(sim);
    let unhealthy = wait_until(WAIT, || {
        let listed = api.hosts();
        names.iter().all(|n| listed.iter().any(|h| h["name"] == *n && h["healthy"] == false))
    });
    assert!(unhealthy, "the simulated hosts stay healthy after the simulation stopped");
    let started = Instant::now();
    api.add_rule(
        &web,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 81,
        "to_port": 81, "group": clients}),
    );
    assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
    drop(client);
}
