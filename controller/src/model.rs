//! The desired state of Verse and every edit to it, as pure functions.
//!
//! Contract: an edit either succeeds whole (and bumps `State::revision`, S13) or returns an
//! [`Error`] naming the field at fault and leaves the state untouched. Nothing here does I/O; the
//! store persists a `State`, the API calls these functions, the compiler reads the result.
//! Semantics are those of the README ("Concepts", S1–S13); the numbers are cited where they
//! apply.
//!
//! Errors: 400 `invalid_argument` names the request field (`cidr`, `cidrs[1]`, `from_port`,
//! `security_groups[3]`, ...). An id in the path that does not exist is a 404 without a field; an
//! id in the body that does not exist (`universe`, `group`, `security_groups[i]`) is a 404 that
//! names its field, and so is one of another universe. Conflicts are 409:
//! `duplicate`, `in_use`, `protected` (the `default` group, S3) and `limit_exceeded` (S12).
//!
//! Ids are a prefix (`uni-`, `sg-`, `sgr-`, `ep-`) and 8 random lowercase hex digits. An endpoint's
//! MAC (`02:00:` and those 4 bytes) and host-side interface (`vx` and those 8 digits) derive from
//! its id, so they are unique too. Identities are the smallest free numbers from 1.
//!
//! What must never be reused is never reused (S7): VNIs are handed out in increasing order, each
//! once ([`State::vnis_issued`]), so no state of a deleted universe can ever match a universe made
//! later; endpoints get a serial number the same way ([`State::serials_issued`]), which the
//! dataplane binds every tracked flow to. Both counters are part of the desired state and
//! persisted with it.
//!
//! Conntrack budgets (S14): every endpoint has one (`conntrack_budget`, by default
//! [`DEFAULT_CONNTRACK_BUDGET`]), and the budgets of the endpoints placed on one host add up to
//! at most the capacity of its conntrack map (`dataplane_common::capacity::CONNTRACK`): an
//! endpoint that would not fit is refused with a 409, never over-committed, so no endpoint can
//! ever find the map full because of another. Each endpoint of a host also has a *slot* there
//! (1 to `capacity::ENDPOINTS`), the index of its budget counters in the dataplane.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use dataplane_common::wire;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

pub use crate::table::Table;

/// S12: at most this many groups on one endpoint.
pub const MAX_GROUPS_PER_ENDPOINT: usize = 16;
/// S12: at most this many rules (ingress + egress) in one group.
pub const MAX_RULES_PER_GROUP: usize = 1000;
/// Name of the group every universe has (S3).
pub const DEFAULT_GROUP: &str = "default";
/// Conntrack budget of an endpoint created without one (S14); the daemon's setting
/// `conntrack.endpoint_budget` defaults to it. 64 endpoints at this budget fill a host.
pub const DEFAULT_CONNTRACK_BUDGET: u32 = 4096;

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
    /// 403: the principal sees the object but its role does not allow the edit (S15).
    Forbidden,
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
    pub fn forbidden(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Forbidden,
            code: "forbidden",
            field: None,
            message: message.into(),
        }
    }
    pub fn conflict(code: &'static str, field: Option<&str>, message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Conflict,
            code,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Universe {
    /// `uni-` followed by 8 hex digits.
    pub id: String,
    pub name: String,
    /// Canonical IPv4 CIDRs (S4 canonical form).
    #[serde(serialize_with = "serialize_cidrs")]
    pub cidrs: Vec<Ipv4Network>,
    /// Canonical IPv6 CIDRs, /44 to /64, pairwise disjoint; none for an IPv4-only universe.
    #[serde(default, skip_serializing_if = "Vec::is_empty", serialize_with = "serialize_cidrs")]
    pub ipv6_cidrs: Vec<Ipv6Network>,
    /// 24-bit network id, unique in the fleet, carried in every encapsulated packet.
    pub vni: u32,
}

/// CIDRs as strings, each formatted into one reused buffer. A universe may have tens of
/// thousands, and the state is written whole at every edit, under the store's lock: this is
/// several times cheaper than formatting each through serde's `collect_str`.
fn serialize_cidrs<S: serde::Serializer, C: std::fmt::Display>(
    cidrs: &[C],
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    use std::fmt::Write;
    let mut seq = serializer.serialize_seq(Some(cidrs.len()))?;
    let mut text = String::with_capacity(43);
    for c in cidrs {
        text.clear();
        // Writing to a String cannot fail.
        // `address/prefix`, as ipnetwork displays a network.
        let _ = write!(text, "{c}");
        seq.serialize_element(text.as_str())?;
    }
    seq.end()
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
    /// Its IPv6 address, if it has one (a dual-stack endpoint): within one of its universe's
    /// `ipv6_cidrs`, unique in the universe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// `02:xx:..`, locally administered, derived from the id.
    pub mac: String,
    /// Host-side veth name (15 bytes at most, `IFNAMSIZ`).
    pub interface: String,
    pub security_groups: Vec<String>,
    /// Security identity (not shown by the API): one per distinct (universe, set of groups).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub identity: u32,
    /// Flows the endpoint may have tracked at once on its host (S14).
    #[serde(default)]
    pub conntrack_budget: u32,
    /// Serial number (not shown by the API): unique in the fleet, never reused (S7).
    #[serde(default)]
    pub serial: u64,
    /// Slot on its host (not shown by the API): the index of its budget counters there.
    #[serde(default)]
    pub slot: u32,
    /// Its host writes flow logs of its traffic (README, "Why was my packet dropped?").
    #[serde(default)]
    pub flow_logs: bool,
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
    pub universes: Table<String, Universe>,
    pub groups: Table<String, SecurityGroup>,
    pub endpoints: Table<String, Endpoint>,
    /// Identities in use, by number (1..=`dataplane_common::MAX_IDENTITY`). An identity is made
    /// when an endpoint first needs its set of groups and removed when no endpoint has it.
    pub identities: Table<u32, Identity>,
    /// Hosts of the fleet, by name. A `versed` registers its own host at start; endpoints of
    /// other hosts are reached through their `underlay_ip`.
    #[serde(default)]
    pub hosts: Table<String, HostRecord>,
    /// API tokens, by id (S15): what every host of the fleet checks a bearer token against.
    #[serde(default)]
    pub tokens: Table<String, Token>,
    /// The last VNI handed out; the next universe gets a larger one (VNIs are never reused).
    #[serde(default)]
    pub vnis_issued: u32,
    /// The last endpoint serial handed out; the next endpoint gets a larger one.
    #[serde(default)]
    pub serials_issued: u64,
    /// Derived lookups and counts (`crate::index`), never stored.
    #[serde(skip)]
    pub(crate) idx: crate::index::Index,
    /// What part of the fleet's desired state this copy holds, when its store follows only what
    /// one host needs (`EtcdOptions::scope`, a host that answers no API): each key range it
    /// follows (`hosts/`, `placement/<host>/`, `u/<universe>/`) with the etcd revision up to
    /// which it holds every change of that range. `None`: the whole desired state. Never stored;
    /// the host reports it with its realized revision (`crate::store::Realized`).
    #[serde(skip)]
    pub followed: Option<std::sync::Arc<std::collections::BTreeMap<String, u64>>>,
}

impl State {
    /// Whether an edit changed anything since the journals were last cleared (see
    /// [`crate::table`]).
    pub fn is_changed(&self) -> bool {
        self.universes.is_changed()
            || self.groups.is_changed()
            || self.endpoints.is_changed()
            || self.identities.is_changed()
            || self.hosts.is_changed()
            || self.tokens.is_changed()
    }

    /// Forgets the journals: what follows is the next edit.
    pub fn clear_changes(&mut self) {
        self.universes.clear_changes();
        self.groups.clear_changes();
        self.endpoints.clear_changes();
        self.identities.clear_changes();
        self.hosts.clear_changes();
        self.tokens.clear_changes();
    }
}

/// A host as the desired state knows it (liveness and realized revision are reported apart).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// Address on the underlay network; `None` for a host without one (single-host setups).
    pub underlay_ip: Option<Ipv4Addr>,
    /// Where the other hosts reach this host's API (`http://ADDR:PORT`), to relay its events,
    /// flow logs and counters; `None` if they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The SHA-256 of the certificate its API serves (`SHA256:AB:…`), when it serves TLS:
    /// another host relays a caller's token to `api` only over TLS with exactly this
    /// certificate (see `relay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_fingerprint: Option<String>,
}

impl HostRecord {
    /// Host `name` at `underlay_ip`, whose API the other hosts do not reach: the record tests,
    /// simulations and benchmarks place endpoints on (a running host registers itself, with its
    /// API, through the store).
    pub fn at(name: &str, underlay_ip: Option<Ipv4Addr>) -> HostRecord {
        HostRecord { name: name.into(), underlay_ip, api: None, api_fingerprint: None }
    }
}

/// A point in time, stored and shown in RFC 3339, UTC (`2026-12-01T10:00:00Z`, with as many
/// fractional digits as it has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now())
    }
    /// Parses RFC 3339 in UTC (`...Z`).
    pub fn parse(text: &str) -> Option<Timestamp> {
        humantime::parse_rfc3339(text.trim()).ok().map(Timestamp)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_rfc3339(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time in UTC"))
        })
    }
}

/// What a token may do (S15). The access rules themselves are in `crate::auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: universes, groups, rules, endpoints, hosts, tokens, the whole audit trail.
    Admin,
    /// Groups, rules and endpoints of one universe; reads that universe.
    Editor,
    /// Reads one universe; without a universe, reads the whole fleet (and `/metrics`).
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Editor => "editor",
            Role::Viewer => "viewer",
        }
    }
}

/// An API token as the store keeps it (and, without `hash`, as the API shows it): never the
/// secret, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// `tok-` followed by 8 hex digits; the secret starts with `vt_` and the same digits.
    pub id: String,
    pub role: Role,
    /// The universe an editor or viewer is confined to; `None` for an admin (and for a
    /// fleet-wide viewer).
    pub universe: Option<String>,
    pub description: String,
    pub created: Timestamp,
    /// After this the token is refused (401); `None`: never expires.
    pub expires: Option<Timestamp>,
    /// Lowercase hex SHA-256 of the whole secret.
    pub hash: String,
}

impl Token {
    /// Whether the token has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e.0 <= now)
    }
}

// ---- Requests: what the API accepts (deserialized with field paths for errors) ----

/// An optional request field that, when present, must hold a value: `null` is refused like any
/// other wrong type (the OpenAPI document does not declare these fields nullable). Used with
/// `#[serde(default)]`, so an absent field is `None`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUniverse {
    pub name: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<String>>,
    /// IPv6 CIDRs beside the IPv4 ones (a dual-stack universe); absent: IPv4 only.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub ipv6_cidrs: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub universe: String,
    pub name: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `protocol` is a string (`tcp`, ..., `"6"`) or a number; ports and ICMP fields are numbers.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRule {
    pub direction: String,
    pub protocol: serde_json::Value,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i64>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i64>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i64>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<i64>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    pub universe: String,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub netns: String,
    pub ip: String,
    /// An IPv6 address as well (a dual-stack endpoint); absent: IPv4 only.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<Vec<String>>,
    /// S14; absent: [`DEFAULT_CONNTRACK_BUDGET`] (the API fills in the daemon's setting).
    pub conntrack_budget: Option<i64>,
    /// Flow logs of its traffic; absent: off.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub flow_logs: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatchEndpoint {
    /// Replaces its security groups (S5); absent: kept.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<Vec<String>>,
    /// Turns its flow logs on or off; absent: kept.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub flow_logs: Option<bool>,
}

impl CreateEndpoint {
    /// The request that makes `ep` again, in `security_groups`, after it was deleted: same
    /// universe, host, namespace, address, conntrack budget and flow logs; the endpoint it
    /// creates is a new one (new id and serial, S7).
    pub fn again(ep: &Endpoint, security_groups: Vec<String>) -> CreateEndpoint {
        CreateEndpoint {
            universe: ep.universe.clone(),
            host: Some(ep.host.clone()),
            netns: ep.netns.clone(),
            ip: ep.ip.to_string(),
            ipv6: ep.ipv6.map(|a| a.to_string()),
            security_groups: Some(security_groups),
            conntrack_budget: Some(i64::from(ep.conntrack_budget)),
            flow_logs: Some(ep.flow_logs),
        }
    }
}

impl PatchEndpoint {
    /// A patch that replaces the security groups only.
    pub fn groups(security_groups: Vec<String>) -> PatchEndpoint {
        PatchEndpoint { security_groups: Some(security_groups), flow_logs: None }
    }
}

/// `POST /v1/tokens`. `expires` is an RFC 3339 time in UTC (`2027-01-01T00:00:00Z`) or a
/// lifetime from now (`90d`, `12h`, `30m`, `1h 30m`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub role: Role,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the caller of [`State::create_token`] decided outside the edit (which may run more
/// than once): the token's id, the hash of its secret, and the time of the request.
#[derive(Clone, Debug)]
pub struct TokenSecret {
    pub id: String,
    pub hash: String,
    pub now: SystemTime,
}

/// A universe request checked on its own, by [`CreateUniverse::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewUniverse {
    pub name: String,
    /// Canonical, pairwise disjoint, in the order given.
    pub cidrs: Vec<Ipv4Network>,
    /// Likewise, IPv6.
    pub ipv6_cidrs: Vec<Ipv6Network>,
}

impl CreateUniverse {
    /// Everything about the request that does not depend on the state: the name and the CIDRs
    /// (IPv4, /8 to /30, and IPv6, /44 to /64; canonical, pairwise disjoint), in O(n log n) of
    /// the number of CIDRs. The API runs it before taking the store's lock, so a large request
    /// delays no other edit.
    pub fn check(&self) -> Result<NewUniverse> {
        let name = check_name("name", &self.name)?;
        let cidrs = universe_cidrs(self)?;
        let ipv6_cidrs = universe_ipv6_cidrs(self.ipv6_cidrs.as_deref())?;
        Ok(NewUniverse { name, cidrs, ipv6_cidrs })
    }
}

impl CreateRule {
    /// Everything about the rule that does not depend on the state (all but whether a peer
    /// group exists, and in which universe): a [`Rule`] with an empty id. The API runs it before
    /// taking the store's lock; [`State::insert_rule`] does the rest.
    pub fn check(&self) -> Result<Rule> {
        let direction = match self.direction.to_ascii_lowercase().as_str() {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            other => {
                return Err(Error::invalid(
                    "direction",
                    format!("{other:?} is not ingress or egress"),
                ))
            }
        };
        let protocol = parse_protocol(&self.protocol)?;
        let (ports, icmp) = rule_match(protocol, self)?;
        let peer = match (&self.cidr, &self.group) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("cidr", "give either cidr or group, not both"))
            }
            (None, None) => {
                return Err(Error::invalid("cidr", "a rule needs a peer: cidr or group"))
            }
            (Some(cidr), None) => Peer::Cidr(parse_cidr("cidr", cidr)?),
            (None, Some(peer)) => Peer::Group(peer.clone()),
        };
        let description = check_description(self.description.as_deref())?;
        Ok(Rule { id: String::new(), direction, protocol, ports, icmp, peer, description })
    }
}

// ---- Edits. Each validates everything first, then changes `self` and bumps the revision. ----

impl State {
    /// `POST /v1/universes`. Also creates the universe's `default` group (S3).
    pub fn create_universe(&mut self, req: CreateUniverse) -> Result<Universe> {
        self.add_universe(req.check()?)
    }

    /// [`State::create_universe`] for a request already checked on its own (the API checks it
    /// before it takes the store's lock): only what depends on the state is checked here.
    pub fn add_universe(&mut self, new: NewUniverse) -> Result<Universe> {
        self.reindex();
        let NewUniverse { name, cidrs, ipv6_cidrs } = new;
        if self.idx.universe_names.contains_key(&name) {
            return Err(Error::conflict(
                "duplicate",
                Some("name"),
                format!("name: a universe named {name:?} already exists"),
            ));
        }
        let vni = self.next_vni().ok_or_else(|| {
            Error::conflict(
                "limit_exceeded",
                None,
                format!("all {MAX_VNI} VNIs have been handed out (a VNI is never reused)"),
            )
        })?;

        let id = fresh_id("uni", |id| self.universes.contains_key(id));
        let group_id = fresh_id("sg", |id| self.groups.contains_key(id));
        let mut rule_ids = Vec::new();
        for _ in 0..3 {
            let rid =
                fresh_id("sgr", |id| self.rule_id_taken(id) || rule_ids.iter().any(|r| r == id));
            rule_ids.push(rid);
        }
        let [r_in, r_out4, r_out6]: [String; 3] =
            rule_ids.try_into().expect("three rule ids were made just above");
        // S3: members of `default` talk freely to each other; everything may go out.
        let default = SecurityGroup {
            id: group_id.clone(),
            universe: id.clone(),
            name: DEFAULT_GROUP.to_owned(),
            description: "default security group".to_owned(),
            ingress: vec![allow_all(r_in, Direction::Ingress, Peer::Group(group_id.clone()))],
            egress: default_egress(r_out4, r_out6),
        };
        let universe = Universe { id: id.clone(), name, cidrs, ipv6_cidrs, vni };
        self.vnis_issued = vni;
        self.universes.insert(id, universe.clone());
        self.groups.insert(group_id, default);
        self.revision += 1;
        Ok(universe)
    }

