//! What the micro and control tiers build their model states from, written once: a seeded
//! generator, the pool of CIDR peers rules draw from, a TCP ingress rule, and a state of one
//! universe (10.0.0.0/8) whose groups and endpoints are made through the model's own calls.
use anyhow::Result;
use verse::model::{
    CreateEndpoint, CreateGroup, CreateUniverse, Direction, Peer, Protocol, Rule, State,
};

/// The host every endpoint of a bench state is placed on.
pub const HOST: &str = "bench";

/// SplitMix64: a small seeded generator, so that a state is the same in every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for picking among a few thousand.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The CIDR peers rules draw from, as `(/16s, /24s, /32s)`: four /16s of 10.0.0.0/8, sixteen
/// /24s in each, four /32s in each /24.
pub fn cidr_pool() -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut p16 = Vec::new();
    let mut p24 = Vec::new();
    let mut p32 = Vec::new();
    for a in 1..=4 {
        p16.push(format!("10.{a}.0.0/16"));
        for b in 0..16 {
            p24.push(format!("10.{a}.{b}.0/24"));
            for c in [10, 20, 30, 40] {
                p32.push(format!("10.{a}.{b}.{c}/32"));
            }
        }
    }
    (p16, p24, p32)
}

/// A TCP ingress rule admitting `peer` to ports `from..from + width`.
pub fn tcp_rule(id: String, from: u16, width: u16, peer: Peer) -> Rule {
    Rule {
        id,
        direction: Direction::Ingress,
        protocol: Protocol::TCP,
        ports: Some((from, from + width - 1)),
        icmp: None,
        peer,
        description: String::new(),
    }
}

/// A model state of one universe, being built.
pub struct Scenario {
    pub st: State,
    pub universe: String,
}

impl Scenario {
    /// A state with one universe named `name`, 10.0.0.0/8.
    pub fn new(name: &str) -> Result<Scenario> {
        let mut st = State::default();
        let universe = st
            .create_universe(CreateUniverse {
                name: name.into(),
                cidr: Some("10.0.0.0/8".into()),
                cidrs: None,
                ipv6_cidrs: None,
            })
            .map_err(|e| anyhow::anyhow!("create universe: {e}"))?
            .id;
        Ok(Scenario { st, universe })
    }

    /// A new group of the universe; its id.
    pub fn group(&mut self, name: String) -> Result<String> {
        let req = CreateGroup { universe: self.universe.clone(), name, description: None };
        self.st.create_group(req).map(|g| g.id).map_err(|e| anyhow::anyhow!("create group: {e}"))
    }

    /// A new endpoint of the universe on [`HOST`], in namespace `name`; its id.
    pub fn endpoint(&mut self, name: &str, ip: String, groups: Vec<String>) -> Result<String> {
        self.st
            .create_endpoint(
                CreateEndpoint {
                    universe: self.universe.clone(),
                    host: None,
                    netns: name.into(),
                    ip,
                    security_groups: Some(groups),
                    conntrack_budget: None,
                    flow_logs: None,
                    ipv6: None,
                },
                HOST,
            )
            .map(|e| e.id)
            .map_err(|e| anyhow::anyhow!("create endpoint {name}: {e}"))
    }
}
