//! What the micro and control tiers build their model states from, written once: a seeded
//! generator, the pool of CIDR peers rules draw from, a TCP ingress rule, and a state of one
//! universe (10.0.0.0/8, and for IPv6 states [`CIDR6`]) whose groups and endpoints are made
//! through the model's own calls.
use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The IPv6 CIDR of a dual-stack bench universe: an IPv4 address `a.b.c.d` of a bench state has
/// its IPv6 twin `fd00:a::a.b.c.d` ([`v6`]), and an IPv4 CIDR its twin of 96 more bits
/// ([`v6_cidr`]), so that an IPv6 state has the same shape (the same prefixes nested alike)
/// as its IPv4 one.
pub const CIDR6: &str = "fd00:a::/64";

/// The IPv6 twin of an IPv4 address of a bench state (see [`CIDR6`]).
pub fn v6(ip: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::from((0xfd00_000a_u128 << 96) | u128::from(u32::from(ip)))
}

/// The IPv6 twin of an IPv4 CIDR of a bench state (see [`CIDR6`]): `0.0.0.0/0` is `::/0`, any
/// other `a.b.c.d/n` is `v6(a.b.c.d)/(96 + n)`.
pub fn v6_cidr(cidr: &str) -> Result<String> {
    let n: ipnetwork::Ipv4Network = cidr.parse()?;
    Ok(if n.prefix() == 0 { "::/0".into() } else { format!("{}/{}", v6(n.ip()), 96 + n.prefix()) })
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
        Scenario::with_ipv6(name, false)
    }

    /// A state with one universe named `name`, 10.0.0.0/8, and [`CIDR6`] if `ipv6`.
    pub fn with_ipv6(name: &str, ipv6: bool) -> Result<Scenario> {
        let mut st = State::default();
        let universe = st
            .create_universe(CreateUniverse {
                name: name.into(),
                cidr: Some("10.0.0.0/8".into()),
                cidrs: None,
                ipv6_cidrs: ipv6.then(|| vec![CIDR6.to_owned()]),
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
        self.endpoint6(name, ip, None, groups)
    }

    /// [`Scenario::endpoint`], with the IPv6 address `ipv6` if given.
    pub fn endpoint6(
        &mut self,
        name: &str,
        ip: String,
        ipv6: Option<Ipv6Addr>,
        groups: Vec<String>,
    ) -> Result<String> {
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
                    ipv6: ipv6.map(|a| a.to_string()),
                },
                HOST,
            )
            .map(|e| e.id)
            .map_err(|e| anyhow::anyhow!("create endpoint {name}: {e}"))
    }
}