    /// `DELETE /v1/universes/{id}`: 409 while it has endpoints; removes its groups.
    pub fn delete_universe(&mut self, id: &str) -> Result<()> {
        self.reindex();
        if !self.universes.contains_key(id) {
            return Err(Error::not_found("universe", id));
        }
        let endpoints = self.idx.universe_endpoints.get(id).map_or(0, |e| e.len());
        if endpoints > 0 {
            return Err(Error::conflict(
                "in_use",
                None,
                format!("universe {id} still has {endpoints} endpoint(s); delete them first"),
            ));
        }
        self.universes.remove(id);
        for g in self.idx.universe_groups.get(id).cloned().unwrap_or_default() {
            self.groups.remove(&g);
        }
        // Tokens confined to it would outlive it, and a later universe that drew the same id
        // would inherit them: they go with it.
        self.tokens.retain(|_, t| t.universe.as_deref() != Some(id));
        // No endpoint of the universe is left, so neither is any identity of it; this only
        // repairs a state that was inconsistent.
        for n in self.idx.universe_identities.get(id).cloned().unwrap_or_default() {
            self.identities.remove(&n);
        }
        self.revision += 1;
        Ok(())
    }

    /// `POST /v1/security-groups`. A new group gets the S2 egress rules.
    pub fn create_group(&mut self, req: CreateGroup) -> Result<SecurityGroup> {
        self.reindex();
        if !self.universes.contains_key(&req.universe) {
            return Err(missing("universe", "universe", &req.universe));
        }
        let name = check_name("name", &req.name)?;
        let description = check_description(req.description.as_deref())?;
        if self.idx.group_names.contains_key(&(req.universe.clone(), name.clone())) {
            return Err(Error::conflict(
                "duplicate",
                Some("name"),
                format!(
                    "name: universe {} already has a security group named {name:?}",
                    req.universe
                ),
            ));
        }
        let id = fresh_id("sg", |id| self.groups.contains_key(id));
        let r4 = fresh_id("sgr", |id| self.rule_id_taken(id));
        let r6 = fresh_id("sgr", |id| self.rule_id_taken(id) || id == r4);
        let group = SecurityGroup {
            id: id.clone(),
            universe: req.universe,
            name,
            description,
            ingress: Vec::new(),
            egress: default_egress(r4, r6),
        };
        self.groups.insert(id, group.clone());
        self.revision += 1;
        Ok(group)
    }

    /// `DELETE /v1/security-groups/{id}`: 409 while in use, referenced, or `default` (S3).
    pub fn delete_group(&mut self, id: &str) -> Result<()> {
        self.reindex();
        let group = self.groups.get(id).ok_or_else(|| Error::not_found("security group", id))?;
        if group.name == DEFAULT_GROUP {
            return Err(Error::conflict(
                "protected",
                None,
                format!(
                    "security group {id} is the default group of universe {} (S3)",
                    group.universe
                ),
            ));
        }
        let user = self.idx.group_identities.get(id).and_then(|ids| {
            ids.iter().find_map(|n| self.idx.identity_endpoints.get(n)?.iter().next().cloned())
        });
        if let Some(ep) = user {
            return Err(Error::conflict(
                "in_use",
                None,
                format!("security group {id} is used by endpoint {ep}"),
            ));
        }
        let referrer = self
            .idx
            .group_referrers
            .get(id)
            .and_then(|r| r.keys().find(|g| g.as_str() != id).and_then(|g| self.groups.get(g)));
        if let Some(referrer) = referrer {
            return Err(Error::conflict(
                "in_use",
                None,
                format!(
                    "security group {id} is the peer of a rule of security group {}",
                    referrer.id
                ),
            ));
        }
        self.groups.remove(id);
        self.revision += 1;
        Ok(())
    }

    /// `POST /v1/security-groups/{id}/rules`.
    pub fn add_rule(&mut self, group: &str, req: CreateRule) -> Result<Rule> {
        if !self.groups.contains_key(group) {
            return Err(Error::not_found("security group", group));
        }
        self.insert_rule(group, req.check()?)
    }

    /// [`State::add_rule`] for a rule already checked on its own ([`CreateRule::check`]): the
    /// peer group, the duplicate check (S4) and the limit (S12) are checked here.
    pub fn insert_rule(&mut self, group: &str, mut rule: Rule) -> Result<Rule> {
        self.reindex();
        let sg = self.groups.get(group).ok_or_else(|| Error::not_found("security group", group))?;
        if let Peer::Group(peer) = &rule.peer {
            let other =
                self.groups.get(peer).ok_or_else(|| missing("group", "security group", peer))?;
            if other.universe != sg.universe {
                return Err(elsewhere("group", peer, &sg.universe));
            }
        }
        let same = |r: &&Rule| {
            r.protocol == rule.protocol
                && r.ports == rule.ports
                && r.icmp == rule.icmp
                && r.peer == rule.peer
        };
        let list = match rule.direction {
            Direction::Ingress => &sg.ingress,
            Direction::Egress => &sg.egress,
        };
        if let Some(existing) = list.iter().find(same) {
            return Err(Error::conflict(
                "duplicate",
                None,
                format!("security group {group} already has this rule as {}", existing.id),
            ));
        }
        let count = sg.ingress.len() + sg.egress.len();
        if count >= MAX_RULES_PER_GROUP {
            return Err(Error::conflict(
                "limit_exceeded",
                None,
                format!("security group {group} already has {count} rules, the most a group may have (S12)"),
            ));
        }
        rule.id = fresh_id("sgr", |id| self.rule_id_taken(id));
        let sg =
            self.groups.get_mut(group).expect("the group was found above and nothing removed it");
        match rule.direction {
            Direction::Ingress => insert_by_id(&mut sg.ingress, rule.clone()),
            Direction::Egress => insert_by_id(&mut sg.egress, rule.clone()),
        }
        self.revision += 1;
        Ok(rule)
    }

    /// `DELETE /v1/security-groups/{id}/rules/{rule_id}`.
    pub fn delete_rule(&mut self, group: &str, rule: &str) -> Result<()> {
        let sg =
            self.groups.get_mut(group).ok_or_else(|| Error::not_found("security group", group))?;
        let before = sg.ingress.len() + sg.egress.len();
        sg.ingress.retain(|r| r.id != rule);
        sg.egress.retain(|r| r.id != rule);
        if sg.ingress.len() + sg.egress.len() == before {
            return Err(Error::not_found("rule", &format!("{rule} of security group {group}")));
        }
        self.revision += 1;
        Ok(())
    }

    /// `POST /v1/endpoints`; `default_host` is the host serving the request.
    pub fn create_endpoint(&mut self, req: CreateEndpoint, default_host: &str) -> Result<Endpoint> {
        self.reindex();
        let universe = self
            .universes
            .get(&req.universe)
            .ok_or_else(|| missing("universe", "universe", &req.universe))?;
        let host = match &req.host {
            Some(h) => check_host(h)?,
            None => default_host.to_owned(),
        };
        let netns = check_netns(&req.netns)?;
        let ip = endpoint_ip(universe, &req.ip)?;
        let ipv6 = req.ipv6.as_deref().map(|text| endpoint_ipv6(universe, text)).transpose()?;
        let groups = self.endpoint_groups(&universe.id, req.security_groups.as_deref())?;
        if let Some(other) = self
            .idx
            .endpoint_ips
            .get(&(universe.id.clone(), ip))
            .and_then(|id| self.endpoints.get(id))
        {
            return Err(Error::conflict(
                "duplicate",
                Some("ip"),
                format!(
                    "ip: {ip} is already the address of endpoint {} in universe {}",
                    other.id, universe.id
                ),
            ));
        }
        if let Some(other) = ipv6
            .and_then(|a| self.idx.endpoint_ips6.get(&(universe.id.clone(), a)))
            .and_then(|id| self.endpoints.get(id))
        {
            return Err(Error::conflict(
                "duplicate",
                Some("ipv6"),
                format!(
                    "ipv6: {} is already the address of endpoint {} in universe {}",
                    ipv6.unwrap_or(Ipv6Addr::UNSPECIFIED),
                    other.id,
                    universe.id
                ),
            ));
        }
        if self.idx.endpoint_netns.contains_key(&(host.clone(), netns.clone())) {
            return Err(Error::conflict(
                "duplicate",
                Some("netns"),
                // No id: the endpoint there may belong to a universe the caller cannot see.
                format!("netns: namespace {netns:?} on host {host} already holds an endpoint"),
            ));
        }
        let budget = self.conntrack_budget(&host, req.conntrack_budget)?;
        let slot = self.free_slot(&host)?;
        let serial = self.next_serial()?;
        let (number, identity) = self.identity_for(&universe.id, &groups)?;

        let n = fresh_number(|n| self.endpoints.contains_key(&endpoint_id(n)));
        let [a, b, c, d] = n.to_be_bytes();
        let endpoint = Endpoint {
            id: endpoint_id(n),
            universe: universe.id.clone(),
            host,
            netns,
            ip,
            ipv6,
            mac: format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
            interface: format!("vx{n:08x}"),
            security_groups: groups,
            identity: number,
            conntrack_budget: budget,
            serial,
            slot,
            flow_logs: req.flow_logs.unwrap_or(false),
        };
        self.serials_issued = serial;
        self.identities.insert(number, identity);
        self.endpoints.insert(endpoint.id.clone(), endpoint.clone());
        self.revision += 1;
        Ok(endpoint)
    }

    /// `PATCH /v1/endpoints/{id}`: a new set of groups (S5), hence maybe a new identity.
    pub fn patch_endpoint(&mut self, id: &str, req: PatchEndpoint) -> Result<Endpoint> {
        self.reindex();
        let ep = self.endpoints.get(id).ok_or_else(|| Error::not_found("endpoint", id))?;
        if req.security_groups.is_none() && req.flow_logs.is_none() {
            return Err(Error::invalid(
                "security_groups",
                "a patch of an endpoint gives security_groups, flow_logs or both",
            ));
        }
        if let Some(groups) = &req.security_groups {
            let groups = self.endpoint_groups(&ep.universe, Some(groups))?;
            let (number, identity) = self.identity_for(&ep.universe, &groups)?;
            self.identities.insert(number, identity);
            let ep = self
                .endpoints
                .get_mut(id)
                .expect("the endpoint was found above and nothing removed it");
            let old = ep.identity;
            ep.security_groups = groups;
            ep.identity = number;
            self.collect_identity(old);
        }
        let ep = self
            .endpoints
            .get_mut(id)
            .expect("the endpoint was found above and nothing removed it");
        if let Some(on) = req.flow_logs {
            ep.flow_logs = on;
        }
        let ep = ep.clone();
        self.revision += 1;
        Ok(ep)
    }

    /// `DELETE /v1/endpoints/{id}`; returns what was removed (the caller removes the interface).
    pub fn delete_endpoint(&mut self, id: &str) -> Result<Endpoint> {
        self.reindex();
        let ep = self.endpoints.remove(id).ok_or_else(|| Error::not_found("endpoint", id))?;
        self.collect_identity(ep.identity);
        self.revision += 1;
        Ok(ep)
    }

    /// `POST /v1/tokens` (S15): an admin is fleet-wide; an editor names its universe; a viewer
    /// names one or, without one, reads the whole fleet.
    pub fn create_token(&mut self, req: CreateToken, secret: &TokenSecret) -> Result<Token> {
        match (req.role, &req.universe) {
            (Role::Admin, Some(_)) => {
                return Err(Error::invalid(
                    "universe",
                    "an admin token is not confined to a universe: leave universe out",
                ))
            }
            (Role::Editor, None) => {
                return Err(Error::invalid("universe", "an editor token needs a universe"))
            }
            (_, Some(u)) if !self.universes.contains_key(u) => {
                return Err(missing("universe", "universe", u))
            }
            _ => {}
        }
        let expires = match req.expires.as_deref() {
            None => None,
            Some(text) => Some(token_expiry(text, secret.now)?),
        };
        let description = check_description(req.description.as_deref())?;
        if self.tokens.contains_key(&secret.id) {
            return Err(Error::conflict(
                "duplicate",
                None,
                format!("token id {} is taken; ask again", secret.id),
            ));
        }
        let token = Token {
            id: secret.id.clone(),
            role: req.role,
            universe: req.universe,
            description,
            created: Timestamp(secret.now),
            expires,
            hash: secret.hash.clone(),
        };
        self.tokens.insert(token.id.clone(), token.clone());
        self.revision += 1;
        Ok(token)
    }

    /// `DELETE /v1/tokens/{id}`: the token is refused from the revision this produces on.
    pub fn delete_token(&mut self, id: &str) -> Result<Token> {
        let token = self.tokens.remove(id).ok_or_else(|| Error::not_found("token", id))?;
        self.revision += 1;
        Ok(token)
    }
}

/// The longest a token may live: a typo (`90y`) should not mint a token for ever.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// `expires` of a token request: an RFC 3339 time in UTC, or a lifetime from `now` (see
/// [`parse_time`]); in the future, at most [`MAX_TOKEN_LIFETIME`] away.
fn token_expiry(text: &str, now: SystemTime) -> Result<Timestamp> {
    let at = match parse_time(text).ok_or_else(|| Error::invalid("expires", time_syntax(text)))? {
        Time::At(at) => at,
        Time::Span(lifetime) => {
            now.checked_add(lifetime).ok_or_else(|| Error::invalid("expires", "too far away"))?
        }
    };
    match at.duration_since(now) {
        Err(_) | Ok(Duration::ZERO) => {
            Err(Error::invalid("expires", format!("{text:?} is not in the future")))
        }
        Ok(d) if d > MAX_TOKEN_LIFETIME => {
            Err(Error::invalid("expires", format!("{text:?} is more than 10 years away")))
        }
        Ok(_) => Ok(Timestamp(at)),
    }
}

/// A time in a request ([`parse_time`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    /// A point in time.
    At(SystemTime),
    /// A span of time, from now (a token's lifetime) or back from now (`since`).
    Span(Duration),
}

/// Seconds of each unit of a span.
const SPAN_UNITS: [(u8, u64); 6] =
    [(b's', 1), (b'm', 60), (b'h', 3600), (b'd', 86_400), (b'w', 7 * 86_400), (b'y', 365 * 86_400)];

/// Parses a time as requests give one (`expires` of a token, `since` of the audit trail),
/// exactly one of:
/// - RFC 3339 in UTC, `YYYY-MM-DDTHH:MM:SSZ`, maybe with 1 to 9 digits of a second
///   (`2027-01-01T00:00:00Z`), a real date from 1970 on;
/// - a span: whole numbers (0, or 1 to 9 digits without a leading 0) each with a unit, `s`, `m`,
///   `h`, `d`, `w` or `y` (365 days), separated by single spaces (`90d`, `1h 30m`).
///
/// Nothing else, not even surrounding spaces: the OpenAPI document states the same language as
/// a pattern.
pub fn parse_time(text: &str) -> Option<Time> {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let rfc3339 = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && match &b[19..] {
            [b'Z'] => true,
            [b'.', frac @ .., b'Z'] => {
                (1..=9).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit)
            }
            _ => false,
        };
    if rfc3339 {
        return humantime::parse_rfc3339(text).ok().map(Time::At);
    }
    let mut total: u64 = 0;
    for part in text.split(' ') {
        // The unit is the last byte; a part ending in a longer character is no span (and must
        // not be split inside that character).
        let at = part.len().checked_sub(1)?;
        if !part.is_char_boundary(at) {
            return None;
        }
        let (number, unit) = part.split_at(at);
        let seconds = SPAN_UNITS.iter().find(|(u, _)| unit.as_bytes() == [*u])?.1;
        let well_formed = number == "0"
            || (1..=9).contains(&number.len())
                && !number.starts_with('0')
                && number.bytes().all(|c| c.is_ascii_digit());
        if !well_formed {
            return None;
        }
        let n: u64 = number.parse().ok()?;
        total = total.saturating_add(n.saturating_mul(seconds));
    }
    Some(Time::Span(Duration::from_secs(total)))
}

