//! The desired state of Verse and every edit to it, as pure functions.
//!
//! Contract: an edit either succeeds whole (and bumps `State::revision`, S13) or returns an
//! [`Error`] naming the field at fault and leaves the state untouched. Nothing here does I/O; the
//! store persists a `State`, the API calls these functions, the compiler reads the result.
//! Semantics are those of `shared/product.md` (S1–S13); the numbers are cited where they apply.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde::{Deserialize, Serialize};

/// S12: at most this many groups on one endpoint.
pub const MAX_GROUPS_PER_ENDPOINT: usize = 16;
/// S12: at most this many rules (ingress + egress) in one group.
pub const MAX_RULES_PER_GROUP: usize = 1000;
/// Name of the group every universe has (S3).
pub const DEFAULT_GROUP: &str = "default";

/// What kind of failure an edit met; the API maps it to a status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the input is invalid; `field` names the culprit.
    Invalid,
    /// 404: an id that does not exist.
    NotFound,
    /// 409: a duplicate, a resource still in use, or a limit reached.
    Conflict,
}

/// A refused edit. `code` is a stable machine-readable string (`invalid_argument`, `not_found`,
/// `duplicate`, `in_use`, `limit_exceeded`, `protected`); `message` names the field and value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub code: &'static str,
    /// The request field at fault, where there is one (`cidr`, `security_groups[2]`, ...).
    pub field: Option<String>,
    pub message: String,
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        let field = field.into();
        Error {
            kind: ErrorKind::Invalid,
            code: "invalid_argument",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }
    pub fn not_found(what: &str, id: &str) -> Error {
        Error {
            kind: ErrorKind::NotFound,
            code: "not_found",
            field: None,
            message: format!("{what} {id} not found"),
        }
    }
    pub fn conflict(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Error {
        Error { kind: ErrorKind::Conflict, code, field: field.map(str::to_owned), message: message.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Universe {
    /// `uni-` followed by 8 hex digits.
    pub id: String,
    pub name: String,
    /// Canonical IPv4 CIDRs (S4 canonical form).
    pub cidrs: Vec<Ipv4Network>,
    /// 24-bit network id, unique in the fleet, carried in every encapsulated packet.
    pub vni: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// S4: `tcp`, `udp`, `icmp`, `icmpv6`, `all` or a number 0–255. Serialized as those strings
/// (a number as its decimal string); the API also accepts a JSON number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    All,
    /// An IP protocol number (6 = tcp, 17 = udp, 1 = icmp, 58 = icmpv6).
    Number(u8),
}

/// The one peer of a rule (S4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Canonical CIDR, v4 or v6 (v6 peers are stored and shown; the IPv4 dataplane never
    /// matches them).
    Cidr(IpNetwork),
    /// A security group id of the same universe (S5).
    Group(String),
}

/// A stored rule, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `sgr-` followed by 8 hex digits.
    pub id: String,
    pub direction: Direction,
    pub protocol: Protocol,
    /// TCP/UDP: inclusive port range. Absent for other protocols.
    pub ports: Option<(u16, u16)>,
    /// ICMP: type and code, `None` = any (-1 in the API).
    pub icmp: Option<(Option<u8>, Option<u8>)>,
    pub peer: Peer,
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    /// `sg-` followed by 8 hex digits.
    pub id: String,
    pub universe: String,
    pub name: String,
    pub description: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ep-` followed by 8 hex digits.
    pub id: String,
    pub universe: String,
    /// Name of the host the endpoint lives on.
    pub host: String,
    /// The `ip netns` namespace of the workload.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `02:xx:..`, locally administered, derived from the id.
    pub mac: String,
    /// Host-side veth name (15 bytes at most, `IFNAMSIZ`).
    pub interface: String,
    pub security_groups: Vec<String>,
    /// Security identity (not shown by the API): one per distinct (universe, set of groups).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub identity: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// One security identity: a distinct (universe, sorted set of groups).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub universe: String,
    pub groups: Vec<String>,
}

/// Everything an operator has asked for. Serializable as one document (the embedded store keeps
/// it as a JSON file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Bumped by every successful edit (S13).
    pub revision: u64,
    pub universes: BTreeMap<String, Universe>,
    pub groups: BTreeMap<String, SecurityGroup>,
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Identities in use, by number (1..=`dataplane_common::MAX_IDENTITY`). An identity is made
    /// when an endpoint first needs its set of groups and removed when no endpoint has it.
    pub identities: BTreeMap<u32, Identity>,
}

// ---- Requests: what the API accepts (deserialized with field paths for errors) ----

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUniverse {
    pub name: String,
    pub cidr: Option<String>,
    pub cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub universe: String,
    pub name: String,
    pub description: Option<String>,
}

/// `protocol` is a string (`tcp`, ..., `"6"`) or a number; ports and ICMP fields are numbers.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRule {
    pub direction: String,
    pub protocol: serde_json::Value,
    pub from_port: Option<i64>,
    pub to_port: Option<i64>,
    pub icmp_type: Option<i64>,
    pub icmp_code: Option<i64>,
    pub cidr: Option<String>,
    pub group: Option<String>,
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    pub universe: String,
    pub host: Option<String>,
    pub netns: String,
    pub ip: String,
    pub security_groups: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatchEndpoint {
    pub security_groups: Vec<String>,
}

// ---- Edits. Each validates everything first, then changes `self` and bumps the revision. ----

impl State {
    /// `POST /v1/universes`. Also creates the universe's `default` group (S3).
    pub fn create_universe(&mut self, req: CreateUniverse) -> Result<Universe> {
        let _ = req;
        todo!("model: create_universe")
    }
    /// `DELETE /v1/universes/{id}`: 409 while it has endpoints; removes its groups.
    pub fn delete_universe(&mut self, id: &str) -> Result<()> {
        let _ = id;
        todo!("model: delete_universe")
    }
    /// `POST /v1/security-groups`. A new group gets the S2 egress rules.
    pub fn create_group(&mut self, req: CreateGroup) -> Result<SecurityGroup> {
        let _ = req;
        todo!("model: create_group")
    }
    /// `DELETE /v1/security-groups/{id}`: 409 while in use, referenced, or `default` (S3).
    pub fn delete_group(&mut self, id: &str) -> Result<()> {
        let _ = id;
        todo!("model: delete_group")
    }
    /// `POST /v1/security-groups/{id}/rules`.
    pub fn add_rule(&mut self, group: &str, req: CreateRule) -> Result<Rule> {
        let _ = (group, req);
        todo!("model: add_rule")
    }
    /// `DELETE /v1/security-groups/{id}/rules/{rule_id}`.
    pub fn delete_rule(&mut self, group: &str, rule: &str) -> Result<()> {
        let _ = (group, rule);
        todo!("model: delete_rule")
    }
    /// `POST /v1/endpoints`; `default_host` is the host serving the request.
    pub fn create_endpoint(&mut self, req: CreateEndpoint, default_host: &str) -> Result<Endpoint> {
        let _ = (req, default_host);
        todo!("model: create_endpoint")
    }
    /// `PATCH /v1/endpoints/{id}`: a new set of groups (S5), hence maybe a new identity.
    pub fn patch_endpoint(&mut self, id: &str, req: PatchEndpoint) -> Result<Endpoint> {
        let _ = (id, req);
        todo!("model: patch_endpoint")
    }
    /// `DELETE /v1/endpoints/{id}`; returns what was removed (the caller removes the interface).
    pub fn delete_endpoint(&mut self, id: &str) -> Result<Endpoint> {
        let _ = id;
        todo!("model: delete_endpoint")
    }
}

// ---- Wire form of rules and protocols ----

impl Protocol {
    pub const TCP: Protocol = Protocol::Number(6);
    pub const UDP: Protocol = Protocol::Number(17);
    pub const ICMP: Protocol = Protocol::Number(1);
    pub const ICMPV6: Protocol = Protocol::Number(58);

    /// The name the API shows: `tcp`, `udp`, `icmp`, `icmpv6`, `all`, else the number.
    pub fn name(self) -> String {
        match self {
            Protocol::All => "all".into(),
            Protocol::Number(6) => "tcp".into(),
            Protocol::Number(17) => "udp".into(),
            Protocol::Number(1) => "icmp".into(),
            Protocol::Number(58) => "icmpv6".into(),
            Protocol::Number(n) => n.to_string(),
        }
    }
}

/// A rule as the API shows it (and as the store keeps it).
#[derive(Serialize, Deserialize)]
struct RuleJson {
    id: String,
    direction: Direction,
    protocol: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    from_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    to_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    icmp_type: Option<i16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    icmp_code: Option<i16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    cidr: Option<IpNetwork>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    group: Option<String>,
    description: String,
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let any = |v: Option<u8>| v.map_or(-1, i16::from);
        RuleJson {
            id: self.id.clone(),
            direction: self.direction,
            protocol: self.protocol.name(),
            from_port: self.ports.map(|p| p.0),
            to_port: self.ports.map(|p| p.1),
            icmp_type: self.icmp.map(|(t, _)| any(t)),
            icmp_code: self.icmp.map(|(_, c)| any(c)),
            cidr: match &self.peer {
                Peer::Cidr(c) => Some(*c),
                Peer::Group(_) => None,
            },
            group: match &self.peer {
                Peer::Group(g) => Some(g.clone()),
                Peer::Cidr(_) => None,
            },
            description: self.description.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let j = RuleJson::deserialize(d)?;
        let protocol = match j.protocol.as_str() {
            "all" => Protocol::All,
            "tcp" => Protocol::TCP,
            "udp" => Protocol::UDP,
            "icmp" => Protocol::ICMP,
            "icmpv6" => Protocol::ICMPV6,
            n => Protocol::Number(n.parse().map_err(D::Error::custom)?),
        };
        let opt = |v: Option<i16>| v.and_then(|v| u8::try_from(v).ok());
        let peer = match (j.cidr, j.group) {
            (Some(c), None) => Peer::Cidr(c),
            (None, Some(g)) => Peer::Group(g),
            _ => return Err(D::Error::custom("a rule has exactly one of cidr, group")),
        };
        Ok(Rule {
            id: j.id,
            direction: j.direction,
            protocol,
            ports: j.from_port.zip(j.to_port),
            icmp: if j.icmp_type.is_some() || j.icmp_code.is_some() {
                Some((opt(j.icmp_type), opt(j.icmp_code)))
            } else {
                None
            },
            peer,
            description: j.description,
        })
    }
}
