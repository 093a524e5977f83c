//! The OpenAPI 3.0 description of the REST API (`GET /v1/openapi.json`).
//!
//! Contract: the document is as strict as the server. Every request schema has the server's
//! required fields, types, ranges, lengths and patterns, and `additionalProperties: false`;
//! the combinations the server enforces between fields are spelled out with `oneOf`/`anyOf`/
//! `not` (exactly one of `cidr` and `cidrs`; exactly one peer; ports for TCP and UDP only, ICMP
//! type and code for ICMP only, a code only with a type). So a request the document declares
//! valid is refused only for what a schema cannot say (stated in the descriptions): ids that
//! do not exist (404), conflicts with the state (409), a universe's CIDRs overlapping each
//! other, `from_port` above `to_port`, and an endpoint address outside its universe or reserved
//! there (400). And a request it declares invalid is refused. The API fuzz (schemathesis, in
//! `cargo xtask test`) checks both against a running versed.
//!
//! Every operation lists every status it can answer, including the limits' 408, 413 and 429
//! ([`crate::limits`]), and access's 401 (every operation but `/healthz` and
//! `/v1/openapi.json` needs a principal: the `bearer` security scheme) and 403 (a role the
//! operation is not granted to, [`crate::auth::GRANTS`], or a permission etcd refuses this
//! host, on every operation that reaches the store).

use serde_json::{json, Value};

/// An IPv4 address as `std::net::Ipv4Addr` parses it: four decimal octets, no leading zeros.
const IPV4: &str = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}";

/// An IPv6 address as `std::net::Ipv6Addr` parses it: the `IPv6address` rule of RFC 3986
/// (section 3.2.2), which that parser follows exactly.
fn ipv6() -> String {
    let h16 = "[0-9A-Fa-f]{1,4}";
    let ls32 = format!("(?:{h16}:{h16}|{IPV4})");
    let rep = |n: u32| format!("(?:{h16}:){{{n}}}");
    let upto = |n: u32| format!("(?:(?:{h16}:){{0,{n}}}{h16})?");
    let alternatives = [
        format!("{}{ls32}", rep(6)),
        format!("::{}{ls32}", rep(5)),
        format!("(?:{h16})?::{}{ls32}", rep(4)),
        format!("{}::{}{ls32}", upto(1), rep(3)),
        format!("{}::{}{ls32}", upto(2), rep(2)),
        format!("{}::{h16}:{ls32}", upto(3)),
        format!("{}::{ls32}", upto(4)),
        format!("{}::{h16}", upto(5)),
        format!("{}::", upto(6)),
    ];
    format!("(?:{})", alternatives.join("|"))
}

/// A decimal prefix length without leading zeros, up to 32 / 128.
const PREFIX_V4: &str = "(?:3[0-2]|[12]?[0-9])";
const PREFIX_V6: &str = "(?:12[0-8]|1[01][0-9]|[1-9]?[0-9])";
/// The prefixes a universe CIDR may have: /8 to /30.
const PREFIX_UNIVERSE: &str = "(?:[89]|[12][0-9]|30)";

/// The prefixes an IPv6 universe CIDR may have: /44 to /64.
const PREFIX_UNIVERSE_V6: &str = "(?:4[4-9]|5[0-9]|6[0-4])";

/// Characters `char::is_control` is true of.
const CONTROL: &str = r"\x00-\x1f\x7f-\x9f";
/// Characters `char::is_whitespace` is true of that are not control characters.
const SPACE: &str = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// A name: no control character, not blank (what `check_name` accepts), 1 to 255 characters.
fn name() -> Value {
    json!({
        "type": "string", "minLength": 1, "maxLength": 255,
        "pattern": format!("^[^{CONTROL}]*[^{CONTROL}{SPACE}][^{CONTROL}]*$"),
    })
}

/// A description: no control character, at most 255 characters.
fn description() -> Value {
    json!({ "type": "string", "maxLength": 255, "pattern": format!("^[^{CONTROL}]*$") })
}

/// `tcp`, `udp` or their numbers; `icmp`, `icmpv6` or theirs; everything else. Names in any
/// case, numbers as JSON numbers or decimal strings without leading zeros.
fn protocol(family: &str) -> Value {
    let ci = |word: &str| -> String {
        word.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase())
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let (words, numbers): (Vec<String>, Vec<u8>) = match family {
        "ports" => (vec![ci("tcp"), ci("udp")], vec![6, 17]),
        "icmp" => (vec![ci("icmp"), ci("icmpv6")], vec![1, 58]),
        _ => (vec![ci("all")], vec![]),
    };
    if family == "other" {
        // `all`, or any number 0-255 but 1, 6, 17 and 58.
        let others = "0|[2-5]|[7-9]|1[0-6]|1[89]|[2-4][0-9]|5[0-7]|59|[6-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5]";
        return json!({ "oneOf": [
            { "type": "string", "pattern": format!("^(?:{}|{others})$", words.join("|")) },
            { "type": "integer", "minimum": 0, "maximum": 255, "not": { "enum": [1, 6, 17, 58] } },
        ]});
    }
    let numbers_text: Vec<String> = numbers.iter().map(u8::to_string).collect();
    json!({ "oneOf": [
        { "type": "string", "pattern": format!("^(?:{}|{})$", words.join("|"), numbers_text.join("|")) },
        { "type": "integer", "enum": numbers },
    ]})
}