/// The message of a time [`parse_time`] refuses.
pub fn time_syntax(text: &str) -> String {
    format!(
        "{text:?} is neither an RFC 3339 time in UTC (2027-01-01T00:00:00Z) nor a span of whole \
         units s, m, h, d, w, y separated by single spaces (90d, 12h, 1h 30m)"
    )
}

// ---- Helpers of the edits ----

/// VNIs are 24 bits (the VXLAN network identifier, RFC 7348 section 5); a conntrack key has room
/// for no more.
pub use dataplane_common::MAX_VNI;
/// Universe CIDRs: wide enough to be useful, narrow enough to leave two hosts after the
/// network, gateway and broadcast addresses.
const UNIVERSE_PREFIX_MIN: u8 = 8;
const UNIVERSE_PREFIX_MAX: u8 = 30;
/// Names and descriptions, as long as EC2 allows.
const MAX_TEXT: usize = 255;

/// The CIDR of `universe` that contains `ip`, if any.
pub fn cidr_of(universe: &Universe, ip: Ipv4Addr) -> Option<Ipv4Network> {
    universe.cidrs.iter().copied().find(|c| c.contains(ip))
}

/// The gateway of `ip` in `universe`: the first host address of the CIDR that contains it. The
/// workload's default route points there; the dataplane answers ARP for it.
pub fn gateway(universe: &Universe, ip: Ipv4Addr) -> Option<Ipv4Addr> {
    cidr_of(universe, ip).map(|c| Ipv4Addr::from(u32::from(c.network()) + 1))
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff` (as `Endpoint::mac` is).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// 404 for an id that a request body refers to: names the field, unlike an id in the path.
pub fn missing(field: &str, what: &str, id: &str) -> Error {
    Error {
        kind: ErrorKind::NotFound,
        code: "not_found",
        field: Some(field.to_owned()),
        message: format!("{field}: {what} {id} not found"),
    }
}

/// 404 for a security group of another universe that a request body refers to: within the
/// universe of the request it does not exist (and, to a principal of this universe alone, the
/// other universe does not either).
fn elsewhere(field: &str, group: &str, universe: &str) -> Error {
    Error {
        kind: ErrorKind::NotFound,
        code: "not_found",
        field: Some(field.to_owned()),
        message: format!("{field}: security group {group} not found in universe {universe}"),
    }
}

/// A random number whose id is not taken (ids carry 8 hex digits, 32 random bits). Never 0: the
/// dataplane names a rule by its id's bits, and 0 there means "no rule".
fn fresh_number(taken: impl Fn(u32) -> bool) -> u32 {
    loop {
        let n: u32 = rand::random();
        if n != 0 && !taken(n) {
            return n;
        }
    }
}

/// `prefix-` and 8 random lowercase hex digits, not `taken`.
fn fresh_id(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    let n = fresh_number(|n| taken(&format!("{prefix}-{n:08x}")));
    format!("{prefix}-{n:08x}")
}

/// The 32 bits of a rule id (`sgr-` and 8 hex digits), as the dataplane names the rule
/// (`dataplane_common::PolicyValue::rule`); `None` for anything else and for `sgr-00000000`.
pub fn rule_bits(id: &str) -> Option<u32> {
    let hex = id.strip_prefix("sgr-")?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().filter(|&n| n != 0)
}

fn endpoint_id(n: u32) -> String {
    format!("ep-{n:08x}")
}

fn allow_all(id: String, direction: Direction, peer: Peer) -> Rule {
    Rule {
        id,
        direction,
        protocol: Protocol::All,
        ports: None,
        icmp: None,
        peer,
        description: String::new(),
    }
}

/// S2: everything may go out, over IPv4 and IPv6.
fn default_egress(v4: String, v6: String) -> Vec<Rule> {
    let any4 =
        IpNetwork::V4(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is a valid prefix"));
    let any6 = IpNetwork::V6(
        ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::UNSPECIFIED, 0)
            .expect("/0 is a valid prefix"),
    );
    let mut rules = vec![
        allow_all(v4, Direction::Egress, Peer::Cidr(any4)),
        allow_all(v6, Direction::Egress, Peer::Cidr(any6)),
    ];
    rules.sort_by(|a, b| a.id.cmp(&b.id));
    rules
}

/// Puts `rule` into a group's list in the order of rule ids, the order every store reads a
/// group's rules back in (one key per rule): so a group lists its rules the same way on every
/// host and before and after a restart.
pub fn insert_by_id(list: &mut Vec<Rule>, rule: Rule) {
    match list.binary_search_by(|r| r.id.cmp(&rule.id)) {
        Ok(i) => list[i] = rule,
        Err(i) => list.insert(i, rule),
    }
}

/// A name: not blank, at most 255 characters, no control characters.
fn check_name(field: &str, name: &str) -> Result<String> {
    if name.trim().is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    check_text(field, name)?;
    Ok(name.to_owned())
}

fn check_description(description: Option<&str>) -> Result<String> {
    let description = description.unwrap_or_default();
    check_text("description", description)?;
    Ok(description.to_owned())
}

fn check_text(field: &str, text: &str) -> Result<()> {
    if text.chars().count() > MAX_TEXT {
        return Err(Error::invalid(field, format!("longer than {MAX_TEXT} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A host name: what a DNS label sequence allows (RFC 1123), plus `_`.
pub fn check_host(host: &str) -> Result<String> {
    if host.is_empty() || host.len() > 253 {
        return Err(Error::invalid("host", "must be 1 to 253 characters"));
    }
    if let Some(c) =
        host.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(Error::invalid(
            "host",
            format!("{host:?} contains {c:?}; use letters, digits, '-', '.', '_'"),
        ));
    }
    Ok(host.to_owned())
}

/// An `ip netns` name: a file name under /run/netns (iproute2 `is_valid_netns_name`: no `/`, not
/// `.` or `..`, at most NAME_MAX bytes), in printable ASCII without spaces: other bytes only
/// make trouble in scripts, and the API's OpenAPI pattern says exactly this.
pub fn check_netns(netns: &str) -> Result<String> {
    if netns.is_empty() || netns.len() > 255 {
        return Err(Error::invalid("netns", "must be 1 to 255 characters"));
    }
    if netns == "." || netns == ".." {
        return Err(Error::invalid("netns", format!("{netns:?} is not a namespace name")));
    }
    if let Some(c) = netns.chars().find(|c| *c == '/' || !c.is_ascii_graphic()) {
        return Err(Error::invalid(
            "netns",
            format!("{netns:?} contains {c:?}; use printable ASCII without '/' or spaces"),
        ));
    }
    Ok(netns.to_owned())
}

/// Parses `address/prefix` into a canonical network (S4), keeping `field` for errors.
///
/// Strict, so that the API's OpenAPI patterns can say exactly what is accepted: the address in
/// the standard notation (`std::net`: four decimal octets without leading zeros, or RFC 4291
/// text for IPv6), the prefix in decimal without a sign or leading zeros. An IPv4-mapped IPv6
/// CIDR (`::ffff:a.b.c.d/n`, n >= 96) is the IPv4 CIDR it means (`a.b.c.d/(n-96)`): that is
/// how a dual-stack socket writes an IPv4 peer, and as an IPv6 CIDR it would never match a
/// packet (no IPv6 packet carries a mapped address on the wire).
fn parse_cidr(field: &str, text: &str) -> Result<IpNetwork> {
    cidr_from_text(text).map_err(|message| Error::invalid(field, message))
}

/// [`parse_cidr`] without the field: the error is the message.
fn cidr_from_text(text: &str) -> Result<IpNetwork, String> {
    // A bare address would parse as a /32; asking for the prefix avoids a silent surprise.
    let Some((addr_text, prefix_text)) = text.split_once('/') else {
        return Err(format!("{text:?} is not a CIDR (expected address/prefix)"));
    };
    let addr: std::net::IpAddr = addr_text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR: {addr_text:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let canonical_digits = !prefix_text.is_empty()
        && prefix_text.len() <= 3
        && prefix_text.bytes().all(|b| b.is_ascii_digit())
        && (prefix_text == "0" || !prefix_text.starts_with('0'));
    let prefix = prefix_text
        .parse::<u8>()
        .ok()
        .filter(|p| canonical_digits && *p <= max)
        .ok_or_else(|| {
            format!("{text:?} is not a CIDR: the prefix {prefix_text:?} is not a number 0 to {max}")
        })?;
    let net = match addr {
        std::net::IpAddr::V6(a) if prefix >= 96 && a.to_ipv4_mapped().is_some() => {
            let v4 = a.to_ipv4_mapped().expect("checked just above");
            Ipv4Network::new(v4, prefix - 96).map(IpNetwork::V4)
        }
        std::net::IpAddr::V4(a) => Ipv4Network::new(a, prefix).map(IpNetwork::V4),
        std::net::IpAddr::V6(a) => ipnetwork::Ipv6Network::new(a, prefix).map(IpNetwork::V6),
    }
    .map_err(|e| format!("{text:?}: {e}"))?;
    let canonical = match net {
        IpNetwork::V4(n) => Ipv4Network::new(n.network(), n.prefix()).map(IpNetwork::V4),
        IpNetwork::V6(n) => ipnetwork::Ipv6Network::new(n.network(), n.prefix()).map(IpNetwork::V6),
    };
    canonical.map_err(|e| format!("{text:?}: {e}"))
}

/// The CIDRs of a universe request: `cidr` xor `cidrs`, IPv4, /8 to /30, canonical, disjoint.
/// O(n log n) in the number of CIDRs (see [`first_overlap`]).
fn universe_cidrs(req: &CreateUniverse) -> Result<Vec<Ipv4Network>> {
    let (texts, single): (&[String], bool) =
        match (&req.cidr, &req.cidrs) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("cidr", "give either cidr or cidrs, not both"))
            }
            (None, None) => return Err(Error::invalid(
                "cidr",
                "a universe needs cidr or cidrs (IPv4; IPv6 CIDRs go in ipv6_cidrs, beside them)",
            )),
            (None, Some(list)) if list.is_empty() => {
                return Err(Error::invalid("cidrs", "a universe needs at least one CIDR"))
            }
            (Some(one), None) => (std::slice::from_ref(one), true),
            (None, Some(list)) => (list, false),
        };
    // Named only when needed: a universe may have tens of thousands of CIDRs.
    let field = |i: usize| if single { "cidr".to_owned() } else { format!("cidrs[{i}]") };
    let mut cidrs: Vec<Ipv4Network> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        // `cidr` and `cidrs` are IPv4; a mapped `::ffff:` CIDR is refused like any IPv6 one
        // (the OpenAPI pattern of these fields is IPv4 dotted-quad only).
        if text.contains(':') {
            return Err(Error::invalid(
                field(i),
                format!("{text:?} is an IPv6 CIDR: give it in ipv6_cidrs"),
            ));
        }
        let net = match cidr_from_text(text) {
            Ok(IpNetwork::V4(n)) => n,
            Ok(IpNetwork::V6(_)) => {
                return Err(Error::invalid(field(i), "an IPv6 CIDR: give it in ipv6_cidrs"))
            }
            Err(message) => return Err(Error::invalid(field(i), message)),
        };
        if !(UNIVERSE_PREFIX_MIN..=UNIVERSE_PREFIX_MAX).contains(&net.prefix()) {
            return Err(Error::invalid(
                field(i),
                format!(
                    "prefix /{} is outside /{UNIVERSE_PREFIX_MIN} to /{UNIVERSE_PREFIX_MAX}",
                    net.prefix()
                ),
            ));
        }
        cidrs.push(net);
    }
    let ranges: Vec<(u128, u128)> = cidrs
        .iter()
        .map(|c| (u128::from(u32::from(c.network())), u128::from(u32::from(c.broadcast()))))
        .collect();
    if let Some((i, j)) = first_overlap(&ranges) {
        return Err(Error::invalid(
            field(i),
            format!("{} overlaps {} ({})", cidrs[i], cidrs[j], field(j)),
        ));
    }
    Ok(cidrs)
}

/// IPv6 universe CIDRs: /44 (the widest block AWS gives a VPC) to /64 (one IPv6 subnet, the
/// narrowest AWS allows, RFC 4291 section 2.5.1).
pub const UNIVERSE_IPV6_PREFIX_MIN: u8 = 44;
pub const UNIVERSE_IPV6_PREFIX_MAX: u8 = 64;

/// `ipv6_cidrs` of a universe request: absent, or 1 or more IPv6 CIDRs, /44 to /64, canonical,
/// pairwise disjoint, unicast and routable within a universe: not multicast (`ff00::/8`), not
/// link-local (`fe80::/10`, which the dataplane keeps for neighbour discovery), not the block
/// of the unspecified, loopback and IPv4-mapped addresses (`::/64`).
fn universe_ipv6_cidrs(texts: Option<&[String]>) -> Result<Vec<Ipv6Network>> {
    let Some(texts) = texts else { return Ok(Vec::new()) };
    if texts.is_empty() {
        return Err(Error::invalid(
            "ipv6_cidrs",
            "give at least one IPv6 CIDR, or leave ipv6_cidrs out",
        ));
    }
    let field = |i: usize| format!("ipv6_cidrs[{i}]");
    let mut cidrs: Vec<Ipv6Network> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let net = match cidr_from_text(text) {
            Ok(IpNetwork::V6(n)) if text.contains(':') => n,
            Ok(_) => {
                return Err(Error::invalid(
                    field(i),
                    format!("{text:?} is an IPv4 CIDR: give it in cidr or cidrs"),
                ))
            }
            Err(message) => return Err(Error::invalid(field(i), message)),
        };
        let range = (UNIVERSE_IPV6_PREFIX_MIN, UNIVERSE_IPV6_PREFIX_MAX);
        if !(range.0..=range.1).contains(&net.prefix()) {
            return Err(Error::invalid(
                field(i),
                format!("prefix /{} is outside /{} to /{}", net.prefix(), range.0, range.1),
            ));
        }
        let first = u128::from(net.network());
        let unusable = if first >> 120 == 0xff {
            Some("multicast (ff00::/8)")
        } else if first >> 118 == 0xfe80 >> 6 {
            Some("link-local (fe80::/10)")
        } else if first >> 64 == 0 {
            Some("in ::/64 (the unspecified, loopback and IPv4-mapped addresses)")
        } else {
            None
        };
        if let Some(what) = unusable {
            return Err(Error::invalid(field(i), format!("{net} is {what}")));
        }
        cidrs.push(net);
    }
    let ranges: Vec<(u128, u128)> =
        cidrs.iter().map(|c| (u128::from(c.network()), u128::from(c.broadcast()))).collect();
    if let Some((i, j)) = first_overlap(&ranges) {
        return Err(Error::invalid(
            field(i),
            format!("{} overlaps {} ({})", cidrs[i], cidrs[j], field(j)),
        ));
    }
    Ok(cidrs)
}

/// The first CIDR of `cidrs` (in list order) that overlaps an earlier one, with the first
/// earlier one it overlaps: `Some((i, j))`, `j < i`. The same answer as comparing every pair,
/// in O(n log n): two CIDRs overlap only when one contains the other, so sorted by (network,
/// prefix) they form a forest of containment (built with a stack), and the CIDRs a CIDR
/// overlaps are exactly its ancestors and descendants there.
///
/// Each CIDR is given as its (first, last) address, as a number (IPv4 or IPv6 alike).
fn first_overlap(cidrs: &[(u128, u128)]) -> Option<(usize, usize)> {
    const NONE: usize = usize::MAX;
    // (first address, !last address, index): sorted by first address, the larger block first,
    // then by index.
    let mut sorted: Vec<(u128, u128, usize)> =
        cidrs.iter().enumerate().map(|(i, &(first, last))| (first, !last, i)).collect();
    sorted.sort_unstable();
    let mut parent = vec![NONE; cidrs.len()];
    let mut open: Vec<(u128, usize)> = Vec::new();
    for &(first, not_last, i) in &sorted {
        let last = !not_last;
        // A block on the stack that does not contain this one ends before it (blocks are
        // nested or disjoint), and so before every later one too.
        while open.last().is_some_and(|&(top_last, _)| top_last < last || top_last < first) {
            open.pop();
        }
        if let Some(&(_, top)) = open.last() {
            parent[i] = top;
        }
        open.push((last, i));
    }
    // The smallest index among each CIDR's ancestors (a parent sorts before its children) and
    // among its descendants (children sort after their parent).
    let mut up = vec![NONE; cidrs.len()];
    for &(_, _, i) in &sorted {
        if parent[i] != NONE {
            up[i] = up[parent[i]].min(parent[i]);
        }
    }
    let mut down = vec![NONE; cidrs.len()];
    for &(_, _, i) in sorted.iter().rev() {
        if parent[i] != NONE {
            let p = parent[i];
            down[p] = down[p].min(down[i]).min(i);
        }
    }
    (0..cidrs.len()).find_map(|i| {
        let j = up[i].min(down[i]);
        (j < i).then_some((i, j))
    })
}

/// An endpoint address: IPv4, in one of the universe's CIDRs, and a usable host address there.
fn endpoint_ip(universe: &Universe, text: &str) -> Result<Ipv4Addr> {
    let ip: std::net::IpAddr =
        text.parse().map_err(|_| Error::invalid("ip", format!("{text:?} is not an IP address")))?;
    let std::net::IpAddr::V4(ip) = ip else {
        return Err(Error::invalid("ip", "IPv6 endpoints are not supported yet"));
    };
    let Some(cidr) = cidr_of(universe, ip) else {
        let cidrs: Vec<String> = universe.cidrs.iter().map(ToString::to_string).collect();
        return Err(Error::invalid(
            "ip",
            format!("{ip} is outside universe {} ({})", universe.id, cidrs.join(", ")),
        ));
    };
    let reserved = if ip == cidr.network() {
        Some("network")
    } else if ip == cidr.broadcast() {
        Some("broadcast")
    } else if Some(ip) == gateway(universe, ip) {
        Some("gateway")
    } else {
        None
    };
    if let Some(what) = reserved {
        return Err(Error::invalid("ip", format!("{ip} is the {what} address of {cidr}")));
    }
    Ok(ip)
}

/// An endpoint's IPv6 address: IPv6 (not IPv4-mapped), in one of the universe's IPv6 CIDRs, and
/// not one of the addresses reserved there ([`reserved_ipv6`]).
fn endpoint_ipv6(universe: &Universe, text: &str) -> Result<Ipv6Addr> {
    let ip: std::net::IpAddr = text
        .parse()
        .map_err(|_| Error::invalid("ipv6", format!("{text:?} is not an IP address")))?;
    let ip = match ip {
        std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => a,
        _ => {
            return Err(Error::invalid(
                "ipv6",
                format!("{text:?} is not an IPv6 address (an IPv4 address goes in ip)"),
            ))
        }
    };
    let Some(cidr) = cidr6_of(universe, ip) else {
        let cidrs: Vec<String> = universe.ipv6_cidrs.iter().map(ToString::to_string).collect();
        return Err(Error::invalid(
            "ipv6",
            if cidrs.is_empty() {
                format!("{ip}: universe {} has no IPv6 CIDRs (ipv6_cidrs)", universe.id)
            } else {
                format!(
                    "{ip} is outside the IPv6 CIDRs of universe {} ({})",
                    universe.id,
                    cidrs.join(", ")
                )
            },
        ));
    };
    if let Some(what) = reserved_ipv6(cidr, ip) {
        return Err(Error::invalid("ipv6", format!("{ip} is the {what} address of {cidr}")));
    }
    Ok(ip)
}

/// Whether `ip` is one of the addresses of `cidr` no endpoint may have, and which: the first
/// (the Subnet-Router anycast address, RFC 4291 section 2.6.1), the second (the gateway, as for
/// IPv4: see [`gateway6`]) and the last (as AWS reserves it in its IPv6 subnets).
pub fn reserved_ipv6(cidr: Ipv6Network, ip: Ipv6Addr) -> Option<&'static str> {
    let first = u128::from(cidr.network());
    match u128::from(ip) {
        n if n == first => Some("subnet-router anycast"),
        n if n == first + 1 => Some("gateway"),
        n if n == u128::from(cidr.broadcast()) => Some("last"),
        _ => None,
    }
}

/// The IPv6 CIDR of `universe` that contains `ip`, if any.
pub fn cidr6_of(universe: &Universe, ip: Ipv6Addr) -> Option<Ipv6Network> {
    universe.ipv6_cidrs.iter().copied().find(|c| c.contains(ip))
}

/// The IPv6 gateway of `ip` in `universe`: the second address of the IPv6 CIDR that contains it
/// (`fd00:ab::1` in `fd00:ab::/56`), as the IPv4 gateway is the first host address of its CIDR.
/// The workload's IPv6 default route points there; the dataplane will answer neighbour
/// solicitations for it.
pub fn gateway6(universe: &Universe, ip: Ipv6Addr) -> Option<Ipv6Addr> {
    cidr6_of(universe, ip).map(|c| Ipv6Addr::from(u128::from(c.network()) + 1))
}

/// S4 protocol: a name (any case), a number 0–255, or that number as a decimal string.
fn parse_protocol(value: &serde_json::Value) -> Result<Protocol> {
    let bad = || {
        Error::invalid(
            "protocol",
            format!("{value} is not tcp, udp, icmp, icmpv6, all or a number 0-255"),
        )
    };
    match value {
        serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
            name if let Some(p) = Protocol::from_name(name) => Ok(p),
            // Decimal without leading zeros, as the OpenAPI pattern says.
            n if !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && (n == "0" || !n.starts_with('0')) =>
            {
                n.parse().map(Protocol::Number).map_err(|_| bad())
            }
            _ => Err(bad()),
        },
        serde_json::Value::Number(n) => {
            n.as_u64().and_then(|n| u8::try_from(n).ok()).map(Protocol::Number).ok_or_else(bad)
        }
        serde_json::Value::Null => Err(Error::invalid("protocol", "is required")),
        _ => Err(bad()),
    }
}

fn port(field: &str, value: Option<i64>) -> Result<u16> {
    let value = value.ok_or_else(|| Error::invalid(field, "is required for tcp and udp"))?;
    u16::try_from(value)
        .map_err(|_| Error::invalid(field, format!("{value} is outside 0 to 65535")))
}

/// An ICMP type or code: -1 (or absent) = any, else 0–255.
fn icmp_value(field: &str, value: Option<i64>) -> Result<Option<u8>> {
    match value {
        None | Some(-1) => Ok(None),
        Some(v) => u8::try_from(v)
            .map(Some)
            .map_err(|_| Error::invalid(field, format!("{v} is outside -1 to 255"))),
    }
}

/// Refuses a field that `protocol` does not take.
fn refuse(field: &str, value: Option<i64>, protocol: Protocol) -> Result<()> {
    match value {
        Some(_) => {
            Err(Error::invalid(field, format!("protocol {} takes no {field}", protocol.name())))
        }
        None => Ok(()),
    }
}

type RuleMatch = (Option<(u16, u16)>, Option<(Option<u8>, Option<u8>)>);

/// S4: ports for TCP/UDP, type/code for ICMP, nothing for the others.
fn rule_match(protocol: Protocol, req: &CreateRule) -> Result<RuleMatch> {
    if protocol == Protocol::TCP || protocol == Protocol::UDP {
        refuse("icmp_type", req.icmp_type, protocol)?;
        refuse("icmp_code", req.icmp_code, protocol)?;
        let from = port("from_port", req.from_port)?;
        let to = port("to_port", req.to_port)?;
        if from > to {
            return Err(Error::invalid("from_port", format!("{from} is above to_port {to}")));
        }
        Ok((Some((from, to)), None))
    } else if protocol == Protocol::ICMP || protocol == Protocol::ICMPV6 {
        refuse("from_port", req.from_port, protocol)?;
        refuse("to_port", req.to_port, protocol)?;
        let icmp_type = icmp_value("icmp_type", req.icmp_type)?;
        let icmp_code = icmp_value("icmp_code", req.icmp_code)?;
        if icmp_type.is_none() && icmp_code.is_some() {
            return Err(Error::invalid("icmp_code", "a code needs an icmp_type"));
        }
        Ok((None, Some((icmp_type, icmp_code))))
    } else {
        refuse("from_port", req.from_port, protocol)?;
        refuse("to_port", req.to_port, protocol)?;
        refuse("icmp_type", req.icmp_type, protocol)?;
        refuse("icmp_code", req.icmp_code, protocol)?;
        Ok((None, None))
    }
}

impl State {
    /// The VNI of the next universe: above every VNI ever handed out (and, for a state written
    /// before VNIs were counted, above every VNI in use).
    fn next_vni(&self) -> Option<u32> {
        let in_use = self.idx.vnis.get_max().map_or(0, |(vni, _)| *vni);
        let top = self.vnis_issued.max(in_use);
        top.checked_add(1).filter(|v| *v <= MAX_VNI)
    }

    /// The serial of the next endpoint, likewise.
    fn next_serial(&self) -> Result<u64> {
        let top = self.endpoints.values().map(|e| e.serial).fold(self.serials_issued, u64::max);
        top.checked_add(1).ok_or_else(|| {
            Error::conflict("limit_exceeded", None, "every endpoint serial has been handed out")
        })
    }

    /// The smallest slot (1 to `capacity::ENDPOINTS`) that no endpoint of `host` has.
    fn free_slot(&self, host: &str) -> Result<u32> {
        let used: std::collections::BTreeSet<u32> =
            self.host_endpoints(host).map(|e| e.slot).filter(|s| *s > 0).collect();
        let max = dataplane_common::capacity::ENDPOINTS;
        crate::index::smallest_free(used.into_iter(), max).ok_or_else(|| {
            Error::conflict(
                "limit_exceeded",
                Some("host"),
                format!("host: {host} already has {max} endpoints, as many as its dataplane holds"),
            )
        })
    }

    /// The endpoints placed on `host` (a lookup in the indices, which must be up to date:
    /// [`State::indexed`]).
    pub fn host_endpoints<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a Endpoint> + 'a {
        let ids = self.idx.host_endpoints.get(host);
        ids.into_iter().flatten().filter_map(|id| self.endpoints.get(id))
    }

    /// The budget of a new endpoint on `host` (S14): `requested` or the default, from 1 to the
    /// conntrack capacity, and within what the budgets of the endpoints already on `host` leave
    /// of that capacity (409 otherwise: budgets are never over-committed).
    fn conntrack_budget(&self, host: &str, requested: Option<i64>) -> Result<u32> {
        const FIELD: &str = "conntrack_budget";
        let capacity = dataplane_common::capacity::CONNTRACK;
        let budget = match requested {
            None => DEFAULT_CONNTRACK_BUDGET,
            Some(b) => {
                u32::try_from(b).ok().filter(|b| (1..=capacity).contains(b)).ok_or_else(|| {
                    Error::invalid(FIELD, format!("{b} is not within 1..={capacity} flows"))
                })?
            }
        };
        let reserved: u64 = self.host_endpoints(host).map(|e| u64::from(e.conntrack_budget)).sum();
        let left = u64::from(capacity).saturating_sub(reserved);
        if u64::from(budget) > left {
            return Err(Error::conflict(
                "limit_exceeded",
                Some(FIELD),
                format!(
                    "{FIELD}: {budget} flows do not fit host {host}: the budgets of its endpoints \
                     leave {left} of its {capacity} tracked flows (S14)"
                ),
            ));
        }
        Ok(budget)
    }

    /// Gives the endpoints of a state written before serials, slots and budgets existed the
    /// ones they lack (in id order, so every host that reads the state computes the same), and
    /// counts the VNIs and serials in use as handed out. A no-op on any state this version
    /// wrote. The stores call it on what they read.
    pub fn complete_legacy(&mut self) {
        self.reindex();
        let top_vni = self.universes.values().map(|u| u.vni).max().unwrap_or(0);
        self.vnis_issued = self.vnis_issued.max(top_vni);
        let top_serial = self.endpoints.values().map(|e| e.serial).max().unwrap_or(0);
        self.serials_issued = self.serials_issued.max(top_serial);
        let ids: Vec<String> = self.endpoints.keys().cloned().collect();
        for id in ids {
            let (host, needs_serial, needs_slot, needs_budget) = {
                let e = &self.endpoints[&id];
                (e.host.clone(), e.serial == 0, e.slot == 0, e.conntrack_budget == 0)
            };
            let slot = if needs_slot { self.free_slot(&host).unwrap_or(0) } else { 0 };
            let e = self.endpoints.get_mut(&id).expect("id listed just above");
            if needs_serial {
                self.serials_issued += 1;
                e.serial = self.serials_issued;
            }
            if needs_slot {
                e.slot = slot;
            }
            if needs_budget {
                e.conntrack_budget = DEFAULT_CONNTRACK_BUDGET;
            }
        }
    }

    fn rule_id_taken(&self, id: &str) -> bool {
        self.idx.rule_ids.contains_key(id)
    }

    /// The groups of an endpoint request: the universe's `default` when absent (S3), else 1–16
    /// distinct groups of the same universe (S12).
    fn endpoint_groups(&self, universe: &str, requested: Option<&[String]>) -> Result<Vec<String>> {
        let Some(requested) = requested else {
            let default =
                self.idx.group_names.get(&(universe.to_owned(), DEFAULT_GROUP.to_owned()));
            return default.map(|g| vec![g.clone()]).ok_or_else(|| {
                missing("security_groups", "default security group of universe", universe)
            });
        };
        if requested.is_empty() {
            return Err(Error::invalid(
                "security_groups",
                "an endpoint needs at least one security group",
            ));
        }
        if requested.len() > MAX_GROUPS_PER_ENDPOINT {
            return Err(Error::conflict(
                "limit_exceeded",
                Some("security_groups"),
                format!(
                    "security_groups: {} groups given, an endpoint may have at most {MAX_GROUPS_PER_ENDPOINT} (S12)",
                    requested.len()
                ),
            ));
        }
        for (i, id) in requested.iter().enumerate() {
            let field = format!("security_groups[{i}]");
            let group = self.groups.get(id).ok_or_else(|| missing(&field, "security group", id))?;
            if group.universe != universe {
                return Err(elsewhere(&field, id, universe));
            }
            if let Some(j) = requested[..i].iter().position(|g| g == id) {
                return Err(Error::invalid(
                    &field,
                    format!("{id} is already security_groups[{j}]"),
                ));
            }
        }
        Ok(requested.to_vec())
    }

    /// The identity of (universe, set of groups): the existing one, or the smallest free number.
    /// The caller inserts it (a no-op when it exists).
    fn identity_for(&self, universe: &str, groups: &[String]) -> Result<(u32, Identity)> {
        let mut sorted = groups.to_vec();
        sorted.sort();
        let identity = Identity { universe: universe.to_owned(), groups: sorted };
        if let Some(&n) =
            self.idx.identity_sets.get(&(identity.universe.clone(), identity.groups.clone()))
        {
            return Ok((n, identity));
        }
        // A number freed by this very edit is not free yet: handing it to another set of groups
        // in the same revision would let the dataplane, while it applies the change, judge a
        // packet by a mix of the old and the new policy of that number.
        let n = crate::index::smallest_free(
            self.identities.keys().copied(),
            dataplane_common::MAX_IDENTITY,
        )
        .ok_or_else(|| {
            Error::conflict(
                "limit_exceeded",
                Some("security_groups"),
                format!(
                    "all {} security identities (distinct sets of groups) are in use",
                    dataplane_common::MAX_IDENTITY
                ),
            )
        })?;
        Ok((n, identity))
    }

    /// Removes identity `n` if no endpoint has it any more.
    fn collect_identity(&mut self, n: u32) {
        self.reindex();
        if self.idx.identity_endpoints.get(&n).is_none_or(|e| e.is_empty()) {
            self.identities.remove(&n);
        }
    }
}

// ---- Wire form of rules and protocols ----

impl Protocol {
    pub const TCP: Protocol = Protocol::Number(wire::IPPROTO_TCP);
    pub const UDP: Protocol = Protocol::Number(wire::IPPROTO_UDP);
    pub const ICMP: Protocol = Protocol::Number(wire::IPPROTO_ICMP);
    pub const ICMPV6: Protocol = Protocol::Number(wire::IPPROTO_ICMPV6);

    /// The protocols with a name (S4), and the name; every other number is written as itself.
    const NAMED: [(&'static str, Protocol); 5] = [
        ("all", Protocol::All),
        ("tcp", Protocol::TCP),
        ("udp", Protocol::UDP),
        ("icmp", Protocol::ICMP),
        ("icmpv6", Protocol::ICMPV6),
    ];

    /// The name the API shows: `tcp`, `udp`, `icmp`, `icmpv6`, `all`, else the number.
    pub fn name(self) -> String {
        match Self::NAMED.iter().find(|(_, p)| *p == self) {
            Some((name, _)) => (*name).into(),
            None => match self {
                Protocol::Number(n) => n.to_string(),
                Protocol::All => unreachable!("`all` is named"),
            },
        }
    }

    /// The protocol of a name (lower case), if it is one of [`Protocol::name`]'s.
    pub fn from_name(name: &str) -> Option<Protocol> {
        Self::NAMED.iter().find(|(n, _)| *n == name).map(|&(_, p)| p)
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
        let protocol = match Protocol::from_name(&j.protocol) {
            Some(p) => p,
            None => Protocol::Number(j.protocol.parse().map_err(D::Error::custom)?),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn universe(state: &mut State, name: &str, cidr: &str) -> Universe {
        state
            .create_universe(CreateUniverse {
                name: name.into(),
                cidr: Some(cidr.into()),
                cidrs: None,
                ipv6_cidrs: None,
            })
            .unwrap()
    }

    fn group(state: &mut State, universe: &str, name: &str) -> SecurityGroup {
        state
            .create_group(CreateGroup {
                universe: universe.into(),
                name: name.into(),
                description: None,
            })
            .unwrap()
    }

    fn default_group(state: &State, universe: &str) -> String {
        state
            .groups
            .values()
            .find(|g| g.universe == universe && g.name == DEFAULT_GROUP)
            .unwrap()
            .id
            .clone()
    }

    fn rule_req(value: serde_json::Value) -> CreateRule {
        serde_json::from_value(value).unwrap()
    }

    fn endpoint_req(
        universe: &str,
        netns: &str,
        ip: &str,
        groups: Option<Vec<String>>,
    ) -> CreateEndpoint {
        CreateEndpoint {
            universe: universe.into(),
            host: None,
            netns: netns.into(),
            ip: ip.into(),
            security_groups: groups,
            conntrack_budget: None,
            flow_logs: None,
            ipv6: None,
        }
    }

    /// Asserts the refusal and that the state did not change (contract: whole or nothing).
    #[track_caller]
    fn refused<T: std::fmt::Debug>(
        state: &mut State,
        edit: impl FnOnce(&mut State) -> Result<T>,
        kind: ErrorKind,
        code: &str,
        field: Option<&str>,
    ) -> Error {
        let before = state.clone();
        let err = edit(state).expect_err("the edit must be refused");
        assert_eq!((err.kind, err.code, err.field.as_deref()), (kind, code, field), "{err:?}");
        assert_eq!(*state, before, "a refused edit must leave the state untouched");
        err
    }

    fn is_id(id: &str, prefix: &str) -> bool {
        id.strip_prefix(prefix).and_then(|s| s.strip_prefix('-')).is_some_and(|hex| {
            hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    // ---- Universes ----

    #[test]
    fn create_universe_makes_ids_vni_and_bumps_revision() {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        assert!(is_id(&u.id, "uni"), "{}", u.id);
        assert_eq!(u.vni, 1);
        assert_eq!(u.cidrs, vec!["10.1.0.0/16".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(s.revision, 1);
        assert_eq!(s.universes[&u.id], u);
        let u2 = universe(&mut s, "red", "10.2.0.0/16");
        assert_eq!(u2.vni, 2);
        assert_eq!(s.revision, 2);
    }

    #[test]
    fn s4_universe_cidrs_are_stored_canonical() {
        let mut s = State::default();
        let u = s
            .create_universe(CreateUniverse {
                name: "u".into(),
                cidr: None,
                cidrs: Some(vec!["10.1.2.3/16".into(), "192.168.7.9/24".into()]),
                ipv6_cidrs: None,
            })
            .unwrap();
        assert_eq!(u.cidrs[0].to_string(), "10.1.0.0/16");
        assert_eq!(u.cidrs[1].to_string(), "192.168.7.0/24");
    }

    // ---- IPv6 (issue 13): modelled in full; the API gates it until the dataplane carries it ----

    fn dual(s: &mut State, name: &str, cidr: &str, cidrs6: &[&str]) -> Result<Universe> {
        s.create_universe(CreateUniverse {
            name: name.into(),
            cidr: Some(cidr.into()),
            cidrs: None,
            ipv6_cidrs: Some(cidrs6.iter().map(|c| c.to_string()).collect()),
        })
    }

    #[test]
    fn ipv6_universe_cidrs_are_44_to_64_canonical_disjoint_unicast() {
        let mut s = State::default();
        let u = dual(&mut s, "u", "10.0.0.0/16", &["FD00:AB::5/48", "2001:db8:0:7::/64"]).unwrap();
        let texts: Vec<String> = u.ipv6_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(texts, ["fd00:ab::/48", "2001:db8:0:7::/64"]);
        // Shown and stored as strings beside the IPv4 CIDRs; an IPv4-only universe shows none.
        let json = serde_json::to_value(&u).unwrap();
        assert_eq!(json["ipv6_cidrs"], json!(["fd00:ab::/48", "2001:db8:0:7::/64"]));
        assert_eq!(serde_json::from_value::<Universe>(json).unwrap(), u);
        let plain = universe(&mut s, "v4", "10.1.0.0/16");
        assert!(serde_json::to_value(&plain).unwrap().get("ipv6_cidrs").is_none());
        assert_eq!(
            dual(&mut s, "edge", "10.2.0.0/16", &["fd01::/44", "fd02::/64"])
                .unwrap()
                .ipv6_cidrs
                .len(),
            2
        );

        let bad: &[(&[&str], &str, &str)] = &[
            (&[], "ipv6_cidrs", "at least one"),
            (&["fd00::/43"], "ipv6_cidrs[0]", "outside /44 to /64"),
            (&["fd00::/65"], "ipv6_cidrs[0]", "outside /44 to /64"),
            (&["fd00::/48", "10.0.0.0/16"], "ipv6_cidrs[1]", "IPv4 CIDR"),
            (&["::ffff:10.0.0.0/120"], "ipv6_cidrs[0]", "IPv4 CIDR"),
            (
                &["fd00::/48", "fd00:0:0:5::/64"],
                "ipv6_cidrs[1]",
                "overlaps fd00::/48 (ipv6_cidrs[0])",
            ),
            (&["ff02::/64"], "ipv6_cidrs[0]", "multicast"),
            (&["fe80::/64"], "ipv6_cidrs[0]", "link-local"),
            (&["::/64"], "ipv6_cidrs[0]", "::/64"),
            (&["fd00::"], "ipv6_cidrs[0]", "not a CIDR"),
        ];
        for (cidrs, field, says) in bad {
            let err = refused(
                &mut s,
                |s| dual(s, "x", "10.3.0.0/16", cidrs),
                ErrorKind::Invalid,
                "invalid_argument",
                Some(field),
            );
            assert!(err.message.contains(says), "{cidrs:?}: {}", err.message);
        }
        // No universe is IPv6 only: like an AWS VPC, it has an IPv4 CIDR.
        let req = CreateUniverse {
            name: "x".into(),
            ipv6_cidrs: Some(vec!["fd00::/48".into()]),
            ..Default::default()
        };
        refused(
            &mut s,
            |s| s.create_universe(req),
            ErrorKind::Invalid,
            "invalid_argument",
            Some("cidr"),
        );
    }

    #[test]
    fn ipv6_endpoint_addresses_are_inside_unique_and_not_reserved() {
        let mut s = State::default();
        let u = dual(&mut s, "u", "10.0.0.0/16", &["fd00:ab::/48", "fd00:cd:0:1::/64"]).unwrap();
        let other = dual(&mut s, "o", "10.0.0.0/16", &["fd00:ab::/48"]).unwrap();
        let plain = universe(&mut s, "p", "10.0.0.0/16");
        let req = |u: &str, ns: &str, ip: &str, ipv6: &str| CreateEndpoint {
            ipv6: Some(ipv6.into()),
            ..endpoint_req(u, ns, ip, None)
        };
        let e = s.create_endpoint(req(&u.id, "a", "10.0.0.5", "FD00:AB::5"), "h").unwrap();
        assert_eq!(e.ipv6, Some("fd00:ab::5".parse().unwrap()));
        assert_eq!(gateway6(&u, e.ipv6.unwrap()), Some("fd00:ab::1".parse().unwrap()));
        assert_eq!(
            gateway6(&u, "fd00:cd:0:1::9".parse().unwrap()),
            Some("fd00:cd:0:1::1".parse().unwrap())
        );
        assert_eq!(
            CreateEndpoint::again(&e, e.security_groups.clone()).ipv6.as_deref(),
            Some("fd00:ab::5")
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["ipv6"], "fd00:ab::5");
        // The same IPv6 address in another universe is another endpoint (isolation, S6).
        s.create_endpoint(req(&other.id, "b", "10.0.0.5", "fd00:ab::5"), "h").unwrap();
        let v4_only = s.create_endpoint(endpoint_req(&u.id, "c", "10.0.0.6", None), "h").unwrap();
        assert_eq!(v4_only.ipv6, None);
        assert!(serde_json::to_value(&v4_only).unwrap().get("ipv6").is_none());

        let inv = ErrorKind::Invalid;
        for (ipv6, says) in [
            ("fd00:ab::", "subnet-router anycast address of fd00:ab::/48"),
            ("fd00:ab::1", "gateway address of fd00:ab::/48"),
            ("fd00:ab:0:ffff:ffff:ffff:ffff:ffff", "last address of fd00:ab::/48"),
            ("fd00:cd:0:1:ffff:ffff:ffff:ffff", "last address of fd00:cd:0:1::/64"),
            ("fd00:ac::5", "outside the IPv6 CIDRs"),
            ("10.0.0.9", "not an IPv6 address"),
            ("::ffff:10.0.0.9", "not an IPv6 address"),
            ("fd00:ab::g", "not an IP address"),
        ] {
            let err = refused(
                &mut s,
                |s| s.create_endpoint(req(&u.id, "d", "10.0.0.9", ipv6), "h"),
                inv,
                "invalid_argument",
                Some("ipv6"),
            );
            assert!(err.message.contains(says), "{ipv6}: {}", err.message);
        }
        let err = refused(
            &mut s,
            |s| s.create_endpoint(req(&plain.id, "d", "10.0.0.9", "fd00:ab::9"), "h"),
            inv,
            "invalid_argument",
            Some("ipv6"),
        );
        assert!(err.message.contains("has no IPv6 CIDRs"), "{}", err.message);
        let err = refused(
            &mut s,
            |s| s.create_endpoint(req(&u.id, "d", "10.0.0.9", "fd00:ab::5"), "h"),
            ErrorKind::Conflict,
            "duplicate",
            Some("ipv6"),
        );
        assert!(err.message.contains(&e.id), "{}", err.message);
        // Deleting the endpoint frees its IPv6 address.
        s.delete_endpoint(&e.id).unwrap();
        s.create_endpoint(req(&u.id, "d", "10.0.0.9", "fd00:ab::5"), "h").unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
    }

    #[test]
    fn icmp_and_icmpv6_rules_with_a_cidr_of_the_other_family_are_stored_as_aws_does() {
        // AWS accepts `icmp` with an IPv6 CIDR and `icmpv6` with an IPv4 one: such a rule
        // matches nothing (the compiler makes no entry for it, see compile's family tests).
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let g = group(&mut s, &u.id, "g");
        let other = group(&mut s, &u.id, "other");
        for (protocol, peer, stored) in [
            (json!("icmp"), json!({"cidr": "10.0.0.0/8"}), "10.0.0.0/8"),
            (json!("icmpv6"), json!({"cidr": "fd00::/8"}), "fd00::/8"),
            (json!("icmp"), json!({"cidr": "fd00::/8"}), "fd00::/8"),
            (json!(1), json!({"cidr": "::/0"}), "::/0"),
            (json!("icmpv6"), json!({"cidr": "0.0.0.0/0"}), "0.0.0.0/0"),
            (json!("58"), json!({"cidr": "10.0.0.0/8"}), "10.0.0.0/8"),
            // A mapped CIDR is the IPv4 CIDR it means.
            (json!("icmpv6"), json!({"cidr": "::ffff:10.0.0.0/112"}), "10.0.0.0/16"),
        ] {
            let mut body = json!({"direction": "ingress", "protocol": protocol});
            body.as_object_mut().unwrap().extend(peer.as_object().unwrap().clone());
            let r = s.add_rule(&g.id, rule_req(body)).unwrap();
            assert_eq!(r.peer, Peer::Cidr(stored.parse().unwrap()), "{protocol} {peer}");
        }
        for protocol in [json!("icmp"), json!("icmpv6")] {
            let body = json!({"direction": "egress", "protocol": protocol, "group": other.id});
            s.add_rule(&g.id, rule_req(body)).unwrap();
        }
    }

    #[test]
    fn universes_may_overlap_each_other() {
        let mut s = State::default();
        let a = universe(&mut s, "a", "10.0.0.0/8");
        let b = universe(&mut s, "b", "10.0.0.0/8");
        assert_ne!(a.id, b.id);
        assert_ne!(a.vni, b.vni);
    }

    #[test]
    fn s7_vnis_are_never_reused() {
        let mut s = State::default();
        let a = universe(&mut s, "a", "10.0.0.0/8");
        let b = universe(&mut s, "b", "10.0.0.0/8");
        s.delete_universe(&b.id).unwrap();
        s.delete_universe(&a.id).unwrap();
        assert_eq!(universe(&mut s, "c", "10.0.0.0/8").vni, 3, "neither 1 nor 2 comes back");
        assert_eq!(s.vnis_issued, 3);
        // Persisted with the state: a state read back goes on from there.
        let mut back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(universe(&mut back, "d", "10.0.0.0/8").vni, 4);
    }

    #[test]
    fn vnis_run_out_with_a_conflict() {
        let mut s = State { vnis_issued: MAX_VNI - 1, ..State::default() };
        assert_eq!(universe(&mut s, "last", "10.0.0.0/8").vni, MAX_VNI);
        let err = refused(
            &mut s,
            |s| {
                s.create_universe(CreateUniverse {
                    name: "one-too-many".into(),
                    cidr: Some("10.0.0.0/8".into()),
                    cidrs: None,
                    ipv6_cidrs: None,
                })
            },
            ErrorKind::Conflict,
            "limit_exceeded",
            None,
        );
        assert!(err.message.contains("never reused"), "{}", err.message);
    }

    #[test]
    fn create_universe_refusals_name_the_field() {
        use ErrorKind::*;
        let mut s = State::default();
        let req = |name: &str, cidr: Option<&str>, cidrs: Option<Vec<&str>>| CreateUniverse {
            name: name.into(),
            cidr: cidr.map(Into::into),
            cidrs: cidrs.map(|v| v.into_iter().map(Into::into).collect()),
            ipv6_cidrs: None,
        };
        let cases: Vec<(CreateUniverse, &str)> = vec![
            (req("", Some("10.0.0.0/8"), None), "name"),
            (req("   ", Some("10.0.0.0/8"), None), "name"),
            (req(&"x".repeat(256), Some("10.0.0.0/8"), None), "name"),
            (req("u", None, None), "cidr"),
            (req("u", Some("10.0.0.0/8"), Some(vec!["10.0.0.0/8"])), "cidr"),
            (req("u", None, Some(vec![])), "cidrs"),
            (req("u", Some("banana"), None), "cidr"),
            (req("u", Some("10.0.0.0"), None), "cidr"),
            (req("u", Some("10.0.0.0/33"), None), "cidr"),
            (req("u", Some("10.0.0.0/7"), None), "cidr"),
            (req("u", Some("10.0.0.0/31"), None), "cidr"),
            (req("u", Some("fd00::/64"), None), "cidr"),
            (req("u", None, Some(vec!["10.0.0.0/16", "fd00::/64"])), "cidrs[1]"),
            (req("u", None, Some(vec!["10.0.0.0/16", "10.0.5.0/24"])), "cidrs[1]"),
            (req("u", None, Some(vec!["10.0.0.0/16", "10.1.0.0/16", "10.0.0.0/16"])), "cidrs[2]"),
        ];
        for (r, field) in cases {
            refused(&mut s, |s| s.create_universe(r), Invalid, "invalid_argument", Some(field));
        }
        let err = refused(
            &mut s,
            |s| s.create_universe(req("u", Some("fd00::/64"), None)),
            Invalid,
            "invalid_argument",
            Some("cidr"),
        );
        assert!(err.message.contains("give it in ipv6_cidrs"), "{}", err.message);
        universe(&mut s, "u", "10.0.0.0/8");
        refused(
            &mut s,
            |s| s.create_universe(req("u", Some("10.0.0.0/8"), None)),
            Conflict,
            "duplicate",
            Some("name"),
        );
    }

    #[test]
    fn s3_a_universe_comes_with_its_default_group() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let groups: Vec<&SecurityGroup> =
            s.groups.values().filter(|g| g.universe == u.id).collect();
        assert_eq!(groups.len(), 1);
        let g = groups[0];
        assert!(is_id(&g.id, "sg"));
        assert_eq!(g.name, DEFAULT_GROUP);
        assert_eq!(g.ingress.len(), 1);
        let r = &g.ingress[0];
        assert!(is_id(&r.id, "sgr"));
        assert_eq!(
            (r.direction, r.protocol, r.ports, r.icmp),
            (Direction::Ingress, Protocol::All, None, None)
        );
        assert_eq!(r.peer, Peer::Group(g.id.clone()), "ingress all from default itself");
        assert_s2_egress(g);
    }

    fn assert_s2_egress(g: &SecurityGroup) {
        // A group lists its rules in the order of their ids (see `insert_by_id`).
        let mut peers: Vec<&Peer> = g.egress.iter().map(|r| &r.peer).collect();
        peers.sort();
        assert_eq!(peers, vec![&Peer::Cidr(net("0.0.0.0/0")), &Peer::Cidr(net("::/0"))]);
        assert!(g.egress.windows(2).all(|w| w[0].id < w[1].id), "in the order of rule ids");
        for r in &g.egress {
            assert_eq!(
                (r.direction, r.protocol, r.ports, r.icmp),
                (Direction::Egress, Protocol::All, None, None)
            );
        }
        assert_ne!(g.egress[0].id, g.egress[1].id);
    }

    #[test]
    fn delete_universe_needs_no_endpoints_and_removes_its_groups() {
        use ErrorKind::*;
        let mut s = State::default();
        refused(&mut s, |s| s.delete_universe("uni-00000000"), NotFound, "not_found", None);
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let keep = universe(&mut s, "keep", "10.0.0.0/16");
        group(&mut s, &u.id, "web");
        let ep = s.create_endpoint(endpoint_req(&u.id, "ns1", "10.0.0.5", None), "h1").unwrap();
        refused(&mut s, |s| s.delete_universe(&u.id), Conflict, "in_use", None);
        s.delete_endpoint(&ep.id).unwrap();
        let rev = s.revision;
        s.delete_universe(&u.id).unwrap();
        assert_eq!(s.revision, rev + 1);
        assert!(!s.universes.contains_key(&u.id));
        assert!(s.groups.values().all(|g| g.universe == keep.id));
        assert_eq!(s.groups.len(), 1);
    }

    // ---- Groups ----

    #[test]
    fn s2_a_new_group_has_no_ingress_and_egress_all() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let rev = s.revision;
        let g = s
            .create_group(CreateGroup {
                universe: u.id.clone(),
                name: "web".into(),
                description: Some("w".into()),
            })
            .unwrap();
        assert_eq!(s.revision, rev + 1);
        assert!(is_id(&g.id, "sg"));
        assert_eq!(
            (g.name.as_str(), g.description.as_str(), g.universe.as_str()),
            ("web", "w", u.id.as_str())
        );
        assert!(g.ingress.is_empty());
        assert_s2_egress(&g);
        assert_eq!(s.groups[&g.id], g);
    }

    #[test]
    fn create_group_refusals_name_the_field() {
        use ErrorKind::*;
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let other = universe(&mut s, "other", "10.0.0.0/16");
        let req = |u: &str, name: &str, d: Option<String>| CreateGroup {
            universe: u.into(),
            name: name.into(),
            description: d,
        };
        refused(
            &mut s,
            |s| s.create_group(req("uni-00000000", "a", None)),
            NotFound,
            "not_found",
            Some("universe"),
        );
        refused(
            &mut s,
            |s| s.create_group(req(&u.id, "", None)),
            Invalid,
            "invalid_argument",
            Some("name"),
        );
        refused(
            &mut s,
            |s| s.create_group(req(&u.id, "a\nb", None)),
            Invalid,
            "invalid_argument",
            Some("name"),
        );
        refused(
            &mut s,
            |s| s.create_group(req(&u.id, "a", Some("d".repeat(256)))),
            Invalid,
            "invalid_argument",
            Some("description"),
        );
        refused(
            &mut s,
            |s| s.create_group(req(&u.id, DEFAULT_GROUP, None)),
            Conflict,
            "duplicate",
            Some("name"),
        );
        group(&mut s, &u.id, "web");
        refused(
            &mut s,
            |s| s.create_group(req(&u.id, "web", None)),
            Conflict,
            "duplicate",
            Some("name"),
        );
        // Names are per universe.
        group(&mut s, &other.id, "web");
    }

    #[test]
    fn delete_group_refuses_default_used_and_referenced_groups() {
        use ErrorKind::*;
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let default = default_group(&s, &u.id);
        refused(&mut s, |s| s.delete_group("sg-00000000"), NotFound, "not_found", None);
        refused(&mut s, |s| s.delete_group(&default), Conflict, "protected", None);

        let used = group(&mut s, &u.id, "used");
        let ep = s
            .create_endpoint(
                endpoint_req(&u.id, "ns1", "10.0.0.5", Some(vec![used.id.clone()])),
                "h",
            )
            .unwrap();
        refused(&mut s, |s| s.delete_group(&used.id), Conflict, "in_use", None);
        s.delete_endpoint(&ep.id).unwrap();

        let peer = group(&mut s, &u.id, "peer");
        let web = group(&mut s, &u.id, "web");
        let r = s
            .add_rule(&web.id, rule_req(json!({"direction": "ingress", "protocol": "tcp", "from_port": 22, "to_port": 22, "group": peer.id})))
            .unwrap();
        refused(&mut s, |s| s.delete_group(&peer.id), Conflict, "in_use", None);
        s.delete_rule(&web.id, &r.id).unwrap();

        // A rule that refers to its own group does not keep the group alive.
        s.add_rule(
            &peer.id,
            rule_req(json!({"direction": "ingress", "protocol": "all", "group": peer.id})),
        )
        .unwrap();
        let rev = s.revision;
        s.delete_group(&peer.id).unwrap();
        s.delete_group(&used.id).unwrap();
        assert_eq!(s.revision, rev + 2);
        assert!(!s.groups.contains_key(&peer.id));
    }

    // ---- Rules ----

    fn rule_setup() -> (State, Universe, SecurityGroup) {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let g = group(&mut s, &u.id, "web");
        (s, u, g)
    }

    #[test]
    fn add_rule_stores_a_validated_rule() {
        let (mut s, _, g) = rule_setup();
        let rev = s.revision;
        let r = s
            .add_rule(
                &g.id,
                rule_req(json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 443,
                    "cidr": "10.1.2.3/16", "description": "web"})),
            )
            .unwrap();
        assert_eq!(s.revision, rev + 1);
        assert!(is_id(&r.id, "sgr"));
        assert_eq!(r.direction, Direction::Ingress);
        assert_eq!(r.protocol, Protocol::TCP);
        assert_eq!(r.ports, Some((80, 443)));
        assert_eq!(r.icmp, None);
        assert_eq!(r.peer, Peer::Cidr(net("10.1.0.0/16")), "S4: stored canonical");
        assert_eq!(r.description, "web");
        assert_eq!(s.groups[&g.id].ingress, vec![r.clone()]);
        let e = s
            .add_rule(&g.id, rule_req(json!({"direction": "egress", "protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "fd00:1:2:3::5/48"})))
            .unwrap();
        assert_eq!(
            e.peer,
            Peer::Cidr(net("fd00:1:2::/48")),
            "S4: IPv6 peers are stored canonical too"
        );
        assert!(s.groups[&g.id].egress.contains(&e));
        let egress = &s.groups[&g.id].egress;
        assert!(egress.windows(2).all(|w| w[0].id < w[1].id), "in the order of rule ids");
    }

    #[test]
    fn s4_protocols_normalize_names_numbers_and_numeric_strings() {
        let (mut s, _, g) = rule_setup();
        let cases = [
            (json!("tcp"), Protocol::TCP),
            (json!(6), Protocol::TCP),
            (json!("6"), Protocol::TCP),
            (json!("UDP"), Protocol::UDP),
            (json!(17), Protocol::UDP),
            (json!("icmp"), Protocol::ICMP),
            (json!(1), Protocol::ICMP),
            (json!("icmpv6"), Protocol::ICMPV6),
            (json!("58"), Protocol::ICMPV6),
            (json!("all"), Protocol::All),
            (json!(47), Protocol::Number(47)),
            (json!("0"), Protocol::Number(0)),
            (json!(255), Protocol::Number(255)),
        ];
        for (i, (protocol, expected)) in cases.into_iter().enumerate() {
            // ICMPv6 travels in IPv6 only: its rules take an IPv6 CIDR to match anything.
            let cidr = if expected == Protocol::ICMPV6 {
                format!("fd00:{i}::/32")
            } else {
                format!("10.0.{i}.0/24")
            };
            let mut body = json!({"direction": "ingress", "protocol": protocol, "cidr": cidr});
            if expected == Protocol::TCP || expected == Protocol::UDP {
                body["from_port"] = json!(1);
                body["to_port"] = json!(2);
            }
            let r = s.add_rule(&g.id, rule_req(body)).unwrap();
            assert_eq!(r.protocol, expected, "{protocol}");
            if expected == Protocol::ICMP || expected == Protocol::ICMPV6 {
                assert_eq!(r.icmp, Some((None, None)), "icmp defaults to any type, any code");
            }
        }
    }

    #[test]
    fn add_rule_refusals_name_the_field() {
        use ErrorKind::*;
        let (mut s, _, g) = rule_setup();
        let other_u = universe(&mut s, "other", "10.0.0.0/16");
        let foreign = group(&mut s, &other_u.id, "foreign");
        let tcp = |extra: serde_json::Value| {
            let mut b = json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": "10.0.0.0/8"});
            for (k, v) in extra.as_object().unwrap() {
                if v.is_null() {
                    b.as_object_mut().unwrap().remove(k);
                } else {
                    b[k] = v.clone();
                }
            }
            b
        };
        let invalid = [
            (tcp(json!({"direction": "sideways"})), "direction"),
            (tcp(json!({"protocol": "gre"})), "protocol"),
            (tcp(json!({"protocol": 256})), "protocol"),
            (tcp(json!({"protocol": -1})), "protocol"),
            (tcp(json!({"protocol": "-1"})), "protocol"),
            (tcp(json!({"protocol": 6.5})), "protocol"),
            (tcp(json!({"protocol": ""})), "protocol"),
            (tcp(json!({"from_port": null})), "from_port"),
            (tcp(json!({"to_port": null})), "to_port"),
            (tcp(json!({"from_port": -1})), "from_port"),
            (tcp(json!({"to_port": 65536})), "to_port"),
            (tcp(json!({"from_port": 10, "to_port": 9})), "from_port"),
            (tcp(json!({"icmp_type": 8})), "icmp_type"),
            (tcp(json!({"icmp_code": 0})), "icmp_code"),
            (
                tcp(
                    json!({"protocol": "icmp", "from_port": null, "to_port": null, "icmp_code": 3}),
                ),
                "icmp_code",
            ),
            (
                tcp(
                    json!({"protocol": "icmp", "from_port": null, "to_port": null, "icmp_type": -1, "icmp_code": 3}),
                ),
                "icmp_code",
            ),
            (
                tcp(
                    json!({"protocol": "icmp", "from_port": null, "to_port": null, "icmp_type": 256}),
                ),
                "icmp_type",
            ),
            (
                tcp(
                    json!({"protocol": "icmp", "from_port": null, "to_port": null, "icmp_type": -2}),
                ),
                "icmp_type",
            ),
            (
                tcp(
                    json!({"protocol": "icmp", "from_port": null, "to_port": null, "icmp_type": 3, "icmp_code": 256}),
                ),
                "icmp_code",
            ),
            (tcp(json!({"protocol": "icmp", "to_port": null})), "from_port"),
            (tcp(json!({"protocol": "icmpv6", "from_port": null})), "to_port"),
            (tcp(json!({"protocol": "all", "to_port": null})), "from_port"),
            (
                tcp(json!({"protocol": 47, "from_port": null, "to_port": null, "icmp_type": 1})),
                "icmp_type",
            ),
            (
                tcp(json!({"protocol": "all", "from_port": null, "to_port": null, "icmp_code": 1})),
                "icmp_code",
            ),
            (tcp(json!({"cidr": null})), "cidr"),
            (tcp(json!({"group": g.id})), "cidr"),
            (tcp(json!({"cidr": "10.0.0.300/8"})), "cidr"),
            (tcp(json!({"cidr": "10.0.0.1"})), "cidr"),
            (tcp(json!({"cidr": "10.0.0.0/33"})), "cidr"),
            (tcp(json!({"description": "x".repeat(256)})), "description"),
        ];
        // A peer group of another universe does not exist in this one.
        let err = s
            .add_rule(&g.id, rule_req(tcp(json!({"cidr": null, "group": foreign.id}))))
            .unwrap_err();
        assert_eq!(
            (err.kind, err.code, err.field.as_deref()),
            (NotFound, "not_found", Some("group"))
        );
        for (body, field) in invalid {
            let text = body.to_string();
            let err = s.add_rule(&g.id, rule_req(body)).expect_err(&text);
            assert_eq!(
                (err.kind, err.code, err.field.as_deref()),
                (Invalid, "invalid_argument", Some(field)),
                "{text}: {err:?}"
            );
            assert!(err.message.starts_with(field), "{}", err.message);
        }
        refused(
            &mut s,
            |s| s.add_rule(&g.id, rule_req(tcp(json!({"cidr": null, "group": "sg-00000000"})))),
            NotFound,
            "not_found",
            Some("group"),
        );
        refused(
            &mut s,
            |s| s.add_rule("sg-00000000", rule_req(tcp(json!({})))),
            NotFound,
            "not_found",
            None,
        );
        assert_eq!(s.groups[&g.id].ingress.len(), 0);
    }

    #[test]
    fn s4_exact_duplicate_rule_is_a_conflict() {
        use ErrorKind::*;
        let (mut s, u, g) = rule_setup();
        let body = json!({"direction": "ingress", "protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8", "description": "a"});
        s.add_rule(&g.id, rule_req(body.clone())).unwrap();
        let mut again = body.clone();
        again["cidr"] = json!("10.9.9.9/8"); // the same CIDR once canonical
        again["description"] = json!("other words, same rule");
        again["protocol"] = json!(6);
        refused(&mut s, |s| s.add_rule(&g.id, rule_req(again)), Conflict, "duplicate", None);
        // Any difference makes another rule.
        for change in [
            json!({"direction": "egress"}),
            json!({"to_port": 23}),
            json!({"protocol": "udp"}),
            json!({"cidr": "10.0.0.0/9"}),
            json!({"cidr": null, "group": default_group(&s, &u.id)}),
        ] {
            let mut b = body.clone();
            for (k, v) in change.as_object().unwrap() {
                if v.is_null() {
                    b.as_object_mut().unwrap().remove(k);
                } else {
                    b[k] = v.clone();
                }
            }
            s.add_rule(&g.id, rule_req(b)).unwrap();
        }
        let icmp = json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 8, "cidr": "0.0.0.0/0"});
        s.add_rule(&g.id, rule_req(icmp.clone())).unwrap();
        let mut explicit_any = icmp.clone();
        explicit_any["icmp_code"] = json!(-1);
        refused(&mut s, |s| s.add_rule(&g.id, rule_req(explicit_any)), Conflict, "duplicate", None);
        let mut code = icmp;
        code["icmp_code"] = json!(0);
        s.add_rule(&g.id, rule_req(code)).unwrap();
    }

    #[test]
    fn s12_a_group_holds_at_most_1000_rules() {
        let (mut s, _, g) = rule_setup();
        // Two S2 egress rules are there already.
        for port in 0..(MAX_RULES_PER_GROUP - 2) {
            s.add_rule(&g.id, rule_req(json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "cidr": "10.0.0.0/8"})))
                .unwrap();
        }
        let err = refused(
            &mut s,
            |s| {
                s.add_rule(&g.id, rule_req(json!({"direction": "egress", "protocol": "udp", "from_port": 1, "to_port": 1, "cidr": "10.0.0.0/8"})))
            },
            ErrorKind::Conflict,
            "limit_exceeded",
            None,
        );
        assert!(err.message.contains("1000"), "{}", err.message);
    }

    #[test]
    fn delete_rule_removes_it_or_says_not_found() {
        use ErrorKind::*;
        let (mut s, _, g) = rule_setup();
        let egress = s.groups[&g.id].egress[0].id.clone();
        refused(&mut s, |s| s.delete_rule(&g.id, "sgr-00000000"), NotFound, "not_found", None);
        refused(&mut s, |s| s.delete_rule("sg-00000000", &egress), NotFound, "not_found", None);
        let rev = s.revision;
        s.delete_rule(&g.id, &egress).unwrap();
        assert_eq!(s.revision, rev + 1);
        assert_eq!(s.groups[&g.id].egress.len(), 1);
        refused(&mut s, |s| s.delete_rule(&g.id, &egress), NotFound, "not_found", None);
    }

    #[test]
    fn rules_round_trip_through_the_stored_json() {
        let (mut s, u, g) = rule_setup();
        for body in [
            json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 3, "icmp_code": 4, "cidr": "10.0.0.0/8"}),
            json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 8, "cidr": "10.0.0.0/8"}),
            json!({"direction": "ingress", "protocol": "icmpv6", "cidr": "::/0"}),
            json!({"direction": "egress", "protocol": 47, "group": default_group(&s, &u.id)}),
        ] {
            s.add_rule(&g.id, rule_req(body)).unwrap();
        }
        s.create_endpoint(endpoint_req(&u.id, "ns", "10.0.0.9", None), "h").unwrap();
        let text = serde_json::to_string(&s).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    // ---- Endpoints ----

    #[test]
    fn create_endpoint_derives_mac_interface_and_default_group() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let rev = s.revision;
        let ep = s.create_endpoint(endpoint_req(&u.id, "ns1", "10.0.3.4", None), "h1").unwrap();
        assert_eq!(s.revision, rev + 1);
        assert!(is_id(&ep.id, "ep"));
        let hex = &ep.id[3..];
        assert_eq!(ep.interface, format!("vx{hex}"));
        assert!(ep.interface.len() <= 15);
        let mac = parse_mac(&ep.mac).unwrap();
        assert_eq!(mac[0], 0x02, "locally administered, unicast");
        assert_eq!(hex_bytes::<4>(hex), mac[2..6]);
        assert_eq!(
            (ep.host.as_str(), ep.netns.as_str(), ep.ip),
            ("h1", "ns1", Ipv4Addr::new(10, 0, 3, 4))
        );
        assert_eq!(
            ep.security_groups,
            vec![default_group(&s, &u.id)],
            "S3: default group when absent"
        );
        assert_eq!(ep.identity, 1);
        assert_eq!(
            s.identities[&1],
            Identity { universe: u.id.clone(), groups: ep.security_groups.clone() }
        );
        assert_eq!(s.endpoints[&ep.id], ep);

        let other = s
            .create_endpoint(
                CreateEndpoint {
                    host: Some("h2".into()),
                    ..endpoint_req(&u.id, "ns1", "10.0.3.5", None)
                },
                "h1",
            )
            .unwrap();
        assert_eq!(other.host, "h2");
        assert_eq!(other.identity, 1, "same universe and groups, same identity");
        assert_ne!(other.mac, ep.mac);
    }

    #[test]
    fn s7_endpoint_serials_increase_and_are_never_reused() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let a = s.create_endpoint(endpoint_req(&u.id, "a", "10.0.0.5", None), "h").unwrap();
        let b = s.create_endpoint(endpoint_req(&u.id, "b", "10.0.0.6", None), "h").unwrap();
        assert_eq!((a.serial, b.serial), (1, 2));
        s.delete_endpoint(&b.id).unwrap();
        // The same address, namespace and host again: a new serial.
        let b2 = s.create_endpoint(endpoint_req(&u.id, "b", "10.0.0.6", None), "h").unwrap();
        assert_eq!(b2.serial, 3);
        assert_eq!(s.serials_issued, 3);
        let mut back: State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        s.delete_endpoint(&b2.id).unwrap();
        back.delete_endpoint(&b2.id).unwrap();
        let c = back.create_endpoint(endpoint_req(&u.id, "c", "10.0.0.7", None), "h").unwrap();
        assert_eq!(c.serial, 4, "the counter is part of the persisted state");
    }

    #[test]
    fn s14_budgets_default_fit_their_host_and_are_never_over_committed() {
        use dataplane_common::capacity::CONNTRACK;
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let req = |netns: &str, ip: &str, budget: Option<i64>| CreateEndpoint {
            conntrack_budget: budget,
            ..endpoint_req(&u.id, netns, ip, None)
        };
        let a = s.create_endpoint(req("a", "10.0.0.5", None), "h1").unwrap();
        assert_eq!(a.conntrack_budget, DEFAULT_CONNTRACK_BUDGET);
        for bad in [0, -1, i64::from(CONNTRACK) + 1, i64::MAX] {
            let e = refused(
                &mut s,
                |s| s.create_endpoint(req("b", "10.0.0.6", Some(bad)), "h1"),
                ErrorKind::Invalid,
                "invalid_argument",
                Some("conntrack_budget"),
            );
            assert!(e.message.starts_with("conntrack_budget: "), "{}", e.message);
        }
        // The rest of h1's capacity fits exactly; one flow more does not.
        let left = i64::from(CONNTRACK - DEFAULT_CONNTRACK_BUDGET);
        let e = refused(
            &mut s,
            |s| s.create_endpoint(req("b", "10.0.0.6", Some(left + 1)), "h1"),
            ErrorKind::Conflict,
            "limit_exceeded",
            Some("conntrack_budget"),
        );
        assert!(e.message.contains(&format!("leave {left} of")), "{}", e.message);
        let b = s.create_endpoint(req("b", "10.0.0.6", Some(left)), "h1").unwrap();
        refused(
            &mut s,
            |s| s.create_endpoint(req("c", "10.0.0.7", Some(1)), "h1"),
            ErrorKind::Conflict,
            "limit_exceeded",
            Some("conntrack_budget"),
        );
        // Another host has its own capacity; a deletion gives the budget back.
        s.create_endpoint(req("c", "10.0.0.7", Some(i64::from(CONNTRACK))), "h2").unwrap();
        s.delete_endpoint(&b.id).unwrap();
        s.create_endpoint(req("d", "10.0.0.8", Some(1)), "h1").unwrap();
        let reserved: u64 = s
            .endpoints
            .values()
            .filter(|e| e.host == "h1")
            .map(|e| u64::from(e.conntrack_budget))
            .sum();
        assert!(reserved <= u64::from(CONNTRACK));
    }

    #[test]
    fn slots_are_per_host_the_smallest_free_from_1() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let mk = |s: &mut State, n: &str, ip: &str, host: &str| {
            s.create_endpoint(endpoint_req(&u.id, n, ip, None), host).unwrap()
        };
        let a = mk(&mut s, "a", "10.0.0.5", "h1");
        let b = mk(&mut s, "b", "10.0.0.6", "h1");
        let c = mk(&mut s, "c", "10.0.0.7", "h2");
        assert_eq!((a.slot, b.slot, c.slot), (1, 2, 1));
        s.delete_endpoint(&a.id).unwrap();
        assert_eq!(mk(&mut s, "d", "10.0.0.8", "h1").slot, 1);
    }

    #[test]
    fn a_legacy_state_gets_serials_slots_and_budgets_the_same_way_on_every_host() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        for (n, ip) in [("a", "10.0.0.5"), ("b", "10.0.0.6")] {
            s.create_endpoint(endpoint_req(&u.id, n, ip, None), "h").unwrap();
        }
        let mut legacy = s.clone();
        legacy.vnis_issued = 0;
        legacy.serials_issued = 0;
        legacy.endpoints.update_all(|_, e| (e.serial, e.slot, e.conntrack_budget) = (0, 0, 0));
        let mut one = legacy.clone();
        one.complete_legacy();
        let mut two = legacy;
        two.complete_legacy();
        assert_eq!(one, two);
        assert_eq!((one.vnis_issued, one.serials_issued), (1, 2));
        let mut serials: Vec<u64> = one.endpoints.values().map(|e| e.serial).collect();
        serials.sort_unstable();
        assert_eq!(serials, [1, 2]);
        assert!(one
            .endpoints
            .values()
            .all(|e| e.slot > 0 && e.conntrack_budget == DEFAULT_CONNTRACK_BUDGET));
        let mut done = s.clone();
        done.complete_legacy();
        assert_eq!(done, s, "a no-op on a current state");
    }

    fn hex_bytes<const N: usize>(text: &str) -> [u8; N] {
        let mut out = [0; N];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn create_endpoint_refusals_name_the_field() {
        use ErrorKind::*;
        let mut s = State::default();
        let u = s
            .create_universe(CreateUniverse {
                name: "u".into(),
                cidr: None,
                cidrs: Some(vec!["10.0.0.0/24".into(), "10.9.0.0/30".into()]),
                ipv6_cidrs: None,
            })
            .unwrap();
        let other_u = universe(&mut s, "o", "10.0.0.0/24");
        let foreign = group(&mut s, &other_u.id, "f");
        let web = group(&mut s, &u.id, "web");
        let ok = |ip: &str| endpoint_req(&u.id, "ns", ip, None);
        let invalid: Vec<(CreateEndpoint, &str)> = vec![
            (ok("banana"), "ip"),
            (ok("10.0.0.5/24"), "ip"),
            (ok("fd00::5"), "ip"),
            (ok("10.1.0.5"), "ip"),
            (ok("10.0.0.0"), "ip"),
            (ok("10.0.0.255"), "ip"),
            (ok("10.0.0.1"), "ip"),
            (ok("10.9.0.0"), "ip"),
            (ok("10.9.0.1"), "ip"),
            (ok("10.9.0.3"), "ip"),
            (CreateEndpoint { netns: "".into(), ..ok("10.0.0.5") }, "netns"),
            (CreateEndpoint { netns: "a/b".into(), ..ok("10.0.0.5") }, "netns"),
            (CreateEndpoint { netns: "..".into(), ..ok("10.0.0.5") }, "netns"),
            (CreateEndpoint { netns: "a b".into(), ..ok("10.0.0.5") }, "netns"),
            (CreateEndpoint { netns: "n".repeat(256), ..ok("10.0.0.5") }, "netns"),
            (CreateEndpoint { host: Some("".into()), ..ok("10.0.0.5") }, "host"),
            (CreateEndpoint { host: Some("a b".into()), ..ok("10.0.0.5") }, "host"),
            (CreateEndpoint { security_groups: Some(vec![]), ..ok("10.0.0.5") }, "security_groups"),
            (
                CreateEndpoint {
                    security_groups: Some(vec![
                        web.id.clone(),
                        default_group(&s, &u.id),
                        web.id.clone(),
                    ]),
                    ..ok("10.0.0.5")
                },
                "security_groups[2]",
            ),
        ];
        for (req, field) in invalid {
            let text = format!("{req:?}");
            let err = s.create_endpoint(req, "h").expect_err(&text);
            assert_eq!(
                (err.kind, err.code, err.field.as_deref()),
                (Invalid, "invalid_argument", Some(field)),
                "{text}: {err:?}"
            );
        } // A group of another universe does not exist in this one.
        let req = CreateEndpoint {
            security_groups: Some(vec![web.id.clone(), foreign.id.clone()]),
            ..ok("10.0.0.5")
        };
        let err = s.create_endpoint(req, "h").unwrap_err();
        assert_eq!(
            (err.kind, err.code, err.field.as_deref()),
            (NotFound, "not_found", Some("security_groups[1]"))
        );

        let err = s.create_endpoint(ok("fd00::5"), "h").unwrap_err();
        assert!(err.message.contains("IPv6"), "{}", err.message);
        refused(
            &mut s,
            |s| s.create_endpoint(endpoint_req("uni-00000000", "ns", "10.0.0.5", None), "h"),
            NotFound,
            "not_found",
            Some("universe"),
        );
        refused(
            &mut s,
            |s| {
                s.create_endpoint(
                    CreateEndpoint {
                        security_groups: Some(vec![web.id.clone(), "sg-00000000".into()]),
                        ..ok("10.0.0.5")
                    },
                    "h",
                )
            },
            NotFound,
            "not_found",
            Some("security_groups[1]"),
        );
        let many: Vec<String> =
            (0..17).map(|i| group(&mut s, &u.id, &format!("g{i}")).id).collect();
        refused(
            &mut s,
            |s| {
                s.create_endpoint(
                    CreateEndpoint { security_groups: Some(many.clone()), ..ok("10.0.0.5") },
                    "h",
                )
            },
            Conflict,
            "limit_exceeded",
            Some("security_groups"),
        );
        let sixteen = s
            .create_endpoint(
                CreateEndpoint { security_groups: Some(many[..16].to_vec()), ..ok("10.0.0.5") },
                "h",
            )
            .unwrap();
        assert_eq!(sixteen.security_groups.len(), 16, "S12: 16 groups are allowed");

        // Usable addresses at the edges of a CIDR, and of a /30.
        s.create_endpoint(endpoint_req(&u.id, "ns2", "10.0.0.2", None), "h").unwrap();
        s.create_endpoint(endpoint_req(&u.id, "ns3", "10.0.0.254", None), "h").unwrap();
        s.create_endpoint(endpoint_req(&u.id, "ns4", "10.9.0.2", None), "h").unwrap();

        refused(
            &mut s,
            |s| s.create_endpoint(endpoint_req(&u.id, "ns9", "10.0.0.5", None), "h"),
            Conflict,
            "duplicate",
            Some("ip"),
        );
        refused(
            &mut s,
            |s| s.create_endpoint(endpoint_req(&u.id, "ns", "10.0.0.6", None), "h"),
            Conflict,
            "duplicate",
            Some("netns"),
        );
        // The same address in another universe, the same namespace name on another host: fine.
        s.create_endpoint(endpoint_req(&other_u.id, "ns9", "10.0.0.5", None), "h").unwrap();
        s.create_endpoint(endpoint_req(&u.id, "ns", "10.0.0.6", None), "h2").unwrap();
    }

    #[test]
    fn identities_are_shared_allocated_smallest_first_and_collected() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let v = universe(&mut s, "v", "10.0.0.0/16");
        let a = group(&mut s, &u.id, "a").id;
        let b = group(&mut s, &u.id, "b").id;
        let ep = |s: &mut State, uni: &str, ns: &str, ip: &str, groups: Vec<String>| {
            s.create_endpoint(endpoint_req(uni, ns, ip, Some(groups)), "h").unwrap()
        };
        let e1 = ep(&mut s, &u.id, "n1", "10.0.0.11", vec![a.clone(), b.clone()]);
        let e2 = ep(&mut s, &u.id, "n2", "10.0.0.12", vec![b.clone(), a.clone()]);
        assert_eq!((e1.identity, e2.identity), (1, 1), "a set of groups: order does not matter");
        let mut ab = vec![a.clone(), b.clone()];
        ab.sort();
        assert_eq!(s.identities[&1].groups, ab);
        let e3 = ep(&mut s, &u.id, "n3", "10.0.0.13", vec![a.clone()]);
        assert_eq!(e3.identity, 2);
        let v_default = default_group(&s, &v.id);
        let e4 = ep(&mut s, &v.id, "n4", "10.0.0.13", vec![v_default]);
        assert_eq!(e4.identity, 3);

        // PATCH moves an endpoint to the identity of its new set (S5), collecting the old one.
        let rev = s.revision;
        let p =
            s.patch_endpoint(&e3.id, PatchEndpoint::groups(vec![b.clone(), a.clone()])).unwrap();
        assert_eq!(s.revision, rev + 1);
        assert_eq!(p.identity, 1);
        assert_eq!(p.security_groups, vec![b.clone(), a.clone()]);
        assert_eq!(s.endpoints[&e3.id], p);
        assert!(!s.identities.contains_key(&2), "identity 2 has no endpoint left");
        // The smallest free number is taken next.
        let p = s.patch_endpoint(&e2.id, PatchEndpoint::groups(vec![b.clone()])).unwrap();
        assert_eq!(p.identity, 2);
        // A number freed by an edit is not handed out by that same edit.
        let p = s.patch_endpoint(&e2.id, PatchEndpoint::groups(vec![a.clone()])).unwrap();
        assert_eq!(p.identity, 4);
        assert_eq!(s.identities.keys().copied().collect::<Vec<_>>(), vec![1, 3, 4]);

        s.delete_endpoint(&e4.id).unwrap();
        assert!(!s.identities.contains_key(&3));
        s.delete_endpoint(&e1.id).unwrap();
        assert!(s.identities.contains_key(&1), "e3 still has identity 1");
        s.delete_endpoint(&e3.id).unwrap();
        s.delete_endpoint(&e2.id).unwrap();
        assert!(s.identities.is_empty());
    }

    #[test]
    fn patch_and_delete_endpoint_refusals() {
        use ErrorKind::*;
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let o = universe(&mut s, "o", "10.0.0.0/16");
        let e = s.create_endpoint(endpoint_req(&u.id, "n", "10.0.0.5", None), "h").unwrap();
        let patch = PatchEndpoint::groups;
        refused(
            &mut s,
            |s| s.patch_endpoint("ep-00000000", patch(vec![])),
            NotFound,
            "not_found",
            None,
        );
        refused(
            &mut s,
            |s| s.patch_endpoint(&e.id, patch(vec![])),
            Invalid,
            "invalid_argument",
            Some("security_groups"),
        );
        let foreign = default_group(&s, &o.id);
        refused(
            &mut s,
            |s| s.patch_endpoint(&e.id, patch(vec![foreign])),
            NotFound,
            "not_found",
            Some("security_groups[0]"),
        );
        refused(
            &mut s,
            |s| s.patch_endpoint(&e.id, patch(vec!["sg-00000000".into()])),
            NotFound,
            "not_found",
            Some("security_groups[0]"),
        );
        let many: Vec<String> =
            (0..17).map(|i| group(&mut s, &u.id, &format!("g{i}")).id).collect();
        refused(
            &mut s,
            |s| s.patch_endpoint(&e.id, patch(many)),
            Conflict,
            "limit_exceeded",
            Some("security_groups"),
        );
        refused(&mut s, |s| s.delete_endpoint("ep-00000000"), NotFound, "not_found", None);
    }

    #[test]
    fn identity_numbers_run_out_with_a_conflict() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let g = default_group(&s, &u.id);
        for n in 1..=dataplane_common::MAX_IDENTITY {
            s.identities.insert(
                n,
                Identity { universe: "uni-elsewhere".into(), groups: vec![format!("sg-{n}")] },
            );
        }
        refused(
            &mut s,
            |s| s.create_endpoint(endpoint_req(&u.id, "n", "10.0.0.5", Some(vec![g])), "h"),
            ErrorKind::Conflict,
            "limit_exceeded",
            Some("security_groups"),
        );
    }

    #[test]
    fn gateway_is_the_first_host_of_the_containing_cidr() {
        let mut s = State::default();
        let u = s
            .create_universe(CreateUniverse {
                name: "u".into(),
                cidr: None,
                cidrs: Some(vec!["10.0.0.0/24".into(), "172.16.8.0/22".into()]),
                ipv6_cidrs: None,
            })
            .unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(gateway(&u, ip("10.0.0.77")), Some(ip("10.0.0.1")));
        assert_eq!(gateway(&u, ip("172.16.10.3")), Some(ip("172.16.8.1")));
        assert_eq!(cidr_of(&u, ip("172.16.10.3")), Some("172.16.8.0/22".parse().unwrap()));
        assert_eq!(gateway(&u, ip("10.0.1.1")), None);
        assert_eq!(cidr_of(&u, ip("10.0.1.1")), None);
    }

    #[test]
    fn parse_mac_accepts_only_six_hex_pairs() {
        assert_eq!(parse_mac("02:00:0a:ff:10:01"), Some([2, 0, 0x0a, 0xff, 0x10, 1]));
        for bad in
            ["", "02:00:0a:ff:10", "02:00:0a:ff:10:01:02", "2:00:0a:ff:10:01", "02:00:0a:ff:10:zz"]
        {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_edit_bumps_the_revision_once() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        assert_eq!(s.revision, 1);
        let g = group(&mut s, &u.id, "g");
        assert_eq!(s.revision, 2);
        let r = s
            .add_rule(
                &g.id,
                rule_req(json!({"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"})),
            )
            .unwrap();
        assert_eq!(s.revision, 3);
        let e = s.create_endpoint(endpoint_req(&u.id, "n", "10.0.0.5", None), "h").unwrap();
        assert_eq!(s.revision, 4);
        s.patch_endpoint(&e.id, PatchEndpoint::groups(vec![g.id.clone()])).unwrap();
        assert_eq!(s.revision, 5);
        s.delete_rule(&g.id, &r.id).unwrap();
        assert_eq!(s.revision, 6);
        s.delete_endpoint(&e.id).unwrap();
        assert_eq!(s.revision, 7);
        s.delete_group(&g.id).unwrap();
        assert_eq!(s.revision, 8);
        s.delete_universe(&u.id).unwrap();
        assert_eq!(s.revision, 9);
    }

    fn token_req(role: Role, universe: Option<&str>, expires: Option<&str>) -> CreateToken {
        CreateToken {
            role,
            universe: universe.map(str::to_owned),
            expires: expires.map(str::to_owned),
            description: None,
        }
    }

    fn secret(id: &str, now: SystemTime) -> TokenSecret {
        TokenSecret { id: id.into(), hash: "ab".repeat(32), now }
    }

    #[test]
    fn request_times_are_rfc3339_in_utc_or_spans_of_whole_units_and_nothing_else() {
        let at = |t: &str| Some(Time::At(humantime::parse_rfc3339(t).unwrap()));
        let span = |secs: u64| Some(Time::Span(Duration::from_secs(secs)));
        assert_eq!(parse_time("2027-01-01T00:00:00Z"), at("2027-01-01T00:00:00Z"));
        assert_eq!(parse_time("2028-02-29T23:59:59.5Z"), at("2028-02-29T23:59:59.5Z"));
        assert_eq!(parse_time("90d"), span(90 * 86_400));
        assert_eq!(parse_time("1h 30m"), span(5400));
        assert_eq!(parse_time("0s"), span(0));
        assert_eq!(parse_time("2y 1w 1s"), span(2 * 365 * 86_400 + 7 * 86_400 + 1));
        for bad in [
            "",
            " 1h",
            "1h ",
            "1h  30m",
            "1 h",
            "01h",
            "1.5h",
            "\u{80}",
            "1h\u{e9}",
            "1H",
            "1M",
            "1000000000s",
            "h",
            "1",
            "2027-01-01t00:00:00z",
            "2027-01-01 00:00:00Z",
            "2027-01-01T00:00:00",
            "2027-01-01T00:00:00+00:00",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00.1234567890Z",
            "2027-02-30T00:00:00Z",
            "2027-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "+2027-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tokens_s15_scope_matches_the_role_and_expiry_is_in_the_future() {
        let mut s = State::default();
        let u = universe(&mut s, "blue", "10.1.0.0/16");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = s.create_token(token_req(Role::Admin, None, None), &secret("tok-1", now)).unwrap();
        assert_eq!((t.role, t.universe.as_deref(), t.expires), (Role::Admin, None, None));
        assert_eq!(s.revision, 2, "a token is an edit of the desired state (S13)");
        let t = s
            .create_token(token_req(Role::Editor, Some(&u.id), Some("90d")), &secret("tok-2", now))
            .unwrap();
        assert_eq!(t.expires, Some(Timestamp(now + Duration::from_secs(90 * 86400))));
        assert!(!t.expired(now) && t.expired(now + Duration::from_secs(90 * 86400)));
        let t = s
            .create_token(
                token_req(Role::Viewer, None, Some("2027-06-01T08:00:00Z")),
                &secret("tok-3", now),
            )
            .unwrap();
        assert_eq!(t.expires.unwrap().to_string(), "2027-06-01T08:00:00Z");

        let inv = ErrorKind::Invalid;
        let admin_in_universe = token_req(Role::Admin, Some(&u.id), None);
        refused(
            &mut s,
            |s| s.create_token(admin_in_universe, &secret("tok-4", now)),
            inv,
            "invalid_argument",
            Some("universe"),
        );
        refused(
            &mut s,
            |s| s.create_token(token_req(Role::Editor, None, None), &secret("tok-4", now)),
            inv,
            "invalid_argument",
            Some("universe"),
        );
        refused(
            &mut s,
            |s| {
                s.create_token(
                    token_req(Role::Viewer, Some("uni-00000000"), None),
                    &secret("t", now),
                )
            },
            ErrorKind::NotFound,
            "not_found",
            Some("universe"),
        );
        for bad in ["yesterday", "2020-01-01T00:00:00Z", "0s", "20y"] {
            let req = token_req(Role::Viewer, None, Some(bad));
            let err = refused(
                &mut s,
                |s| s.create_token(req, &secret("tok-5", now)),
                inv,
                "invalid_argument",
                Some("expires"),
            );
            assert!(err.message.contains(bad), "{err:?}");
        }
        refused(
            &mut s,
            |s| s.create_token(token_req(Role::Admin, None, None), &secret("tok-1", now)),
            ErrorKind::Conflict,
            "duplicate",
            None,
        );
        // The secret's hash is stored; serialized tokens round-trip.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
    }

    #[test]
    fn deleting_a_universe_revokes_its_tokens_and_deleting_a_token_bumps_the_revision() {
        let mut s = State::default();
        let blue = universe(&mut s, "blue", "10.1.0.0/16");
        let red = universe(&mut s, "red", "10.2.0.0/16");
        let now = SystemTime::now();
        for (id, u) in [("tok-b", &blue.id), ("tok-r", &red.id)] {
            s.create_token(token_req(Role::Viewer, Some(u), None), &secret(id, now)).unwrap();
        }
        s.delete_universe(&blue.id).unwrap();
        assert_eq!(s.tokens.keys().collect::<Vec<_>>(), ["tok-r"]);
        let rev = s.revision;
        s.delete_token("tok-r").unwrap();
        assert_eq!(s.revision, rev + 1);
        refused(&mut s, |s| s.delete_token("tok-r"), ErrorKind::NotFound, "not_found", None);
    }

    // ---- Linear checks, strict CIDRs ----

    /// The pairwise definition [`first_overlap`] replaces.
    fn first_overlap_pairwise(cidrs: &[Ipv4Network]) -> Option<(usize, usize)> {
        (0..cidrs.len()).find_map(|i| (0..i).find(|&j| cidrs[j].overlaps(cidrs[i])).map(|j| (i, j)))
    }

    proptest::proptest! {
        #[test]
        fn first_overlap_agrees_with_comparing_every_pair(
            raw in proptest::collection::vec((0u32..64, 24u8..=30), 0..40)
        ) {
            // Few distinct addresses and prefixes, so that overlaps, nesting and duplicates
            // are common.
            let cidrs: Vec<Ipv4Network> = raw
                .iter()
                .map(|&(a, p)| {
                    let addr = Ipv4Addr::from(0x0a00_0000 | (a << 4));
                    let n = Ipv4Network::new(addr, p).unwrap();
                    Ipv4Network::new(n.network(), p).unwrap()
                })
                .collect();
            let ranges: Vec<(u128, u128)> = cidrs
                .iter()
                .map(|c| (u128::from(u32::from(c.network())), u128::from(u32::from(c.broadcast()))))
                .collect();
            proptest::prop_assert_eq!(first_overlap(&ranges), first_overlap_pairwise(&cidrs));
        }

        /// The same over IPv6 blocks, whose numbers use the top bits of the u128 too.
        #[test]
        fn first_overlap_agrees_with_comparing_every_pair_in_ipv6(
            raw in proptest::collection::vec((0u128..64, 56u8..=62), 0..40)
        ) {
            let cidrs: Vec<Ipv6Network> = raw
                .iter()
                .map(|&(a, p)| {
                    let addr = Ipv6Addr::from(0xfd00_00ab_cd00_0000u128 << 64 | (a << 66));
                    let n = Ipv6Network::new(addr, p).unwrap();
                    Ipv6Network::new(n.network(), p).unwrap()
                })
                .collect();
            let ranges: Vec<(u128, u128)> =
                cidrs.iter().map(|c| (u128::from(c.network()), u128::from(c.broadcast()))).collect();
            let pairwise = (0..cidrs.len())
                .find_map(|i| (0..i).find(|&j| ranges[j].0 <= ranges[i].1 && ranges[i].0 <= ranges[j].1).map(|j| (i, j)));
            proptest::prop_assert_eq!(first_overlap(&ranges), pairwise);
        }
    }

    #[test]
    fn forty_thousand_universe_cidrs_are_checked_in_well_under_a_second() {
        // 40,000 disjoint /30s, shuffled, plus one that overlaps the 20,000th.
        let mut texts: Vec<String> =
            (0..40_000u32).map(|i| format!("{}/30", Ipv4Addr::from(0x0a00_0000 + i * 4))).collect();
        let mut rng = rand::rng();
        rand::seq::SliceRandom::shuffle(&mut texts[..], &mut rng);
        let req = CreateUniverse {
            name: "big".into(),
            cidr: None,
            cidrs: Some(texts.clone()),
            ipv6_cidrs: None,
        };
        let start = std::time::Instant::now();
        let new = req.check().unwrap();
        let took = start.elapsed();
        eprintln!("40,000 CIDRs checked in {took:?}");

        assert_eq!(new.cidrs.len(), 40_000);
        // A debug build on a busy machine; an optimized one takes a few milliseconds.
        assert!(took < std::time::Duration::from_millis(800), "checking took {took:?}");
        let mut s = State::default();
        let start = std::time::Instant::now();
        s.add_universe(new).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_millis(100), "{:?}", start.elapsed());

        let duplicate = texts[20_000].clone();
        texts.push(duplicate);
        let req =
            CreateUniverse { name: "big".into(), cidr: None, cidrs: Some(texts), ipv6_cidrs: None };
        let start = std::time::Instant::now();
        let err = req.check().unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_millis(800));
        assert_eq!(err.field.as_deref(), Some("cidrs[40000]"), "{err:?}");
        assert!(err.message.contains("(cidrs[20000])"), "{}", err.message);
    }

    #[test]
    fn cidrs_are_parsed_strictly() {
        for bad in [
            "10/8",
            "010.0.0.0/8",
            "10.0.0.0/08",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0//8",
            "fd00::/129",
            "fd00::/0128",
            "[fd00::]/64",
            "fd00::%1/64",
        ] {
            let err = parse_cidr("cidr", bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("cidr"), "{bad}");
        }
        for (good, canonical) in [
            ("10.1.2.3/16", "10.1.0.0/16"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("FD00::1/64", "fd00::/64"),
            ("::/0", "::/0"),
        ] {
            assert_eq!(parse_cidr("cidr", good).unwrap().to_string(), canonical);
        }
    }

    #[test]
    fn ipv4_mapped_rule_cidrs_are_the_ipv4_rule_they_mean() {
        let mut s = State::default();
        let u = universe(&mut s, "u", "10.0.0.0/16");
        let g = group(&mut s, &u.id, "g");
        for (text, stored) in [
            ("::ffff:10.1.0.0/112", "10.1.0.0/16"),
            ("::FFFF:192.168.1.7/128", "192.168.1.7/32"),
            ("0:0:0:0:0:ffff:a00:0/104", "10.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
        ] {
            let r = s
                .add_rule(
                    &g.id,
                    rule_req(json!({"direction": "ingress", "protocol": "tcp", "from_port": 1,
                        "to_port": 1, "cidr": text})),
                )
                .unwrap();
            assert_eq!(r.peer, Peer::Cidr(net(stored)), "{text}");
        }
        // The same rule written the IPv4 way is a duplicate of the mapped one (S4).
        refused(
            &mut s,
            |s| {
                s.add_rule(
                    &g.id,
                    rule_req(json!({"direction": "ingress", "protocol": "tcp", "from_port": 1,
                        "to_port": 1, "cidr": "10.1.0.0/16"})),
                )
            },
            ErrorKind::Conflict,
            "duplicate",
            None,
        );
        // Shorter than /96 it covers more than IPv4 and stays an IPv6 CIDR.
        let r = s
            .add_rule(
                &g.id,
                rule_req(
                    json!({"direction": "ingress", "protocol": "all", "cidr": "::ffff:0:0/95"}),
                ),
            )
            .unwrap();
        assert!(matches!(r.peer, Peer::Cidr(IpNetwork::V6(_))));
        // Universes are IPv4 only, mapped or not.
        let err = s
            .create_universe(CreateUniverse {
                name: "m".into(),
                cidr: Some("::ffff:10.0.0.0/112".into()),
                cidrs: None,
                ipv6_cidrs: None,
            })
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("cidr"));
    }
}
