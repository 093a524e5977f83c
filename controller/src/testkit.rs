//! Building desired states in unit tests through the model's own edits, so that every index
//! and counter is what the API would leave: one call per object, with the fields no test cares
//! about left to their defaults.

use crate::model::{self, CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, State};

/// Universe `name` of `cidr`.
pub(crate) fn universe(s: &mut State, name: &str, cidr: &str) -> model::Universe {
    let req = CreateUniverse {
        name: name.into(),
        cidr: Some(cidr.into()),
        cidrs: None,
        ipv6_cidrs: None,
    };
    s.create_universe(req).unwrap()
}

/// Security group `name` of `universe`.
pub(crate) fn group(s: &mut State, universe: &str, name: &str) -> model::SecurityGroup {
    let req = CreateGroup { universe: universe.into(), name: name.into(), description: None };
    s.create_group(req).unwrap()
}

/// A rule of `direction` (`ingress`, `egress`) for `protocol` on one `port`, peer `cidr`.
pub(crate) fn port_rule(direction: &str, protocol: &str, port: u16, cidr: &str) -> CreateRule {
    CreateRule {
        direction: direction.into(),
        protocol: serde_json::json!(protocol),
        from_port: Some(i64::from(port)),
        to_port: Some(i64::from(port)),
        cidr: Some(cidr.into()),
        ..Default::default()
    }
}

/// The request for an endpoint at `ip` of `universe` on `host`, in namespace `ns-{ip}`, in
/// `groups` (none: the universe's default group).
pub(crate) fn endpoint_req(
    universe: &str,
    host: &str,
    ip: &str,
    groups: &[&str],
) -> CreateEndpoint {
    CreateEndpoint {
        universe: universe.into(),
        host: Some(host.into()),
        netns: format!("ns-{ip}"),
        ip: ip.into(),
        security_groups: (!groups.is_empty())
            .then(|| groups.iter().map(|g| g.to_string()).collect()),
        conntrack_budget: None,
        flow_logs: None,
        ipv6: None,
    }
}

/// The endpoint of [`endpoint_req`], created.
pub(crate) fn endpoint(
    s: &mut State,
    universe: &str,
    host: &str,
    ip: &str,
    groups: &[&str],
) -> model::Endpoint {
    s.create_endpoint(endpoint_req(universe, host, ip, groups), host).unwrap()
}