/// A time as requests give one ([`crate::model::parse_time`]): RFC 3339 in UTC, or a span of
/// whole units.
fn time() -> String {
    // Years from 1970, as the server's parser takes them.
    let date = "(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])";
    let clock = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]{1,9})?";
    let span = "(?:0|[1-9][0-9]{0,8})[smhdwy]";
    format!("^(?:{date}T{clock}Z|{span}(?: {span})*)$")
}

/// None of `fields` is present.
fn none_of(fields: &[&str]) -> Value {
    let any: Vec<Value> = fields.iter().map(|f| json!({ "required": [f] })).collect();
    json!({ "not": { "anyOf": any } })
}

/// The OpenAPI document (see the module contract).
pub fn document() -> Value {
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let body = |name: &str| json!({ "required": true, "content": { "application/json": { "schema": r(name) } } });
    let ok = |desc: &str, schema: Value| json!({ "description": desc, "content": { "application/json": { "schema": schema } } });
    let array = |name: &str| json!({ "type": "array", "items": r(name) });
    let err = |desc: &str| json!({ "description": desc, "content": { "application/json": { "schema": r("Error") } } });
    let rev = json!({ "Verse-Revision": { "$ref": "#/components/headers/Verse-Revision" } });
    let created = |desc: &str, name: &str| json!({ "description": desc, "headers": rev, "content": { "application/json": { "schema": r(name) } } });
    let no_content = |desc: &str| json!({ "description": desc, "headers": rev });
    let id_param = |name: &str, desc: &str| json!({ "name": name, "in": "path", "required": true, "description": desc, "schema": { "type": "string" } });
    let query_param = |name: &str, desc: &str| json!({ "name": name, "in": "query", "required": false, "description": desc, "schema": { "type": "string" } });
    let e400 = err("Invalid input; the message starts with the field at fault");
    let e404 = err("Unknown id");
    let e409 = err("Conflict: duplicate, in use, or limit reached");
    let e429 = json!({ "description": "Rate limited: too many reads or writes from this principal; retry after Retry-After seconds", "headers": { "Retry-After": { "description": "Seconds until a request is allowed again", "schema": { "type": "integer", "minimum": 1 } } }, "content": { "application/json": { "schema": r("Error") } } });
    let e413 = err("The request body is longer than the limit (api.max_body_bytes)");
    let e408 = err("The request body did not arrive in time (api.body_timeout)");
    let e503 = err("The store (etcd) cannot be reached, or a host the edit needs is not healthy; a retry may succeed. store_halted: the embedded store's log could not be cut back after a failed write, and no edit succeeds until versed restarts");
    let e401 = json!({ "description": "No principal: no token (or, on the local socket, not root), or a malformed, unknown, revoked or expired one (code unauthenticated)", "headers": { "WWW-Authenticate": { "description": "Bearer realm=\"verse\"", "schema": { "type": "string" } } }, "content": { "application/json": { "schema": r("Error") } } });
    let e403_store =
        err("etcd refuses this host's credentials the keys this needs (code store_forbidden)");
    let e403_role = err("The principal's role may not do this (code forbidden), or etcd refuses this host's credentials the keys this needs (code store_forbidden)");
    // Responses every operation of a kind can give, besides its own: the public ones only the
    // rate limit; reads also need a principal; writes are also refused for a role (or by
    // etcd), and have a body and a store that may fail them.
    let public = |mut responses: Value| {
        responses["429"] = e429.clone();
        responses
    };
    let read = |mut responses: Value| {
        for (code, resp) in [("401", &e401), ("429", &e429)] {
            responses[code] = resp.clone();
        }
        responses
    };
    let write = |mut responses: Value| {
        for (code, resp) in [
            ("401", &e401),
            ("403", &e403_role),
            ("408", &e408),
            ("413", &e413),
            ("429", &e429),
            ("503", &e503),
        ] {
            responses[code] = resp.clone();
        }
        responses
    };
    let no_auth = json!([]);
    let v6 = ipv6();
    // S14: an endpoint's use of its conntrack budget (apart: the document is one json! call).
    let conntrack_usage = json!({ "type": "object", "required": ["budget", "used", "available", "exceeded"], "additionalProperties": false,
        "description": "Shown by GET on the API of the endpoint's own host (the only one whose conntrack table charges it)",
        "properties": {
            "budget": { "type": "integer", "minimum": 0 },
            "used": { "type": "integer", "minimum": 0, "description": "Tracked flows charged to it" },
            "available": { "type": "integer", "minimum": 0 },
            "exceeded": { "type": "integer", "minimum": 0, "description": "New flows refused for want of budget" } } });

    // `GET /v1/trace` and its answer, apart: one literal would be deeper than the macro allows.
    let patch_endpoint = json!({ "type": "object", "additionalProperties": false, "minProperties": 1,
                    "description": "What to change; what is absent is kept (at least one field).",
                    "properties": {
                    "security_groups": { "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": 16, "uniqueItems": true, "description": "Replace its security groups (S5)" },
                    "flow_logs": { "type": "boolean", "description": "Turn its flow logs on or off: its host writes records from the next interval it closes" } } });
    let host_schema = json!({ "type": "object", "required": ["name", "underlay_ip", "revision", "healthy", "errors"], "properties": {
                    "name": { "type": "string" },
                    "underlay_ip": { "type": "string", "format": "ipv4", "nullable": true },
                    "api": { "type": "string", "description": "Where the other hosts reach its API (advertise_api)" },
                    "api_fingerprint": { "type": "string", "description": "SHA-256 of the certificate its API serves: the other hosts relay a caller's token to api only over TLS with exactly this certificate" },
                    "revision": { "type": "integer", "format": "int64", "minimum": 0, "description": "Revision realized in the host's dataplane, for every endpoint but those in errors" },
                    "healthy": { "type": "boolean" },
                    "errors": { "type": "array", "description": "Endpoints of this host it could not realize, and why (it keeps retrying)", "items": {
                        "type": "object", "required": ["endpoint", "code", "message"], "properties": {
                            "endpoint": { "type": "string" },
                            "code": { "type": "string", "enum": ["invalid_argument", "not_found", "conflict", "internal"] },
                            "message": { "type": "string" } } } } } });
    let trace_path = json!({
        "get": { "summary": "Why would a packet pass or be dropped? The verdict this host's dataplane would reach, step by step, from the maps it has realized (no traffic sent): the sender's from_endpoint if the sender is placed here, else the receiver's from_underlay if the receiver is (409 wrong_host otherwise). With run=true (editors, admins) the synthesized frame also goes through the real program (BPF_PROG_TEST_RUN) on private conntrack and counters. Rules between the parameters (400 otherwise): port is required for tcp and udp (6, 17) and refused for any other protocol, as is sport; icmp_type and icmp_code only for icmp (1); universe is required when neither from nor to is an endpoint id; from and to endpoints of two universes are refused. An endpoint outside the universe given is not found (404); a from address no endpoint of the universe has is a 409 (no_sender).",
            "parameters": [
                { "name": "from", "in": "query", "required": true, "description": "The sender: an endpoint id, or an address of the universe", "schema": { "type": "string", "pattern": format!("^(?:ep-[0-9a-f]{{8}}|{IPV4})$") } },
                { "name": "to", "in": "query", "required": true, "description": "The receiver: an endpoint id, or an address of the universe", "schema": { "type": "string", "pattern": format!("^(?:ep-[0-9a-f]{{8}}|{IPV4})$") } },
                { "name": "universe", "in": "query", "required": false, "description": "Universe id; required when neither from nor to is an endpoint id", "schema": { "type": "string", "pattern": "^uni-[0-9a-f]{8}$" } },
                { "name": "protocol", "in": "query", "required": true, "description": "tcp, udp, icmp (any case), or a protocol number 0-255", "schema": { "type": "string", "pattern": "^(?:[tT][cC][pP]|[uU][dD][pP]|[iI][cC][mM][pP]|0|[1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-5])$" } },
                { "name": "port", "in": "query", "required": false, "description": "TCP/UDP destination port (required for them, refused otherwise)", "schema": { "type": "integer", "minimum": 0, "maximum": 65535 } },
                { "name": "sport", "in": "query", "required": false, "description": "TCP/UDP source port (default: one no live flow uses; refused for other protocols)", "schema": { "type": "integer", "minimum": 0, "maximum": 65535 } },
                { "name": "icmp_type", "in": "query", "required": false, "description": "ICMP type (icmp only; default 8, echo request)", "schema": { "type": "integer", "minimum": 0, "maximum": 255 } },
                { "name": "icmp_code", "in": "query", "required": false, "description": "ICMP code (icmp only; default 0)", "schema": { "type": "integer", "minimum": 0, "maximum": 255 } },
                { "name": "run", "in": "query", "required": false, "description": "Also push the frame through the real program (editors and admins)", "schema": { "type": "boolean" } },
                { "name": "host", "in": "query", "required": false, "description": "Trace on this host of the fleet: the request is relayed to it with the caller's token (over TLS to exactly the certificate it registered), and its answer returned; default: this host; a name that is no host of the fleet is a 400", "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,253}$" } }
            ],
            "responses": read(json!({ "200": ok("This host's part of the packet's path", r("TraceAnswer")), "400": e400, "403": e403_role, "404": err("Unknown endpoint or universe, or an endpoint outside the universe given"),
                "409": err("no_sender: no endpoint of the universe has the from address; wrong_host: neither the sender nor the receiver is on this host"), "500": err("The dataplane's maps could not be read, or the run failed"), "503": err("This host has no dataplane, or the host named by host cannot be asked (host_unavailable)") })) }
    });
    let trace_answer = json!({ "type": "object", "required": ["host", "revision", "maps_match", "packet", "steps", "verdict"], "properties": {
                    "host": { "type": "string", "description": "The host whose maps were read" },
                    "revision": { "type": "integer", "format": "int64", "minimum": 0, "description": "The revision it has realized: the state evaluated" },
                    "maps_match": { "type": "boolean", "description": "The kernel maps hold exactly that revision's compiled form" },
                    "packet": { "type": "object", "description": "universe, vni, src, dst, src_endpoint, dst_endpoint, protocol, proto, sport, dport, icmp_type, icmp_code" },
                    "steps": { "type": "array", "items": { "type": "object", "required": ["host", "hook", "check", "outcome", "detail"], "properties": {
                        "host": { "type": "string" }, "hook": { "type": "string", "enum": ["from_endpoint", "from_underlay"] },
                        "check": { "type": "string", "description": "endpoint, anti_spoofing, conntrack, egress, route, underlay, destination, ingress" },
                        "outcome": { "type": "string", "enum": ["pass", "drop", "accept", "info"] },
                        "detail": { "type": "string" }, "reason": { "type": "string" },
                        "rule": { "type": "object", "description": "group, group_name, rule, direction: the rule that admitted the packet" },
                        "searched": { "type": "array", "items": { "type": "string" }, "description": "The groups whose rules a policy check searched" } } } },
                    "verdict": { "type": "object", "required": ["action", "summary"], "properties": {
                        "action": { "type": "string", "enum": ["deliver", "wrap", "pass", "drop"] }, "reason": { "type": "string" },
                        "rules": { "type": "array", "items": { "type": "object" } }, "next_host": { "type": "string" }, "summary": { "type": "string" } } },
                    "model": { "type": "object", "description": "The reference model's action and reason on the same frame" },
                    "kernel": { "type": "object", "description": "With run: hook, action, reason (the drop counter that moved), return_code, frame_len" } } });

    let flow_logs_path = json!({
        "get": { "summary": "Flow logs of an endpoint: one record per flow, direction and interval, as the endpoint's host wrote them, oldest first (an endpoint of a universe the caller does not see is not found)",
            "parameters": [
                { "name": "endpoint", "in": "query", "required": true, "description": "Endpoint id (ep-...)", "schema": { "type": "string" } },
                { "name": "since", "in": "query", "required": false, "description": "Only records of intervals ending at or after this RFC 3339 time in UTC, a real date (2027-01-01T00:00:00Z), or this long ago: whole numbers of s, m, h, d, w, y separated by single spaces (1h, 1d 12h)", "schema": { "type": "string", "pattern": time() } },
                { "name": "limit", "in": "query", "required": false, "description": "At most this many, the newest (default 1000)", "schema": { "type": "integer", "minimum": 1, "maximum": 10000 } },
                { "name": "host", "in": "query", "required": false, "description": "The host whose files to read (default: the host the endpoint is placed on); a name that is no host of the fleet is a 400", "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,253}$" } }
            ],
            "responses": read(json!({ "200": ok("The records", array("FlowLogRecord")), "400": err("Missing endpoint, unknown query parameter, or an invalid since, limit or host"), "404": e404, "500": err("The files could not be read"), "503": err("The host holding the records cannot be asked, or keeps no flow logs") })) }
    });
    let flow_log_record = json!({ "type": "object", "required": ["host", "universe", "endpoint", "interface", "flow_direction", "action", "srcaddr", "dstaddr", "srcport", "dstport", "protocol", "packets", "bytes", "start", "end", "tcp_flags"], "properties": {
                    "host": { "type": "string", "description": "The host that wrote it" },
                    "universe": { "type": "string" },
                    "endpoint": { "type": "string", "description": "AWS interface-id" },
                    "interface": { "type": "string", "description": "Host-side veth" },
                    "flow_direction": { "type": "string", "enum": ["ingress", "egress"], "description": "Relative to the endpoint" },
                    "action": { "type": "string", "enum": ["ACCEPT", "REJECT"] },
                    "srcaddr": { "type": "string", "description": "IPv4 or IPv6 (standard form)" },
                    "dstaddr": { "type": "string", "description": "IPv4 or IPv6 (standard form)" },
                    "srcport": { "type": "integer", "minimum": 0, "maximum": 65535, "description": "TCP and UDP; 0 otherwise" },
                    "dstport": { "type": "integer", "minimum": 0, "maximum": 65535 },
                    "protocol": { "type": "integer", "minimum": 0, "maximum": 255, "description": "IANA protocol number" },
                    "packets": { "type": "integer", "format": "int64", "minimum": 0, "description": "Segments on the wire in the interval" },
                    "bytes": { "type": "integer", "format": "int64", "minimum": 0, "description": "Their IPv4 datagrams' bytes" },
                    "start": { "type": "string", "format": "date-time" },
                    "end": { "type": "string", "format": "date-time" },
                    "tcp_flags": { "type": "integer", "minimum": 0, "maximum": 255, "description": "TCP flags of this direction in the interval, OR-ed" },
                    "rule": { "type": "string", "pattern": "^sgr-[0-9a-f]{8}$", "description": "ACCEPT: this endpoint's rule that admitted the flow" },
                    "reason": { "type": "string", "description": "REJECT: the drop reason" },
                    "sampled": { "type": "boolean", "description": "REJECT: drop events went unreported in the interval (rate limit, full ring buffer): the record counts a sample" },
                    "unreported_drops": { "type": "integer", "format": "int64", "minimum": 1, "description": "With sampled: drops of the whole host unreported in the interval" } } });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Verse API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Universes, security groups, rules and endpoints of a Verse fleet, and who may change them. Every request but /healthz and /v1/openapi.json acts as a principal: a bearer token (Authorization: Bearer vt_...), or root on the host's local unix socket; objects of a universe the principal does not see answer as if they did not exist (404), and a role that may not do something is a 403. Every mutation returns the revision it produced in the Verse-Revision header and returns once every healthy host has realized it (bounded by 10 s). A mutation answers 503 (code unavailable) when the store (etcd) cannot be reached. Each principal's reads and writes are rate limited (429 with Retry-After); bodies are limited in size (413) and time (408)."
        },
        "paths": {
            "/healthz": { "get": { "summary": "Liveness", "security": no_auth, "responses": { "200": { "description": "The daemon is up", "content": { "text/plain": { "schema": { "type": "string", "enum": ["ok"] } } } } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics (OpenMetrics text): admins and fleet-wide viewers", "responses": read(json!({
                "200": { "description": "verse_drops_total{reason}, verse_endpoints, verse_rules, verse_security_groups, verse_universes, verse_revision, verse_realized_revision; per endpoint of this host verse_conntrack_budget, verse_conntrack_used, verse_conntrack_available, verse_conntrack_budget_exceeded_total {endpoint}; verse_conntrack_gc_runs_total, verse_conntrack_gc_scanned_total, verse_conntrack_gc_deleted_total, verse_conntrack_gc_seconds_total, verse_conntrack_gc_last_duration_seconds, verse_conntrack_gc_last_scanned", "content": { "application/openmetrics-text": { "schema": { "type": "string" } } } },
                "403": e403_role,
                "500": err("The dataplane counters could not be read") })) } },
            "/v1/openapi.json": { "get": { "summary": "This document", "security": no_auth, "responses": public(json!({ "200": { "description": "OpenAPI 3 document", "content": { "application/json": { "schema": { "type": "object" } } } } })) } },
            "/v1/universes": {
                "post": { "summary": "Create a universe (and its default group)", "requestBody": body("CreateUniverse"),
                    "responses": write(json!({ "201": created("The universe", "Universe"), "400": e400, "409": e409 })) },
                "get": { "summary": "List universes", "responses": read(json!({ "200": ok("Every universe", array("Universe")) })) }
            },
            "/v1/universes/{id}": {
                "parameters": [id_param("id", "Universe id (uni-...)")],
                "get": { "summary": "Show a universe", "responses": read(json!({ "200": ok("The universe", r("Universe")), "404": e404 })) },
                "delete": { "summary": "Delete a universe and its groups", "responses": write(json!({ "204": no_content("Deleted"), "404": e404, "409": err("The universe still has endpoints, or (etcd store) has too many groups to delete in one transaction") })) }
            },
            "/v1/security-groups": {
                "post": { "summary": "Create a security group (S2: no ingress rule, egress to all)", "requestBody": body("CreateSecurityGroup"),
                    "responses": write(json!({ "201": created("The group", "SecurityGroup"), "400": e400, "404": err("Unknown universe"), "409": e409 })) },
                "get": { "summary": "List security groups", "parameters": [query_param("universe", "Only the groups of this universe")],
                    "responses": read(json!({ "200": ok("The groups", array("SecurityGroup")), "400": err("Unknown query parameter") })) }
            },
            "/v1/security-groups/{id}": {
                "parameters": [id_param("id", "Security group id (sg-...)")],
                "get": { "summary": "Show a security group with its rules", "responses": read(json!({ "200": ok("The group", r("SecurityGroup")), "404": e404 })) },
                "delete": { "summary": "Delete a security group", "responses": write(json!({ "204": no_content("Deleted"), "404": e404, "409": err("The group is in use by an endpoint, referenced by a rule, or a default group") })) }
            },
            "/v1/security-groups/{id}/rules": {
                "parameters": [id_param("id", "Security group id (sg-...)")],
                "post": { "summary": "Add a rule", "requestBody": body("CreateRule"),
                    "responses": write(json!({ "201": created("The rule", "Rule"), "400": e400, "404": err("Unknown group (or peer group)"), "409": err("Duplicate rule, or 1000 rules per group reached, or the dataplane would not fit it") })) }
            },
            "/v1/security-groups/{id}/rules/{rule_id}": {
                "parameters": [id_param("id", "Security group id (sg-...)"), id_param("rule_id", "Rule id (sgr-...)")],
                "delete": { "summary": "Delete a rule (tracked connections it allowed go on, S8)", "responses": write(json!({ "204": no_content("Deleted"), "404": e404 })) }
            },
            "/v1/endpoints": {
                "post": { "summary": "Create an endpoint: plug a workload namespace into a universe", "requestBody": body("CreateEndpoint"),
                    "responses": write(json!({
                        "201": created("The endpoint; on return its interface exists, its policy is in force, and every healthy host has realized it", "Endpoint"),
                        "400": e400,
                        "404": err("Unknown universe, group, host, or a namespace that does not exist on the endpoint's host"),
                        "409": err("Duplicate address or namespace, a limit reached, or an interface in the way on the endpoint's host (the endpoint is removed again)"),
                        "500": err("The endpoint's host could not plumb it (the endpoint is removed again); the message names the host and the cause") })) },
                "get": { "summary": "List endpoints", "parameters": [query_param("universe", "Only the endpoints of this universe"), query_param("host", "Only the endpoints on this host")],
                    "responses": read(json!({ "200": ok("The endpoints", array("Endpoint")), "400": err("Unknown query parameter") })) }
            },
            "/v1/endpoints/{id}": {
                "parameters": [id_param("id", "Endpoint id (ep-...)")],
                "get": { "summary": "Show an endpoint", "responses": read(json!({ "200": ok("The endpoint", r("Endpoint")), "404": e404 })) },
                "patch": { "summary": "Change an endpoint: replace its security groups (S5), turn its flow logs on or off", "requestBody": body("PatchEndpoint"),
                    "responses": write(json!({ "200": { "description": "The endpoint", "headers": rev, "content": { "application/json": { "schema": r("Endpoint") } } }, "400": e400, "404": e404, "409": e409 })) },
                "delete": { "summary": "Delete an endpoint and its interface", "responses": write(json!({ "204": no_content("Deleted"), "404": e404 })) }
            },
            "/v1/hosts": {
                "get": { "summary": "Hosts, the revision each has realized, and what it could not (S13)", "responses": read(json!({ "200": ok("The hosts", array("Host")) })) }
            },
            "/v1/tokens": {
                "post": { "summary": "Create an API token (admins); its secret is in the answer, this once", "requestBody": body("CreateToken"),
                    "responses": write(json!({ "201": created("The token and its secret", "CreatedToken"), "400": e400, "404": err("Unknown universe"), "409": e409 })) },
                "get": { "summary": "List API tokens, never their secrets (admins)", "responses": read(json!({ "200": ok("The tokens", array("Token")), "403": e403_role })) }
            },
            "/v1/tokens/{id}": {
                "parameters": [id_param("id", "Token id (tok-...)")],
                "delete": { "summary": "Revoke a token: every host refuses it once this returns (admins)", "responses": write(json!({ "204": no_content("Revoked"), "404": e404 })) }
            },
            "/v1/trace": trace_path,
            "/v1/flow-logs": flow_logs_path,
            "/v1/audit": {
                "get": { "summary": "The audit trail of the fleet: every mutation and every refused credential, oldest first (a principal confined to a universe sees that universe's records)",
                    "parameters": [
                        query_param("universe", "Only this universe's records"),
                        { "name": "since", "in": "query", "required": false, "description": "Only records since this RFC 3339 time in UTC, a real date (2027-01-01T00:00:00Z), or this long ago: whole numbers of s, m, h, d, w, y separated by single spaces (1h, 1d 12h)", "schema": { "type": "string", "pattern": time() } },
                        { "name": "limit", "in": "query", "required": false, "description": "At most this many, the newest (default 1000)", "schema": { "type": "integer", "minimum": 1, "maximum": 10000 } }
                    ],
                    "responses": read(json!({ "200": ok("The records", array("AuditRecord")), "400": err("Invalid query parameter"), "403": e403_store, "500": err("The trail could not be read"), "503": err("The store (etcd) cannot be reached; a retry may succeed") })) }
            }
        },
        "components": {
            "headers": {
                "Verse-Revision": { "description": "Revision of the desired state after this edit (S13)", "schema": { "type": "integer", "format": "int64", "minimum": 0 } }
            },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": {
                    "type": "object", "required": ["code", "message"], "properties": {
                        "code": { "type": "string", "description": "invalid_argument, not_found, duplicate, in_use, limit_exceeded, protected, conflict, not_realized, unavailable, unauthenticated, forbidden, store_forbidden, rate_limited, payload_too_large, request_timeout, ..." },
                        "message": { "type": "string", "description": "For 400s, starts with the field at fault" } } } } },
                "CreateUniverse": {
                    "type": "object", "additionalProperties": false, "required": ["name"],
                    "description": "Exactly one of cidr and cidrs. IPv4 CIDRs /8 to /30, stored canonical; the CIDRs of one universe must not overlap (400 otherwise).",
                    "properties": {
                        "name": name(),
                        "cidr": { "type": "string", "pattern": format!("^{IPV4}/{PREFIX_UNIVERSE}$"), "example": "10.1.0.0/16" },
                        "cidrs": { "type": "array", "minItems": 1, "items": { "type": "string", "pattern": format!("^{IPV4}/{PREFIX_UNIVERSE}$") } },
                        "ipv6_cidrs": { "type": "array", "minItems": 1, "items": { "type": "string", "pattern": format!("^{v6}/{PREFIX_UNIVERSE_V6}$") },
                            "description": "IPv6 CIDRs beside the IPv4 ones (a dual-stack universe): /44 to /64, stored canonical, pairwise disjoint, not multicast (ff00::/8), link-local (fe80::/10) or within ::/64. IPv6 flows between endpoints of one host and between hosts (wrapped over the IPv4 underlay)." } },
                    "oneOf": [ { "required": ["cidr"] }, { "required": ["cidrs"] } ] },
                "Universe": { "type": "object", "required": ["id", "name", "cidrs", "vni"], "properties": {
                    "id": { "type": "string", "pattern": "^uni-[0-9a-f]{8}$" },
                    "name": { "type": "string" },
                    "cidrs": { "type": "array", "items": { "type": "string" }, "description": "Canonical IPv4 CIDRs" },
                    "ipv6_cidrs": { "type": "array", "items": { "type": "string" }, "description": "Canonical IPv6 CIDRs; absent for an IPv4-only universe" },
                    "vni": { "type": "integer", "minimum": 0, "maximum": 16777215 } } },
                "CreateSecurityGroup": { "type": "object", "additionalProperties": false, "required": ["universe", "name"], "properties": {
                    "universe": { "type": "string", "description": "Universe id" },
                    "name": name(),
                    "description": description() } },
                "SecurityGroup": { "type": "object", "required": ["id", "universe", "name", "description", "ingress", "egress"], "properties": {
                    "id": { "type": "string", "pattern": "^sg-[0-9a-f]{8}$" },
                    "universe": { "type": "string" },
                    "name": { "type": "string" },
                    "description": { "type": "string" },
                    "ingress": { "type": "array", "items": r("Rule") },
                    "egress": { "type": "array", "items": r("Rule") } } },
                "CreateRule": {
                    "type": "object", "additionalProperties": false, "required": ["direction", "protocol"],
                    "description": "Exactly one of cidr and group. tcp/udp (6, 17) take from_port and to_port, inclusive, from_port not above to_port (400 otherwise); icmp/icmpv6 (1, 58) take icmp_type and icmp_code (-1 or absent = any; a code needs a type); other protocols take neither. A CIDR is stored canonical; an IPv4-mapped IPv6 CIDR (::ffff:a.b.c.d/n, n >= 96) is stored as the IPv4 CIDR it means.",
                    "properties": {
                        "direction": { "type": "string", "pattern": "^(?:[iI][nN][gG][rR][eE][sS][sS]|[eE][gG][rR][eE][sS][sS])$", "description": "ingress or egress (any case)" },
                        "protocol": { "oneOf": [
                            { "type": "string", "pattern": "^(?:[tT][cC][pP]|[uU][dD][pP]|[iI][cC][mM][pP]|[iI][cC][mM][pP][vV]6|[aA][lL][lL]|0|[1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-5])$", "description": "tcp, udp, icmp, icmpv6, all (any case), or a number 0-255" },
                            { "type": "integer", "minimum": 0, "maximum": 255 } ] },
                        "from_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
                        "to_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
                        "icmp_type": { "type": "integer", "minimum": -1, "maximum": 255 },
                        "icmp_code": { "type": "integer", "minimum": -1, "maximum": 255 },
                        "cidr": { "type": "string", "pattern": format!("^(?:{IPV4}/{PREFIX_V4}|{v6}/{PREFIX_V6})$"), "description": "Peer CIDR, IPv4 or IPv6" },
                        "group": { "type": "string", "description": "Peer security group id, same universe" },
                        "description": description() },
                    "allOf": [
                        { "oneOf": [ { "required": ["cidr"] }, { "required": ["group"] } ] },
                        { "anyOf": [
                            { "properties": { "protocol": protocol("ports") }, "required": ["from_port", "to_port"],
                              "allOf": [none_of(&["icmp_type", "icmp_code"])] },
                            { "properties": { "protocol": protocol("icmp") },
                              "allOf": [
                                  none_of(&["from_port", "to_port"]),
                                  { "anyOf": [
                                      { "not": { "required": ["icmp_code"] } },
                                      { "properties": { "icmp_code": { "enum": [-1] } } },
                                      { "required": ["icmp_type"], "properties": { "icmp_type": { "minimum": 0 } } } ] } ] },
                            { "properties": { "protocol": protocol("other") },
                              "allOf": [none_of(&["from_port", "to_port", "icmp_type", "icmp_code"])] } ] } ] },
                "Rule": { "type": "object", "required": ["id", "direction", "protocol", "description"], "properties": {
                    "id": { "type": "string", "pattern": "^sgr-[0-9a-f]{8}$" },
                    "direction": { "type": "string", "enum": ["ingress", "egress"] },
                    "protocol": { "type": "string", "description": "tcp, udp, icmp, icmpv6, all, or a number" },
                    "from_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
                    "to_port": { "type": "integer", "minimum": 0, "maximum": 65535 },
                    "icmp_type": { "type": "integer", "minimum": -1, "maximum": 255, "description": "-1 = any" },
                    "icmp_code": { "type": "integer", "minimum": -1, "maximum": 255, "description": "-1 = any" },
                    "cidr": { "type": "string" },
                    "group": { "type": "string" },
                    "description": { "type": "string" } } },
                "CreateEndpoint": {
                    "type": "object", "additionalProperties": false, "required": ["universe", "netns", "ip"],
                    "description": "ip must lie in one of the universe's CIDRs and not be its network, gateway (first) or broadcast address (400 otherwise).",
                    "properties": {
                        "universe": { "type": "string", "description": "Universe id" },
                        "host": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,253}$", "description": "Host to place it on, a host of the fleet; default: the host serving the request" },
                        "netns": { "type": "string", "pattern": r"^(?:[!-\-0-~][!-.0-~]{0,254}|\.[!-\-0-~][!-.0-~]{0,253}|\.\.[!-.0-~]{1,253})$", "description": "An existing `ip netns` namespace on that host (404 if it does not exist there): printable ASCII, no '/', not . or .." },
                        "ip": { "type": "string", "pattern": format!("^{IPV4}$"), "description": "IPv4, within one of the universe's CIDRs" },
                        "ipv6": { "type": "string", "pattern": format!("^{v6}$"),
                            "description": "An IPv6 address as well (a dual-stack endpoint): within one of the universe's ipv6_cidrs, unique in the universe, not IPv4-mapped, and not the first (subnet-router anycast), second (gateway) or last address of its CIDR. Its host configures it in the workload (ADDR/128, default route via the second address of its CIDR); IPv6 flows to endpoints of its host and of other hosts." },
                        "security_groups": { "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": 16, "uniqueItems": true, "description": "Group ids of the universe; default: the universe's default group" },
                        "conntrack_budget": { "type": "integer", "minimum": 1, "maximum": dataplane_common::capacity::CONNTRACK, "description": "Flows it may have tracked at once on its host (S14); default: the serving daemon's conntrack.endpoint_budget. The budgets of one host's endpoints add up to at most its conntrack capacity (409 limit_exceeded otherwise)." },
                        "flow_logs": { "type": "boolean", "description": "Its host writes flow logs of its traffic (GET /v1/flow-logs); default: false" } } },
                "PatchEndpoint": patch_endpoint,
                "Endpoint": { "type": "object", "required": ["id", "universe", "host", "netns", "ip", "mac", "interface", "security_groups", "conntrack_budget", "flow_logs"], "properties": {
                    "id": { "type": "string", "pattern": "^ep-[0-9a-f]{8}$" },
                    "universe": { "type": "string" },
                    "host": { "type": "string" },
                    "netns": { "type": "string" },
                    "ip": { "type": "string", "format": "ipv4" },
                    "ipv6": { "type": "string", "format": "ipv6", "description": "Absent for an IPv4-only endpoint" },
                    "mac": { "type": "string", "pattern": "^02:00(?::[0-9a-f]{2}){4}$" },
                    "interface": { "type": "string", "description": "Host-side veth" },
                    "security_groups": { "type": "array", "items": { "type": "string" } },
                    "conntrack_budget": { "type": "integer", "minimum": 1, "description": "Flows it may have tracked at once (S14)" },
                    "flow_logs": { "type": "boolean", "description": "Its host writes flow logs of its traffic" },
                    "conntrack": conntrack_usage } },
                "Host": host_schema,
                "CreateToken": {
                    "type": "object", "additionalProperties": false, "required": ["role"],
                    "description": "admin: no universe. editor: a universe. viewer: a universe, or none to read the whole fleet. expires must be in the future and at most 10 years away (400 otherwise); a universe that does not exist is a 404.",
                    "properties": {
                        "role": { "type": "string", "enum": ["admin", "editor", "viewer"] },
                        "universe": { "type": "string", "description": "Universe id the token is confined to" },
                        "expires": { "type": "string", "pattern": time(), "description": "An RFC 3339 time in UTC, a real date (2027-01-01T00:00:00Z), or a lifetime: whole numbers of s, m, h, d, w, y (365 days) separated by single spaces (90d, 1d 12h)" },
                        "description": description() },
                    "oneOf": [
                        { "properties": { "role": { "enum": ["admin"] } }, "not": { "required": ["universe"] } },
                        { "properties": { "role": { "enum": ["editor"] } }, "required": ["universe"] },
                        { "properties": { "role": { "enum": ["viewer"] } } } ] },
                "Token": { "type": "object", "required": ["id", "role", "universe", "description", "created", "expires"], "properties": {
                    "id": { "type": "string", "pattern": "^tok-[0-9a-f]{8}$" },
                    "role": { "type": "string", "enum": ["admin", "editor", "viewer"] },
                    "universe": { "type": "string", "nullable": true },
                    "description": { "type": "string" },
                    "created": { "type": "string", "format": "date-time" },
                    "expires": { "type": "string", "format": "date-time", "nullable": true } } },
                "CreatedToken": { "allOf": [ r("Token"), { "type": "object", "required": ["token"], "properties": {
                    "token": { "type": "string", "pattern": "^vt_[0-9a-f]{8}_[0-9a-f]{64}$", "description": "The secret, for Authorization: Bearer; shown once, never stored" } } } ] },
                "TraceAnswer": trace_answer,
                "FlowLogRecord": flow_log_record,
                "AuditRecord": { "type": "object", "required": ["time", "host", "principal", "source", "action", "objects", "status"], "properties": {
                    "time": { "type": "string", "format": "date-time" },
                    "host": { "type": "string", "description": "The host whose API served the request" },
                    "principal": { "type": "string", "description": "tok-..., local-root, or unauthenticated" },
                    "source": { "type": "string", "description": "ADDR:PORT, or unix (uid U, pid P) for the local socket" },
                    "action": { "type": "string", "description": "Method and route: POST /v1/security-groups/{id}/rules" },
                    "universe": { "type": "string" },
                    "objects": { "type": "array", "items": { "type": "string" }, "description": "Ids the request named or created" },
                    "status": { "type": "integer", "minimum": 100, "maximum": 599 },
                    "revision": { "type": "integer", "format": "int64", "minimum": 0, "description": "Revision the mutation produced" },
                    "detail": { "type": "string", "description": "Error code of a refusal; for a refused credential, why (and the token id claimed)" } } }
            },
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "An API token (vt_...); see POST /v1/tokens. Root on a host may instead use the local unix socket <state-dir>/api.sock without a token." }
            }
        },
        "security": [ { "bearer": [] } ]
    })
}
