//! The REST API (`/v1`, JSON), served by every `versed`.
//!
//! Contract: every route of the README's "REST API" table. Collections are JSON arrays.
//! Errors are `{"error": {"code", "message"}}` with 400 (invalid input; the message starts with
//! the field at fault), 401 and 403 (access, below), 404 (unknown id or route), 409 (duplicate,
//! in use, limit), and the limits' 408, 413 and 429 ([`crate::limits`]). Request
//! bodies are parsed here, from bytes, so that malformed JSON, a wrong type, an unknown or a
//! missing field are 400s naming the field too. Mutations carry the new revision in the
//! `Verse-Revision` header and return only once every healthy host of the fleet has realized
//! that revision (S13): this host's reconciler, and every other host whose liveness record is
//! fresh in the store (bounded by [`REALIZE_TIMEOUT`]; past it they return anyway and log a
//! warning naming the hosts behind). So when `POST /v1/endpoints` returns, the interface exists,
//! its policy is in force, and every host that must admit its traffic has its route. A host
//! that turns unhealthy during the wait is no longer waited for.
//!
//! `GET /v1/hosts` lists the store's hosts; this host is always in it, healthy (it answers),
//! with the revision its reconciler has realized (fresher than its report in the store).
//!
//! Access (S15): every route but `/healthz`, `/v1/openapi.json` and the web page's assets
//! (`/ui`, [`crate::ui`], which hold no data) is behind [`crate::auth::authenticate`] (401
//! without a principal), the rate limit of that principal, and, outside both,
//! [`crate::audit::record`] (see [`router`] for the order of the layers).
//! Each handler asks [`crate::auth::decide`] through its [`Caller`]:
//! an object of a universe the caller does not see answers exactly as a missing one would (the
//! same 404, the same message), lists leave such objects out, and ids in a request body that
//! name such objects are "not found" too; a role that may not do something is a 403 (code
//! `forbidden`). For an edit the check runs inside the edit, on the state it applies to.
//!
//! The handlers only translate: every edit is a function of [`crate::model`], committed through
//! [`Store::edit`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path as UrlPath, Query, State as AxState};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dataplane_common::{event_kind, CtOwner, DropCount, DropReason, EventLimiter, Hook};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::{self, Auditor, Note};
use crate::auth::{self, Decision, Op, Principal, Resource};
use crate::events::{self, Filter, Hub, Notice, StreamItem};
use crate::flowlogs::{self, FlowLogRecord, FlowLogs};
use crate::hits::{GroupView, Hits, HitsFrom, MissingHost, RuleStats};
use crate::limits::{self, Limits};
use crate::model::{self, ErrorKind, Role, State, Timestamp};
use crate::phases::{self, Phase};
use crate::reconcile::GcStats;
use crate::relay;
use crate::store::{self, Store};
use crate::trace;

/// Header carrying the revision a mutation produced (S13).
pub const REVISION_HEADER: &str = "verse-revision";
/// How long a mutation waits for this host to realize its revision before returning anyway.
pub const REALIZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters read from this host's dataplane, for `/metrics` and the endpoints' `conntrack`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Drops by reason and hook, packets and bytes, summed over CPUs. Pairs missing here count
    /// as 0.
    pub drops: BTreeMap<(DropReason, Hook), DropCount>,
    /// New flows admitted per rule on this host (key: the rule id's bits), for every rule the
    /// host's policy entries name.
    pub rule_hits: BTreeMap<u32, u64>,
    /// Packets admitted per rule on this host since the daemon started (key: the rule id's
    /// bits), read from conntrack at each flow-log interval.
    pub rule_packets: BTreeMap<u32, u64>,
    /// The conntrack budget slots of this host's endpoints, by slot (S14).
    pub ct_owners: BTreeMap<u32, CtOwner>,
    /// What conntrack garbage collection has done.
    pub gc: GcStats,
    /// Entries the reconciler holds in the dataplane's maps (conntrack aside).
    pub map_entries: u64,
    /// Resident memory of this process, bytes.
    pub resident_bytes: u64,
}

impl Stats {
    /// The budget and use of `e` if it is an endpoint of this host (`host`) that the dataplane
    /// knows (its slot holds its serial).
    pub fn usage(&self, host: &str, e: &model::Endpoint) -> Option<CtOwner> {
        self.ct_owners.get(&e.slot).filter(|o| e.host == host && o.serial == e.serial).copied()
    }
}

/// Reads [`Stats`] from the dataplane; called on every scrape of `/metrics`.
pub type StatsFn = Arc<dyn Fn() -> anyhow::Result<Stats> + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The host this daemon serves: the default `host` of new endpoints.
    pub host: String,
    /// This host's underlay address, if it has one (shown by `GET /v1/hosts`).
    pub underlay_ip: Option<Ipv4Addr>,
    /// Where the other hosts reach this API (shown by `GET /v1/hosts`).
    pub api_url: Option<String>,
    /// The fingerprint of the certificate this API serves, when it serves TLS.
    pub api_fingerprint: Option<String>,
    /// The revision this host's reconciler has realized in the dataplane.
    pub realized: watch::Receiver<store::Realized>,
    pub stats: StatsFn,
    /// The audit trail's counters.
    pub audit: Arc<Auditor>,
    /// This host's verdict events.
    pub events: Arc<Hub>,
    /// The per-request limits (rates, bodies); `None`: none (in-process tests).
    pub limits: Option<Arc<Limits>>,
    /// `conntrack_budget` of an endpoint created without one (`conntrack.endpoint_budget`).
    pub default_conntrack_budget: u32,
    /// This host's realized maps and kernel programs, for `GET /v1/trace` (none: 503).
    pub trace: Option<Arc<dyn trace::Source>>,
    /// This host's flow logs, for `GET /v1/flow-logs` (none: 503).
    pub flow_logs: Option<Arc<FlowLogs>>,
}

impl AppState {
    /// The state of a host whose endpoints get [`model::DEFAULT_CONNTRACK_BUDGET`] unless
    /// they ask for another ([`AppState::with_conntrack_budget`] changes that default).
    pub fn new(
        store: Store,
        host: String,
        underlay_ip: Option<Ipv4Addr>,
        realized: watch::Receiver<store::Realized>,
        stats: StatsFn,
    ) -> AppState {
        AppState {
            events: Arc::new(Hub::new(&host, 0)),
            store,
            host,
            underlay_ip,
            api_url: None,
            api_fingerprint: None,
            realized,
            stats,
            audit: Arc::default(),
            limits: None,
            default_conntrack_budget: model::DEFAULT_CONNTRACK_BUDGET,
            trace: None,
            flow_logs: None,
        }
    }

    /// The same state, announcing `url` as where the other hosts reach this API.
    pub fn with_api_url(mut self, url: Option<String>) -> AppState {
        self.api_url = url;
        self
    }

    /// The same state, announcing `fingerprint` as the certificate this API serves.
    pub fn with_api_fingerprint(mut self, fingerprint: Option<String>) -> AppState {
        self.api_fingerprint = fingerprint;
        self
    }

    /// The same state, with this host's event hub.
    pub fn with_events(mut self, hub: Arc<Hub>) -> AppState {
        self.events = hub;
        self
    }

    /// The same state, answering `GET /v1/trace` from `source`.
    pub fn with_trace(mut self, source: Arc<dyn trace::Source>) -> AppState {
        self.trace = Some(source);
        self
    }

    /// The same state, answering `GET /v1/flow-logs` from `logs`.
    pub fn with_flow_logs(mut self, logs: Arc<FlowLogs>) -> AppState {
        self.flow_logs = Some(logs);
        self
    }

    /// The same, with the per-request limits of [`crate::limits`].
    pub fn with_limits(self, limits: Arc<Limits>) -> AppState {
        AppState { limits: Some(limits), ..self }
    }

    /// Endpoints created without a `conntrack_budget` get `budget`.
    pub fn with_conntrack_budget(mut self, budget: u32) -> AppState {
        self.default_conntrack_budget = budget;
        self
    }
}

/// One host as `GET /v1/hosts` shows it: the store's view of it.
pub use crate::store::HostStatus as Host;

/// An endpoint as the API shows it (the model's endpoint without its internal identity,
/// serial and slot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub id: String,
    pub universe: String,
    pub host: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    pub mac: String,
    pub interface: String,
    pub security_groups: Vec<String>,
    /// Flows it may have tracked at once (S14).
    pub conntrack_budget: u32,
    /// Its host writes flow logs of its traffic.
    pub flow_logs: bool,
    /// Its budget in use, read from its host's dataplane: shown by `GET` on the API of the host
    /// the endpoint is placed on (the only host whose conntrack table charges it), absent
    /// elsewhere and in the answers to edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackUsage>,
}

/// An endpoint's conntrack budget and use on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackUsage {
    pub budget: u64,
    /// Tracked flows charged to it (live, or expired and not yet collected).
    pub used: u64,
    pub available: u64,
    /// New flows refused because the budget was spent, since it was placed there.
    pub exceeded: u64,
}

impl From<CtOwner> for ConntrackUsage {
    fn from(o: CtOwner) -> ConntrackUsage {
        ConntrackUsage {
            budget: o.budget,
            used: o.used,
            available: o.budget.saturating_sub(o.used),
            exceeded: o.exceeded,
        }
    }
}

impl From<&model::Endpoint> for EndpointView {
    fn from(e: &model::Endpoint) -> EndpointView {
        EndpointView {
            id: e.id.clone(),
            universe: e.universe.clone(),
            host: e.host.clone(),
            netns: e.netns.clone(),
            ip: e.ip,
            ipv6: e.ipv6,
            mac: e.mac.clone(),
            interface: e.interface.clone(),
            security_groups: e.security_groups.clone(),
            conntrack_budget: e.conntrack_budget,
            flow_logs: e.flow_logs,
            conntrack: None,
        }
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The `error.code` of an error response, in the response's extensions (for the audit trail).
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", format!("{field}: {message}"))
    }
}

impl From<model::Error> for ApiError {
    fn from(e: model::Error) -> ApiError {
        let status = match e.kind {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, e.code, e.message)
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> ApiError {
        match e {
            store::Error::Rejected(e) => e.into(),
            e @ store::Error::KeyReused { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                e.to_string(),
            ),
            e @ store::Error::Unknown { .. } => {
                tracing::error!(error = %e, "edit outcome unknown");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown", e.to_string())
            }
            e @ store::Error::Halted { .. } => {
                tracing::error!(error = %e, "the store takes no more edits");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_halted", e.to_string())
            }
            e @ store::Error::Denied { .. } => {
                tracing::error!(error = %e, "the store refused this host's credentials");
                ApiError::new(StatusCode::FORBIDDEN, "store_forbidden", e.to_string())
            }
            other if other.is_unavailable() => {
                tracing::error!(error = %other, "store unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", other.to_string())
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message } };
        let mut resp = (self.status, Json(body)).into_response();
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

/// Who is asking (put in the request by [`auth::authenticate`]) and the audit note of the
/// request; every handler behind authentication takes one.
pub struct Caller {
    pub principal: Principal,
    pub note: Note,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        let principal = parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "this route is not behind authentication",
            )
        })?;
        let note = parts.extensions.get::<Note>().cloned().unwrap_or_default();
        Ok(Caller { principal, note })
    }
}

impl Caller {
    /// May the caller do `op` to a `resource` of `universe`? If the universe is hidden from
    /// it, the error is `hidden()`: what the request would get if the object did not exist.
    /// Notes the universe for the audit trail once it is known to be visible.
    fn allow(
        &self,
        resource: Resource,
        op: Op,
        universe: &str,
        hidden: impl FnOnce() -> model::Error,
    ) -> model::Result<()> {
        match auth::decide(&self.principal, resource, op, Some(universe)) {
            Decision::Allow => {
                self.note.universe(universe);
                Ok(())
            }
            Decision::NotFound => Err(hidden()),
            Decision::Forbidden => {
                self.note.universe(universe);
                Err(model::Error::forbidden(auth::forbidden_message(&self.principal, resource, op)))
            }
        }
    }

    /// `found`, the `kind` `id` (a `resource` of the universe `universe_of` it), if the caller
    /// may read it: absent, or in a universe hidden from the caller, it is not found alike.
    fn read<'a, T>(
        &self,
        resource: Resource,
        (kind, id): (&str, &str),
        found: Option<&'a T>,
        universe_of: impl Fn(&T) -> &str,
    ) -> model::Result<&'a T> {
        let missing = || model::Error::not_found(kind, id);
        let object = found.ok_or_else(missing)?;
        self.allow(resource, Op::Read, universe_of(object), missing)?;
        Ok(object)
    }

    /// Whether the caller may read a `resource` of `universe` (lists keep what this allows).
    fn reads(&self, resource: Resource, universe: &str) -> bool {
        auth::decide(&self.principal, resource, Op::Read, Some(universe)) == Decision::Allow
    }

    /// 403 unless the caller's role may do `op` to `resource` at all (no universe involved).
    fn require(&self, resource: Resource, op: Op) -> Result<(), ApiError> {
        match auth::decide(&self.principal, resource, op, None) {
            Decision::Allow => Ok(()),
            _ => {
                Err(model::Error::forbidden(auth::forbidden_message(&self.principal, resource, op))
                    .into())
            }
        }
    }

    /// A security group named in a request body (`field`) that lives in a universe the caller
    /// does not see is "not found", as if it did not exist.
    fn hide_group(&self, state: &State, field: &str, id: &str) -> model::Result<()> {
        match state.groups.get(id) {
            Some(g) if !self.principal.sees(&g.universe) => {
                Err(model::missing(field, "security group", id))
            }
            _ => Ok(()),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

/// The API's router: every route of the README's "REST API" table, `/healthz`, `/metrics` and
/// `/v1/openapi.json` among them.
///
/// Every route but `/healthz` and `/v1/openapi.json` (and every unknown route) passes the
/// layers of [`guard`], then the handler. `/v1/openapi.json` is rate limited by address;
/// `/healthz` is not limited.
pub fn router(state: AppState) -> Router {
    use axum::routing::{delete, post};
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/universes", post(create_universe).get(list_universes))
        .route("/v1/universes/{id}", get(get_universe).delete(delete_universe))
        .route("/v1/security-groups", post(create_group).get(list_groups))
        .route("/v1/security-groups/{id}", get(get_group).delete(delete_group))
        .route("/v1/security-groups/{id}/rules", post(add_rule))
        .route("/v1/security-groups/{id}/rules/{rule_id}", delete(delete_rule))
        .route("/v1/endpoints", post(create_endpoint).get(list_endpoints))
        .route(
            "/v1/endpoints/{id}",
            get(get_endpoint).patch(patch_endpoint).delete(delete_endpoint),
        )
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(delete_token))
        .route("/v1/audit", get(query_audit))
        .route("/v1/events", get(stream_events))
        .route("/v1/rule-stats", get(rule_stats))
        .route("/v1/flow-logs", get(flow_logs))
        .route("/v1/trace", get(trace_packet))
        .fallback(no_route);
    let public = Router::new()
        .route("/v1/openapi.json", get(openapi))
        .merge(crate::ui::routes())
        .layer(axum::middleware::from_fn_with_state(state.limits.clone(), limits::limit_rate));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(public)
        .merge(guard(guarded, &state))
        .with_state(state)
}

/// The router of a host that serves no API (`api.serve = false`: its store holds only its own
/// part of the desired state, so nothing of the API could be answered whole): `/healthz`,
/// `/metrics` (its caller checked as in [`router`]), and 404 `api_not_served` for every other
/// request, saying where to ask instead.
pub fn router_without_api(state: AppState) -> Router {
    let guarded = Router::new().route("/metrics", get(metrics));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(guard(guarded, &state))
        .fallback(api_not_served)
        .with_state(state)
}

/// The layers every guarded route passes, in this order: the audit trail ([`audit::record`],
/// which so sees every answer below it, 401s and 429s included); authentication
/// ([`auth::authenticate`]: who is asking); the rate limit, keyed on that principal, or on the
/// address of a request without one ([`limits::limit_rate`]); the 401 of a request without a
/// principal ([`auth::require`]); the body limits ([`limits::limit_body`]: nothing reads a body
/// before, so only a principal within its rate ever has one read).
fn guard(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    use axum::middleware::{from_fn, from_fn_with_state};
    let limits = state.limits.clone();
    routes
        .method_not_allowed_fallback(method_not_allowed)
        // The last layer added is the outermost.
        .layer(from_fn_with_state(limits.clone(), limits::limit_body))
        .layer(from_fn(auth::require))
        .layer(from_fn_with_state(limits, limits::limit_rate))
        .layer(from_fn_with_state(state.clone(), auth::authenticate))
        .layer(from_fn_with_state(state.clone(), audit::record))
}

// ---- Helpers ----

/// Parses a request body as `T`, naming the field at fault on any error. The body must be a
/// JSON object: it is parsed as a document first, because serde would otherwise also accept a
/// struct written as an array, whose errors could not name fields.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    // 413 when the body is over the limit, 400 otherwise.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(e.status(), "payload_too_large", format!("body: {}", e.body_text()))
        }
        _ => ApiError::invalid("body", e.body_text()),
    })?;
    let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("body", format!("malformed JSON: {}", strip_position(&e)))
    })?;
    if !doc.is_object() {
        return Err(ApiError::invalid("body", "expected a JSON object"));
    }
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path != "." {
            path
        } else {
            // Missing and unknown fields are reported at their parent; their name is the
            // first `quoted` word of serde's message ("missing field `name`").
            let msg = inner.to_string();
            let named = msg.starts_with("missing field `") || msg.starts_with("unknown field `");
            named.then(|| backticked(&msg)).flatten().unwrap_or_else(|| "body".to_owned())
        };
        ApiError::invalid(&field, strip_position(&inner))
    })
}

/// serde_json's message without its " at line L column C" suffix, which says nothing to an API
/// user once the field is named.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) if e.line() > 0 => s[..i].to_owned(),
        _ => s,
    }
}

fn backticked(s: &str) -> Option<String> {
    let start = s.find('`')? + 1;
    let len = s[start..].find('`')?;
    Some(s[start..start + len].to_owned())
}

/// Validates query parameters against the allowed names; returns them as a map.
fn query(
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, ApiError> {
    let Query(pairs) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let mut out = BTreeMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                &k,
                format!("unknown query parameter (expected one of: {})", allowed.join(", ")),
            ));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::invalid(&k, "query parameter given more than once"));
        }
    }
    Ok(out)
}

fn path<T>(p: Result<UrlPath<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|UrlPath(v)| v).map_err(|e| ApiError::invalid("path", e.body_text()))
}

fn json_ok<T: Serialize>(value: &T) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

/// Header of a client's idempotency key: a retry of a mutation with the same key answers the
/// first outcome instead of editing again (kept for `store::IDEMPOTENCY_TTL`). Every mutation
/// answers with the key it was recorded under (the client's, or one made up for it).
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Set (to `true`) on the answer of a retry: what was answered the first time.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// What a mutation request is, for its idempotency record: method, path, idempotency key.
pub struct Mutation {
    method: Method,
    path: String,
    key: Option<String>,
    bad_key: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Mutation {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let (key, bad_key) = match parts.headers.get(IDEMPOTENCY_HEADER) {
            None => (None, None),
            Some(v) => match v.to_str() {
                Ok(k)
                    if !k.is_empty()
                        && k.len() <= 255
                        && k.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    (Some(k.to_owned()), None)
                }
                _ => (None, Some("1 to 255 visible ASCII characters".to_owned())),
            },
        };
        Ok(Mutation {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            key,
            bad_key,
        })
    }
}

impl Mutation {
    /// The idempotency record's identity: the client's key (or a fresh one) and what the
    /// request was (a key sent again with another request is refused).
    fn idempotency(&self, body: Option<&[u8]>) -> Result<store::Idempotency, ApiError> {
        use sha2::Digest;
        if let Some(why) = &self.bad_key {
            return Err(ApiError::invalid("Idempotency-Key", why));
        }
        let digest: String = sha2::Sha256::digest(body.unwrap_or_default())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let fingerprint = format!("{} {} {digest}", self.method, self.path);
        Ok(match &self.key {
            Some(k) => store::Idempotency { key: k.clone(), fingerprint, from_client: true },
            None => store::Idempotency {
                key: format!("verse-{:032x}", rand::random::<u128>()),
                fingerprint,
                from_client: false,
            },
        })
    }
}

/// Commits an edit (recorded under its idempotency key: the edit's result itself, so that a
/// replay goes through `view` as the first answer did), waits until this host has realized it,
/// and answers `status` with the revision header and `view(result)` as the body (none for 204).
/// A retry of a recorded edit answers what was answered the first time; with `record_body`
/// false only the status and revision are recorded (a new token's secret is shown once).
/// The audit record of the request is written in the edit's commit, with what `note` holds
/// and the ids `created` notes of the edit's result.
async fn mutate<T, F, V>(
    st: &AppState,
    note: &Note,
    idem: store::Idempotency,
    status: StatusCode,
    f: F,
    created: fn(&T, &Note),
    view: impl FnOnce(T) -> Option<V>,
) -> ApiResult
where
    F: FnMut(&mut State) -> model::Result<T> + Send,
    T: Serialize + DeserializeOwned + Send + 'static,
    V: Serialize,
{
    mutate_with(st, note, idem, status, f, created, view, true).await
}

/// For [`mutate`]: an edit that creates nothing the audit record names.
fn creates_nothing<T>(_: &T, _: &Note) {}

/// The audit record of an edit made through [`mutate`], for the store to write in its commit.
struct InCommit<'a, T> {
    note: &'a Note,
    created: fn(&T, &Note),
}

impl<T> store::CommitAudit<T> for InCommit<'_, T> {
    fn record(&self, out: &T, status: u16) -> Option<audit::AuditRecord> {
        // A draft: an attempt that does not commit must not leave its ids in the note.
        let draft = self.note.draft();
        (self.created)(out, &draft);
        draft.in_commit(status)
    }

    fn written(&self) {
        self.note.written();
    }
}

#[allow(clippy::too_many_arguments)]
async fn mutate_with<T, F, V>(
    st: &AppState,
    note: &Note,
    idem: store::Idempotency,
    status: StatusCode,
    f: F,
    created: fn(&T, &Note),
    view: impl FnOnce(T) -> Option<V>,
    record_body: bool,
) -> ApiResult
where
    F: FnMut(&mut State) -> model::Result<T> + Send,
    T: Serialize + DeserializeOwned + Send + 'static,
    V: Serialize,
{
    let respond = move |out: &T| {
        (status.as_u16(), record_body.then(|| serde_json::to_value(out).ok()).flatten())
    };
    let audit = InCommit { note, created };
    let key_header = (
        HeaderName::from_static(IDEMPOTENCY_HEADER),
        HeaderValue::from_str(&idem.key).unwrap_or(HeaderValue::from_static("invalid")),
    );
    let name = HeaderName::from_static(REVISION_HEADER);
    match st.store.edit_audited(&idem, f, respond, &audit).await? {
        store::Outcome::Applied { out, revision } => {
            created(&out, note);
            wait_realized(st, revision).await;
            let rev = HeaderValue::from(revision);
            Ok(match view(out) {
                Some(body) => (status, [(name, rev), key_header], Json(body)).into_response(),
                None => (status, [(name, rev), key_header]).into_response(),
            })
        }
        store::Outcome::Replayed(rec) => {
            wait_realized(st, rec.revision).await;
            let status = StatusCode::from_u16(rec.status).unwrap_or(StatusCode::OK);
            let headers = [
                (name, HeaderValue::from(rec.revision)),
                key_header,
                (HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true")),
            ];
            let out = rec.body.and_then(|b| serde_json::from_value::<T>(b).ok());
            let body = out.and_then(|out| {
                created(&out, note);
                view(out)
            });
            Ok(match body {
                Some(body) => (status, headers, Json(body)).into_response(),
                None => (status, headers).into_response(),
            })
        }
    }
}

/// An answer to a mutation: `status`, the revision header, the idempotency key, and `body` if
/// any.
fn revision_response<V: Serialize>(
    status: StatusCode,
    revision: u64,
    key: &str,
    body: Option<V>,
) -> Response {
    let rev = HeaderValue::from(revision);
    let name = HeaderName::from_static(REVISION_HEADER);
    let key_header = (
        HeaderName::from_static(IDEMPOTENCY_HEADER),
        HeaderValue::from_str(key).unwrap_or(HeaderValue::from_static("invalid")),
    );
    match body {
        Some(body) => (status, [(name, rev), key_header], Json(body)).into_response(),
        None => (status, [(name, rev), key_header]).into_response(),
    }
}

/// Waits (bounded by [`REALIZE_TIMEOUT`]) until this host's reconciler and every other healthy
/// host have realized `revision`.
async fn wait_realized(st: &AppState, revision: u64) {
    let mut local = st.realized.clone();
    let mut hosts = match st.store.subscribe_hosts().await {
        Ok(hosts) => hosts,
        Err(e) => {
            // Not knowing the others is never taken as "none of them is healthy": say so, and
            // answer once this host has realized it (as after the timeout below). A client that
            // waits for the fleet (`GET /v1/hosts`) is answered 503 until the records are read.
            let here = local.wait_for(|r| r.revision >= revision);
            let _ = tokio::time::timeout(REALIZE_TIMEOUT, here).await;
            tracing::warn!(revision, error = %e,
                "cannot read the hosts' liveness records; returning before the edit is known to \
                 be realized on the other hosts");
            return;
        }
    };
    let behind = |hosts: &[Host]| -> Vec<String> {
        hosts
            .iter()
            .filter(|h| h.name != st.host && h.healthy && h.revision < revision)
            .map(|h| format!("{} at {}", h.name, h.revision))
            .collect()
    };
    let all = async {
        let start = std::time::Instant::now();
        local
            .wait_for(|r| r.revision >= revision)
            .await
            .map_err(|_| "this host's reconciler is gone")?;
        phases::since(Phase::RealizeLocal, start);
        let start = std::time::Instant::now();
        hosts
            .wait_for(|h| behind(h).is_empty())
            .await
            .map_err(|_| "the store stopped following the hosts")?;
        phases::since(Phase::RealizeFleet, start);
        Ok::<(), &str>(())
    };
    match tokio::time::timeout(REALIZE_TIMEOUT, all).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            tracing::warn!(revision, "{why}; returning before the edit is realized everywhere")
        }
        Err(_) => tracing::warn!(
            revision,
            realized_here = st.realized.borrow().revision,
            behind = ?behind(&hosts.borrow()),
            timeout_s = REALIZE_TIMEOUT.as_secs(),
            "revision not realized by every healthy host in time; returning before the edit is \
             in force everywhere"
        ),
    }
}

/// The hosts as `GET /v1/hosts` shows them: the store's, with this host as it knows itself.
async fn hosts_view(st: &AppState) -> Result<Vec<Host>, ApiError> {
    let mut hosts: Vec<Host> =
        st.store.hosts().await?.into_iter().filter(|h| h.name != st.host).collect();
    hosts.push(Host {
        name: st.host.clone(),
        underlay_ip: st.underlay_ip,
        api: st.api_url.clone(),
        api_fingerprint: st.api_fingerprint.clone(),
        revision: st.realized.borrow().revision,
        errors: st.realized.borrow().errors.clone(),
        healthy: true,
    });
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

/// A namespace that exists on this host, by a name `ip netns` could have made, where the
/// plumbing opens it ([`crate::netlink::NETNS_RUN_DIR`]).
fn check_netns(name: &str, host: &str) -> Result<(), ApiError> {
    model::check_netns(name)?;
    if Path::new(crate::netlink::NETNS_RUN_DIR).join(name).exists() {
        Ok(())
    } else {
        // Like an id in the body that does not exist: a 404 naming the field.
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "netns: network namespace {name:?} does not exist on host {host} (create it with \
                 `ip netns add {name}`)"
            ),
        ))
    }
}

// ---- Handlers ----

async fn healthz() -> &'static str {
    "ok"
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn api_not_served(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "api_not_served",
        format!(
            "this host serves no API (api.serve = false), only /healthz and /metrics: send {method} \
             {} to a host of the fleet that serves the API",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn create_universe(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    caller.require(Resource::Universe, Op::Write)?;
    let req: model::CreateUniverse = parse_body(body)?;
    // Checked before the store's lock is taken: a request with many CIDRs delays no other edit.
    let new = req.check()?;
    let created = |u: &model::Universe, note: &Note| {
        note.universe(&u.id);
        note.object(&u.id);
    };
    let edit = move |s: &mut State| s.add_universe(new.clone());
    mutate(&st, &caller.note, idem, StatusCode::CREATED, edit, created, Some).await
}

async fn list_universes(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    let snap = st.store.snapshot();
    let visible: Vec<_> =
        snap.universes.values().filter(|u| caller.reads(Resource::Universe, &u.id)).collect();
    Ok(json_ok(&visible))
}

async fn get_universe(
    AxState(st): AxState<AppState>,
    caller: Caller,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    let id = path(id)?;
    let snap = st.store.snapshot();
    let u =
        caller.read(Resource::Universe, ("universe", &id), snap.universes.get(&id), |u| &u.id)?;
    Ok(json_ok(u))
}

async fn delete_universe(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    delete_by_id(&st, &caller, m, id, |caller, s, id| {
        let universe = s.universes.get(id).map(|u| u.id.as_str());
        allow_write(caller, Resource::Universe, universe, "universe", id)?;
        s.delete_universe(id)
    })
    .await
}

/// `DELETE` of the object `id`: `edit` checks the caller's access and deletes, inside the edit.
async fn delete_by_id<T>(
    st: &AppState,
    caller: &Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
    edit: impl Fn(&Caller, &mut State, &str) -> model::Result<T> + Send + Sync,
) -> ApiResult
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    let idem = m.idempotency(None)?;
    let id = path(id)?;
    caller.note.object(&id);
    let edit = |s: &mut State| edit(caller, s, &id);
    mutate(st, &caller.note, idem, StatusCode::NO_CONTENT, edit, creates_nothing, |_| None::<()>)
        .await
}

/// The check of an edit of an object (`kind` `id`) of `universe`: the universe must be visible
/// and writable, else the object is not found, as one that does not exist (`None`: the edit
/// itself says so).
fn allow_write(
    caller: &Caller,
    resource: Resource,
    universe: Option<&str>,
    kind: &str,
    id: &str,
) -> model::Result<()> {
    match universe {
        Some(u) => caller.allow(resource, Op::Write, u, || model::Error::not_found(kind, id)),
        None => Ok(()),
    }
}

async fn create_group(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    let req: model::CreateGroup = parse_body(body)?;
    let edit = |s: &mut State| {
        caller.allow(Resource::Group, Op::Write, &req.universe, || {
            model::missing("universe", "universe", &req.universe)
        })?;
        s.create_group(req.clone())
    };
    let created = |g: &model::SecurityGroup, note: &Note| note.object(&g.id);
    mutate(&st, &caller.note, idem, StatusCode::CREATED, edit, created, Some).await
}

async fn list_groups(
    AxState(st): AxState<AppState>,
    caller: Caller,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let q = query(q, &["universe"])?;
    let snap = st.store.snapshot();
    let groups: Vec<_> = snap
        .groups
        .values()
        .filter(|g| q.get("universe").is_none_or(|u| &g.universe == u))
        .filter(|g| caller.reads(Resource::Group, &g.universe))
        .collect();
    Ok(json_ok(&groups))
}

async fn get_group(
    AxState(st): AxState<AppState>,
    caller: Caller,
    headers: HeaderMap,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    let id = path(id)?;
    let snap = st.store.snapshot();
    let found = snap.groups.get(&id);
    let g = caller.read(Resource::Group, ("security group", &id), found, |g| &g.universe)?;
    let (rows, from) = fleet_rule_stats(&st, &caller, &headers, None, Some(&id), None).await?;
    let sums: BTreeMap<&str, Hits> = rows.iter().map(|r| (r.rule.as_str(), r.hits)).collect();
    Ok(json_ok(&GroupView::new(g, |rule| sums.get(rule).copied().unwrap_or_default(), from)))
}

/// Reads this host's dataplane counters, off the async threads.
async fn read_stats(st: &AppState) -> Result<Stats, String> {
    let read = st.stats.clone();
    match tokio::task::spawn_blocking(move || read()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("failed to read the dataplane counters: {e:#}")),
        Err(e) => Err(format!("reading counters: {e}")),
    }
}

/// The rows of this host's rule counters: every rule of `state` the host counts.
fn local_rule_stats(state: &State, stats: &Stats) -> Vec<RuleStats> {
    let hits = &stats.rule_hits;
    let mut rows = Vec::new();
    for g in state.groups.values() {
        for r in g.ingress.iter().chain(&g.egress) {
            let Some(&flows) = model::rule_bits(&r.id).and_then(|b| hits.get(&b)) else {
                continue;
            };
            rows.push(RuleStats {
                rule: r.id.clone(),
                group: g.id.clone(),
                universe: g.universe.clone(),
                hits: Hits {
                    flows,
                    packets: model::rule_bits(&r.id)
                        .and_then(|b| stats.rule_packets.get(&b))
                        .copied()
                        .unwrap_or(0),
                },
            });
        }
    }
    rows
}

/// The rule counters of every host (or of `host`), summed per rule, of the rules the caller may
/// read (and `universe`, `group` if given); with the hosts counted and those that did not
/// answer.
async fn fleet_rule_stats(
    st: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    universe: Option<&str>,
    group: Option<&str>,
    host: Option<&str>,
) -> Result<(Vec<RuleStats>, HitsFrom), ApiError> {
    let mut from = HitsFrom::default();
    let mut rows: Vec<RuleStats> = Vec::new();
    if host.is_none_or(|h| h == st.host) {
        match read_stats(st).await {
            Ok(stats) => {
                rows.extend(local_rule_stats(&st.store.snapshot(), &stats));
                from.hosts.push(st.host.clone());
            }
            Err(error) => from.missing.push(MissingHost { host: st.host.clone(), error }),
        }
    }
    let (peers, missing) = relay::peers(&st.store.hosts().await?, &st.host, host);
    from.missing.extend(missing.into_iter().map(|(host, error)| MissingHost { host, error }));
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(u) = universe {
        query.push(("universe", u.to_owned()));
    }
    if let Some(g) = group {
        query.push(("group", g.to_owned()));
    }
    let token = bearer(headers);
    let asks = peers.into_iter().map(|peer| {
        let token = token.clone();
        let query = query.clone();
        async move {
            let answer = match token {
                None => Err("the request carries no token to present to it (root on the \
                             local socket sees this host only; use a token for the fleet)"
                    .to_owned()),
                Some(t) => {
                    relay::get_json::<Vec<RuleStats>>(&peer, "/v1/rule-stats", &query, &t).await
                }
            };
            (peer.name, answer)
        }
    });
    for (name, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(r) => {
                rows.extend(r);
                from.hosts.push(name);
            }
            Err(error) => from.missing.push(MissingHost { host: name, error }),
        }
    }
    from.hosts.sort();
    let mut sums: BTreeMap<String, RuleStats> = BTreeMap::new();
    for r in rows {
        if universe.is_some_and(|u| u != r.universe)
            || group.is_some_and(|g| g != r.group)
            || !caller.reads(Resource::Group, &r.universe)
        {
            continue;
        }
        match sums.get_mut(&r.rule) {
            Some(sum) => sum.hits += r.hits,
            None => {
                sums.insert(r.rule.clone(), r);
            }
        }
    }
    Ok((sums.into_values().collect(), from))
}

/// `GET /v1/rule-stats?universe=&group=&host=`: new flows admitted per rule, summed over the
/// fleet (or one host). A host asked with `host=` its own name answers for itself only.
async fn rule_stats(
    AxState(st): AxState<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    caller.require(Resource::Group, Op::Read)?;
    let q = query(q, &["universe", "group", "host"])?;
    let (rows, from) = fleet_rule_stats(
        &st,
        &caller,
        &headers,
        q.get("universe").map(String::as_str),
        q.get("group").map(String::as_str),
        q.get("host").map(String::as_str),
    )
    .await?;
    // A host that is asked for one host's counters and cannot give them says so.
    if let Some(m) = from.missing.iter().find(|m| q.get("host") == Some(&m.host)) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "host_unavailable",
            format!("{}: {}", m.host, m.error),
        ));
    }
    Ok(json_ok(&rows))
}

/// The check of an edit of group `id` ([`allow_write`]).
fn allow_group_write(caller: &Caller, s: &State, id: &str) -> model::Result<()> {
    let universe = s.groups.get(id).map(|g| g.universe.as_str());
    allow_write(caller, Resource::Group, universe, "security group", id)
}

async fn delete_group(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    delete_by_id(&st, &caller, m, id, |caller, s, id| {
        allow_group_write(caller, s, id)?;
        s.delete_group(id)
    })
    .await
}

async fn add_rule(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    let id = path(id)?;
    caller.note.object(&id);
    let req: model::CreateRule = parse_body(body)?;
    // Checked before the store's lock is taken.
    let rule = req.check()?;
    let edit = |s: &mut State| {
        allow_group_write(&caller, s, &id)?;
        if let Some(peer) = &req.group {
            caller.hide_group(s, "group", peer)?;
        }
        s.insert_rule(&id, rule.clone())
    };
    let created = |r: &model::Rule, note: &Note| note.object(&r.id);
    mutate(&st, &caller.note, idem, StatusCode::CREATED, edit, created, Some).await
}

async fn delete_rule(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    ids: Result<UrlPath<(String, String)>, PathRejection>,
) -> ApiResult {
    let idem = m.idempotency(None)?;
    let (group, rule) = path(ids)?;
    caller.note.object(&group);
    caller.note.object(&rule);
    let edit = |s: &mut State| {
        allow_group_write(&caller, s, &group)?;
        s.delete_rule(&group, &rule)
    };
    let note = &caller.note;
    mutate(&st, note, idem, StatusCode::NO_CONTENT, edit, creates_nothing, |()| None::<()>).await
}

/// The checks of a new endpoint: its universe visible and writable, its groups visible.
fn allow_new_endpoint(
    caller: &Caller,
    s: &State,
    req: &model::CreateEndpoint,
) -> model::Result<()> {
    caller.allow(Resource::Endpoint, Op::Write, &req.universe, || {
        model::missing("universe", "universe", &req.universe)
    })?;
    for (i, g) in req.security_groups.iter().flatten().enumerate() {
        caller.hide_group(s, &format!("security_groups[{i}]"), g)?;
    }
    Ok(())
}

async fn create_endpoint(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    let mut req: model::CreateEndpoint = parse_body(body)?;
    // Checked before looking at this host's namespaces or the fleet's hosts, and again in the
    // edit.
    allow_new_endpoint(&caller, &st.store.snapshot(), &req)?;
    match req.host.as_deref() {
        None => check_netns(&req.netns, &st.host)?,
        Some(h) if h == st.host => check_netns(&req.netns, &st.host)?,
        Some(h) => check_placement(&st, h).await?,
    }
    req.conntrack_budget.get_or_insert(i64::from(st.default_conntrack_budget));
    let host = st.host.clone();
    let edit = |s: &mut State| {
        allow_new_endpoint(&caller, s, &req)?;
        s.create_endpoint(req.clone(), &host)
    };
    let respond = |ep: &model::Endpoint| {
        (StatusCode::CREATED.as_u16(), serde_json::to_value(EndpointView::from(ep)).ok())
    };
    let (ep, revision) = match st.store.edit_recorded(&idem, edit, respond).await? {
        store::Outcome::Applied { out, revision } => (out, revision),
        store::Outcome::Replayed(rec) => {
            // The first attempt's endpoint, if it is still there (it is removed again when its
            // host could not realize it: then that attempt was answered an error).
            let id = rec.body.as_ref().and_then(|b| b["id"].as_str()).unwrap_or_default();
            let snap = st.store.snapshot();
            let Some(ep) = snap.endpoints.get(id).cloned() else {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "Idempotency-Key: the request sent first with this key created endpoint \
                         {id}, which is gone (removed, or never realized on its host): send the \
                         request again with a new key"
                    ),
                ));
            };
            caller.note.object(&ep.id);
            wait_realized(&st, rec.revision).await;
            endpoint_realized(&st, &ep, rec.revision).await?;
            let mut response = revision_response(
                StatusCode::CREATED,
                rec.revision,
                &idem.key,
                Some(EndpointView::from(&ep)),
            );
            response
                .headers_mut()
                .insert(HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"));
            return Ok(response);
        }
    };
    caller.note.object(&ep.id);
    wait_realized(&st, revision).await;
    if let Err(e) = endpoint_realized(&st, &ep, revision).await {
        // Not in force on its host: removed again, so nothing is left half-applied.
        tracing::warn!(endpoint = %ep.id, host = %ep.host, error = %e.message,
            "endpoint not realized on its host; removing it again");
        roll_back_endpoint(&st, &ep.id).await;
        return Err(e);
    }
    Ok(revision_response(StatusCode::CREATED, revision, &idem.key, Some(EndpointView::from(&ep))))
}

/// An endpoint may only be placed on a host of the fleet (one that has registered), and only
/// while that host is healthy: its versed plumbs it.
async fn check_placement(st: &AppState, host: &str) -> Result<(), ApiError> {
    model::check_host(host)?;
    let hosts = st.store.hosts().await?;
    match hosts.iter().find(|h| h.name == host) {
        None => {
            let mut known: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
            known.push(&st.host);
            known.sort_unstable();
            known.dedup();
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("host: host {host} is not in the fleet (its hosts: {})", known.join(", ")),
            ))
        }
        Some(h) if !h.healthy => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "host: host {host} is not healthy (its versed is stopped or cut off from the \
                 store), so it cannot plumb the endpoint; nothing was created"
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// Whether `ep`'s host has realized `revision` with `ep` in force (S13): an error naming the
/// host and the cause if it reported a failure for it, or did not get that far in time.
async fn endpoint_realized(
    st: &AppState,
    ep: &model::Endpoint,
    revision: u64,
) -> Result<(), ApiError> {
    let (realized, errors) = if ep.host == st.host {
        let r = st.realized.borrow();
        (r.revision, r.errors.clone())
    } else {
        match st.store.hosts().await?.into_iter().find(|h| h.name == ep.host) {
            Some(h) if h.healthy => (h.revision, h.errors),
            _ => (0, Vec::new()),
        }
    };
    if let Some(e) = errors.iter().find(|e| e.endpoint == ep.id) {
        let cause = format!("host {} could not plumb endpoint {}: {}", ep.host, ep.id, e.message);
        return Err(match e.code.as_str() {
            "invalid_argument" => ApiError::invalid("netns", cause),
            "not_found" => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("netns: {cause}"))
            }
            "conflict" => ApiError::new(StatusCode::CONFLICT, "conflict", cause),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "not_realized", cause),
        });
    }
    if realized < revision {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "host: host {} did not realize revision {revision} within {} s (it is at \
                 {realized}), so the endpoint is not in force there; it was removed again",
                ep.host,
                REALIZE_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(())
}

/// Removes an endpoint that could not be realized, and waits for its hosts to follow.
async fn roll_back_endpoint(st: &AppState, id: &str) {
    let id = id.to_owned();
    let removal = st
        .store
        .edit(move |s| {
            if s.endpoints.contains_key(&id) {
                s.delete_endpoint(&id).map(|_| ())
            } else {
                Ok(())
            }
        })
        .await;
    match removal {
        Ok(((), revision)) => wait_realized(st, revision).await,
        Err(e) => tracing::error!(error = %e, "failed to remove an endpoint that was not realized"),
    }
}

async fn list_endpoints(
    AxState(st): AxState<AppState>,
    caller: Caller,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let q = query(q, &["universe", "host"])?;
    let snap = st.store.snapshot();
    let chosen: Vec<&model::Endpoint> = snap
        .endpoints
        .values()
        .filter(|e| q.get("universe").is_none_or(|u| &e.universe == u))
        .filter(|e| q.get("host").is_none_or(|h| &e.host == h))
        .filter(|e| caller.reads(Resource::Endpoint, &e.universe))
        .collect();
    let stats = if chosen.iter().any(|e| e.host == st.host) {
        Some(stats_or_500(&st).await?)
    } else {
        None
    };
    let eps: Vec<EndpointView> =
        chosen.into_iter().map(|e| view_with_usage(&st, stats.as_ref(), e)).collect();
    Ok(json_ok(&eps))
}

async fn get_endpoint(
    AxState(st): AxState<AppState>,
    caller: Caller,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    let id = path(id)?;
    let snap = st.store.snapshot();
    let found = snap.endpoints.get(&id);
    let e = caller.read(Resource::Endpoint, ("endpoint", &id), found, |e| &e.universe)?;
    let stats = if e.host == st.host { Some(stats_or_500(&st).await?) } else { None };
    Ok(json_ok(&view_with_usage(&st, stats.as_ref(), e)))
}

/// `e` as the API shows it, with its conntrack use if `stats` (this host's) has it.
fn view_with_usage(st: &AppState, stats: Option<&Stats>, e: &model::Endpoint) -> EndpointView {
    let mut view = EndpointView::from(e);
    view.conntrack = stats.and_then(|s| s.usage(&st.host, e)).map(ConntrackUsage::from);
    view
}

/// [`read_stats`], a failure answered 500.
async fn stats_or_500(st: &AppState) -> Result<Stats, ApiError> {
    read_stats(st).await.map_err(|e| {
        tracing::error!(error = %e, "reading dataplane counters");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
    })
}

/// The check of an edit of endpoint `id` ([`allow_write`]).
fn allow_endpoint_write(caller: &Caller, s: &State, id: &str) -> model::Result<()> {
    let universe = s.endpoints.get(id).map(|e| e.universe.as_str());
    allow_write(caller, Resource::Endpoint, universe, "endpoint", id)
}

async fn patch_endpoint(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    let id = path(id)?;
    caller.note.object(&id);
    let req: model::PatchEndpoint = parse_body(body)?;
    let edit = |s: &mut State| {
        allow_endpoint_write(&caller, s, &id)?;
        for (i, g) in req.security_groups.iter().flatten().enumerate() {
            caller.hide_group(s, &format!("security_groups[{i}]"), g)?;
        }
        s.patch_endpoint(&id, req.clone())
    };
    let view = |e: model::Endpoint| Some(EndpointView::from(&e));
    mutate(&st, &caller.note, idem, StatusCode::OK, edit, creates_nothing, view).await
}

async fn delete_endpoint(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    delete_by_id(&st, &caller, m, id, |caller, s, id| {
        allow_endpoint_write(caller, s, id)?;
        s.delete_endpoint(id)
    })
    .await
}

async fn list_hosts(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.require(Resource::Host, Op::Read)?;
    Ok(json_ok(&hosts_view(&st).await?))
}

/// A token as the API shows it: everything but the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub role: Role,
    pub universe: Option<String>,
    pub description: String,
    pub created: Timestamp,
    pub expires: Option<Timestamp>,
}

impl From<&model::Token> for TokenView {
    fn from(t: &model::Token) -> TokenView {
        TokenView {
            id: t.id.clone(),
            role: t.role,
            universe: t.universe.clone(),
            description: t.description.clone(),
            created: t.created,
            expires: t.expires,
        }
    }
}

/// The answer of `POST /v1/tokens`: the token and, this once, its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub role: Role,
    pub universe: Option<String>,
    pub description: String,
    pub created: Timestamp,
    pub expires: Option<Timestamp>,
    /// The secret: `Authorization: Bearer <token>`. Not shown again, not stored.
    pub token: String,
}

async fn create_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let idem = m.idempotency(body.as_deref().ok())?;
    caller.require(Resource::Token, Op::Write)?;
    let req: model::CreateToken = parse_body(body)?;
    if let Some(u) = &req.universe {
        caller.note.universe(u);
    }
    let fresh = auth::new_secret().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot draw a random token: {e}"),
        )
    })?;
    caller.note.object(&fresh.id);
    let secret = model::TokenSecret {
        id: fresh.id.clone(),
        hash: fresh.hash.clone(),
        now: std::time::SystemTime::now(),
    };
    let token = fresh.secret;
    let view = move |t: model::Token| {
        let v = TokenView::from(&t);
        Some(CreatedToken {
            id: v.id,
            role: v.role,
            universe: v.universe,
            description: v.description,
            created: v.created,
            expires: v.expires,
            token,
        })
    };
    mutate_with(
        &st,
        &caller.note,
        idem,
        StatusCode::CREATED,
        move |s| s.create_token(req.clone(), &secret),
        creates_nothing,
        view,
        false,
    )
    .await
}

async fn list_tokens(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.require(Resource::Token, Op::Read)?;
    let snap = st.store.snapshot();
    Ok(json_ok(&snap.tokens.values().map(TokenView::from).collect::<Vec<_>>()))
}

async fn delete_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    m: Mutation,
    id: Result<UrlPath<String>, PathRejection>,
) -> ApiResult {
    let idem = m.idempotency(None)?;
    caller.require(Resource::Token, Op::Write)?;
    let id = path(id)?;
    caller.note.object(&id);
    let edit = move |s: &mut State| s.delete_token(&id);
    mutate(&st, &caller.note, idem, StatusCode::NO_CONTENT, edit, creates_nothing, |_| None::<()>)
        .await
}

/// `since` of `GET /v1/audit`: an RFC 3339 time in UTC, or how long ago (`1h`, `30m`; see
/// [`model::parse_time`]).
fn parse_since(text: &str) -> Result<std::time::SystemTime, ApiError> {
    let now = std::time::SystemTime::now();
    match model::parse_time(text) {
        Some(model::Time::At(t)) => Ok(t),
        Some(model::Time::Span(ago)) => Ok(now.checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH)),
        None => Err(ApiError::invalid("since", model::time_syntax(text))),
    }
}

async fn query_audit(
    AxState(st): AxState<AppState>,
    caller: Caller,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    caller.require(Resource::Audit, Op::Read)?;
    let q = query(q, &["universe", "since", "limit"])?;
    let since = q.get("since").map(|s| parse_since(s)).transpose()?;
    let limit = match q.get("limit") {
        None => audit::DEFAULT_LIMIT,
        Some(l) => {
            // Decimal digits without a sign or a leading zero, as the OpenAPI document says.
            let decimal =
                !l.starts_with('0') && !l.is_empty() && l.bytes().all(|c| c.is_ascii_digit());
            decimal
                .then(|| l.parse::<usize>().ok())
                .flatten()
                .filter(|n| (1..=audit::MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "limit",
                        format!("{l:?} is not a number within 1..={}", audit::MAX_LIMIT),
                    )
                })?
        }
    };
    // A confined principal sees its universe's records only; another universe's are as
    // absent as its objects.
    let universe = match (caller.principal.universe(), q.get("universe")) {
        (Some(own), Some(asked)) if own != asked => {
            return Ok(json_ok(&Vec::<audit::AuditRecord>::new()))
        }
        (Some(own), _) => Some(own.to_owned()),
        (None, asked) => asked.cloned(),
    };
    let records = st.store.query_audit(&audit::Query { since, universe, limit }).await?;
    Ok(json_ok(&records))
}

/// Records `GET /v1/flow-logs` answers by default, and at most.
pub const FLOW_LOGS_DEFAULT_LIMIT: usize = 1000;
pub const FLOW_LOGS_MAX_LIMIT: usize = 10_000;

/// `GET /v1/flow-logs?endpoint=&since=&limit=&host=`: the flow log records of one endpoint,
/// oldest first, as its host wrote them (this host's files, or relayed from the endpoint's host;
/// `host=` names the host to read). An endpoint of a universe the caller does not see is a 404.
async fn flow_logs(
    AxState(st): AxState<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    caller.require(Resource::Endpoint, Op::Read)?;
    let q = query(q, &["endpoint", "since", "limit", "host"])?;
    let id = q.get("endpoint").ok_or_else(|| {
        ApiError::invalid("endpoint", "required: the endpoint whose records to read")
    })?;
    let since = q.get("since").map(|s| parse_since(s)).transpose()?;
    let limit = match q.get("limit") {
        None => FLOW_LOGS_DEFAULT_LIMIT,
        Some(l) => {
            let decimal =
                !l.starts_with('0') && !l.is_empty() && l.bytes().all(|c| c.is_ascii_digit());
            decimal
                .then(|| l.parse::<usize>().ok())
                .flatten()
                .filter(|n| (1..=FLOW_LOGS_MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "limit",
                        format!("{l:?} is not a number within 1..={FLOW_LOGS_MAX_LIMIT}"),
                    )
                })?
        }
    };
    let snap = st.store.snapshot();
    let found = snap.endpoints.get(id);
    let e = caller.read(Resource::Endpoint, ("endpoint", id), found, |e| &e.universe)?;
    let universe = e.universe.clone();
    let host = q.get("host").cloned().unwrap_or_else(|| e.host.clone());
    let records: Vec<FlowLogRecord> = if host == st.host {
        let Some(logs) = st.flow_logs.clone() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "this host keeps no flow logs",
            ));
        };
        let id = id.clone();
        let read = tokio::task::spawn_blocking(move || {
            flowlogs::read(&logs.dir, logs.keep, &id, since, limit)
        })
        .await;
        match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("reading flow logs: {e}"),
                ))
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                ))
            }
        }
    } else {
        let (peers, missing) = relay::peers(&st.store.hosts().await?, &st.host, Some(&host));
        let unavailable = |why: String| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "host_unavailable",
                format!("{host}: {why}"),
            )
        };
        if let Some((_, why)) = missing.into_iter().next() {
            return Err(unavailable(why));
        }
        let Some(peer) = peers.into_iter().next() else {
            return Err(ApiError::invalid("host", format!("{host:?} is no host of the fleet")));
        };
        let Some(token) = bearer(&headers) else {
            return Err(unavailable(
                "the request carries no token to present to it (root on the local socket sees this host only; use a token)".into(),
            ));
        };
        let mut relayed = vec![("endpoint", id.clone()), ("limit", limit.to_string())];
        if let Some(s) = q.get("since") {
            relayed.push(("since", s.clone()));
        }
        relay::get_json::<Vec<FlowLogRecord>>(&peer, "/v1/flow-logs", &relayed, &token)
            .await
            .map_err(unavailable)?
    };
    // What another host answered is held to the same rule: this endpoint's universe only.
    let records: Vec<FlowLogRecord> =
        records.into_iter().filter(|r| r.endpoint == *id && r.universe == universe).collect();
    Ok(json_ok(&records))
}

/// Most recent events a stream may start with (`recent=`), per host.
pub const MAX_RECENT: usize = 100_000;

/// The bearer token of a request, to present to the other hosts when relaying it.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// A notice about `host`, from this host.
fn notice(host: &str, message: String) -> Arc<StreamItem> {
    Arc::new(StreamItem::Notice(Notice { time: Timestamp::now(), host: host.to_owned(), message }))
}

/// `GET /v1/events`: the verdict events of every host (or of `host=`), filtered, as JSON
/// lines or server-sent events. `recent=N` starts with the N most recent events each host
/// kept; `follow=false` ends the stream after them.
async fn stream_events(
    AxState(st): AxState<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    use futures::stream::{self, StreamExt};
    caller.require(Resource::Endpoint, Op::Read)?;
    let mut allowed: Vec<&str> = events::FILTER_PARAMS.to_vec();
    allowed.extend(["recent", "follow"]);
    let mut q = query(q, &allowed)?;
    let recent = match q.remove("recent") {
        None => 0,
        Some(n) => n.parse::<usize>().ok().filter(|n| *n <= MAX_RECENT).ok_or_else(|| {
            ApiError::invalid("recent", format!("{n:?} is not a number within 0..={MAX_RECENT}"))
        })?,
    };
    let follow = match q.remove("follow").as_deref() {
        None | Some("true") => true,
        Some("false") => false,
        Some(v) => {
            return Err(ApiError::invalid("follow", format!("{v:?} is neither true nor false")))
        }
    };
    let mut filter = Filter::parse(&q).map_err(|(field, msg)| ApiError::invalid(&field, msg))?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    let visible = filter.confine(caller.principal.universe());

    let mut streams: Vec<stream::BoxStream<'static, Arc<StreamItem>>> = Vec::new();
    if visible {
        let me = st.host.clone();
        if filter.host.as_deref().is_none_or(|h| h == me) {
            streams.push(local_events(st.events.clone(), filter.clone(), recent, follow));
        }
        let (peers, missing) = relay::peers(&st.store.hosts().await?, &me, filter.host.as_deref());
        let missing: Vec<Arc<StreamItem>> = missing
            .into_iter()
            .map(|(host, why)| notice(&host, format!("{host}: events not shown: {why}")))
            .collect();
        streams.push(stream::iter(missing).boxed());
        let token = bearer(&headers);
        let mut relayed = filter.to_query();
        relayed.push(("recent", recent.to_string()));
        relayed.push(("follow", follow.to_string()));
        for peer in peers {
            let Some(token) = token.clone() else {
                let why = "the request carries no token to present to it (root on the local \
                           socket sees this host only; use a token for the fleet)";
                streams.push(
                    stream::iter([notice(
                        &peer.name,
                        format!("{}: events not shown: {why}", peer.name),
                    )])
                    .boxed(),
                );
                continue;
            };
            let name = peer.name.clone();
            let keep = filter.clone();
            let lines = relay::lines::<StreamItem>(peer, "/v1/events", relayed.clone(), token)
                .filter_map(move |item| {
                    let out = match item {
                        // The host asked applied the filter; checked again all the same.
                        Ok(StreamItem::Event(e)) if !keep.matches(&e) => None,
                        Ok(item) => Some(Arc::new(item)),
                        Err(why) => Some(notice(&name, format!("{name}: events stopped: {why}"))),
                    };
                    std::future::ready(out)
                });
            streams.push(lines.boxed());
        }
    }
    let body = stream::select_all(streams).map(move |item| {
        let mut line = serde_json::to_vec(&*item).unwrap_or_default();
        let framed = if sse {
            let mut out = b"data: ".to_vec();
            out.append(&mut line);
            out.extend_from_slice(b"\n\n");
            out
        } else {
            line.push(b'\n');
            line
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(framed))
    });
    Ok((
        [(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// This host's events that `filter` keeps: the `recent` most recent, then (with `follow`) the
/// live ones. A stream that reads too slowly to keep up is told how many it missed.
fn local_events(
    hub: Arc<Hub>,
    filter: Filter,
    recent: usize,
    follow: bool,
) -> futures::stream::BoxStream<'static, Arc<StreamItem>> {
    use futures::stream::{self, StreamExt};
    let keep = move |i: &StreamItem| match i {
        StreamItem::Event(e) => filter.matches(e),
        StreamItem::Notice(n) => filter.host.as_ref().is_none_or(|h| *h == n.host),
    };
    // Subscribed before the history is read: an item published in between is in both, and
    // skipped the second time.
    let live = follow.then(|| hub.subscribe());
    let history = if recent > 0 { hub.recent(recent, &keep) } else { Vec::new() };
    let seen: Vec<Arc<StreamItem>> = history.clone();
    let head = stream::iter(history);
    let Some(rx) = live else {
        return head.boxed();
    };
    let host = hub.host().to_owned();
    let tail = stream::unfold((rx, seen), move |(mut rx, mut seen)| {
        let keep = keep.clone();
        let host = host.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(item) => {
                        if !seen.is_empty() {
                            if seen.iter().any(|s| Arc::ptr_eq(s, &item)) {
                                continue;
                            }
                            seen.clear();
                        }
                        if keep(&item) {
                            return Some((item, (rx, seen)));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let msg = format!(
                            "{host}: {n} events not shown: this stream was read too slowly"
                        );
                        return Some((notice(&host, msg), (rx, seen)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    head.chain(tail).boxed()
}

/// `GET /v1/trace`: this host's part of a packet's path (see [`crate::trace`]). Universes the
/// caller does not see answer as if their ids did not exist; `run` needs the right to run
/// traces (editors and admins).
/// `GET /v1/trace?host=<there>` asked of another host: relayed there with the caller's token
/// (which there applies the caller's own access), and its answer returned as it is, once it
/// names `there` as the host that answered.
async fn relay_trace(
    st: &AppState,
    headers: &HeaderMap,
    there: &str,
    q: &BTreeMap<String, String>,
) -> ApiResult {
    let unavailable = |why: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "host_unavailable",
            format!("{there}: {why}"),
        )
    };
    let (peers, missing) = relay::peers(&st.store.hosts().await?, &st.host, Some(there));
    if let Some((_, why)) = missing.into_iter().next() {
        if !st.store.hosts().await?.iter().any(|h| h.name == there) {
            return Err(ApiError::invalid("host", format!("{there:?} is no host of the fleet")));
        }
        return Err(unavailable(why));
    }
    let Some(peer) = peers.into_iter().next() else {
        return Err(ApiError::invalid("host", format!("{there:?} is no host of the fleet")));
    };
    let Some(token) = bearer(headers) else {
        return Err(unavailable(
            "the request carries no token to present to it (root on the local socket traces \
             this host only; use a token)"
                .into(),
        ));
    };
    let relayed: Vec<(&str, String)> = q.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let answer: trace::TraceAnswer =
        relay::get_json(&peer, "/v1/trace", &relayed, &token).await.map_err(unavailable)?;
    if answer.host != there {
        return Err(unavailable(format!("the answer came from {}, not from it", answer.host)));
    }
    Ok(json_ok(&answer))
}

async fn trace_packet(
    AxState(st): AxState<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let q = query(q, &trace::QUERY)?;
    let req = trace::request_from_query(&q)?;
    {
        let snap = st.store.snapshot();
        for (field, universe) in trace::universes_named(&snap, &req) {
            let id = match field {
                "from" => req.from.clone(),
                "to" => req.to.clone(),
                _ => universe.clone(),
            };
            let what = if field == "universe" { "universe" } else { "endpoint" };
            caller
                .allow(Resource::Trace, Op::Read, &universe, || model::missing(field, what, &id))?;
            if req.run {
                caller.allow(Resource::Trace, Op::Write, &universe, || {
                    model::missing(field, what, &id)
                })?;
            }
        }
    }
    if let Some(there) = q.get("host").filter(|h| **h != st.host) {
        return relay_trace(&st, &headers, there, &q).await;
    }
    let Some(source) = st.trace.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{} has no dataplane to trace", st.host),
        ));
    };
    let host = st.host.clone();
    let internal = |what: &str, e: anyhow::Error| {
        tracing::error!(error = %format!("{e:#}"), "{what}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{what}: {e:#}"))
    };
    let work = tokio::task::spawn_blocking(move || -> Result<trace::TraceAnswer, ApiError> {
        let realized =
            source.realized().map_err(|e| internal("reading what this host realized", e))?;
        // The realized state may lag the current one: ids are checked again against it.
        for (field, universe) in trace::universes_named(&realized.state, &req) {
            if !caller.reads(Resource::Trace, &universe) {
                let id = if field == "from" { &req.from } else { &req.to };
                return Err(model::missing(field, "endpoint", id).into());
            }
        }
        let (mut answer, run) = match trace::trace(&host, &realized, &req)? {
            Ok(done) => done,
            Err(trace::NotHere::AskHost { host: there }) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "wrong_host",
                    format!(
                        "from: the sender is placed on {there}, and the receiver is not on {host}: \
                         ask {there}'s API"
                    ),
                ))
            }
        };
        if let (true, Some(input)) = (req.run, run) {
            answer.kernel =
                Some(source.run(&input).map_err(|e| internal("running the kernel program", e))?);
        }
        Ok(answer)
    });
    match work.await {
        Ok(answer) => Ok(json_ok(&answer?)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("tracing: {e}"),
        )),
    }
}

async fn metrics(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.require(Resource::Metrics, Op::Read)?;
    let stats = read_stats(&st).await.map_err(|e| {
        tracing::error!(error = %e, "reading dataplane counters");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
    })?;
    let events = st.events.counts();
    let text = render_metrics(
        &st.store.snapshot(),
        &st.host,
        st.realized.borrow().revision,
        &stats,
        &events,
        &st.audit,
        (st.store.watch_stats(), st.store.lease_stats()),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding metrics: {e}"),
        )
    })?;
    Ok((
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        text,
    )
        .into_response())
}

/// The `/metrics` text (OpenMetrics, which Prometheus reads) of host `host`.
pub fn render_metrics(
    state: &State,
    host: &str,
    realized: u64,
    stats: &Stats,
    events: &EventLimiter,
    audit: &Auditor,
    (watch, leases): (crate::store::WatchStats, crate::store::LeaseStats),
) -> Result<String, std::fmt::Error> {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    // A registry per scrape: every value is read afresh from the state and the dataplane, so
    // nothing is cached between scrapes.
    let mut reg = Registry::with_prefix("verse");
    let drops = Family::<Vec<(String, String)>, Counter>::default();
    let drop_bytes = Family::<Vec<(String, String)>, Counter>::default();
    for reason in DropReason::ALL {
        for hook in Hook::ALL {
            let n = stats.drops.get(&(reason, hook)).copied().unwrap_or_default();
            let labels = vec![
                ("reason".to_owned(), reason.label().to_owned()),
                ("hook".to_owned(), hook.label().to_owned()),
            ];
            drops.get_or_create(&labels).inc_by(n.packets);
            drop_bytes.get_or_create(&labels).inc_by(n.bytes);
        }
    }
    reg.register("drops", "Packets dropped by the dataplane, by reason and hook", drops);
    reg.register(
        "drop_bytes",
        "Bytes of the packets dropped by the dataplane, by reason and hook",
        drop_bytes,
    );
    let outcomes = Family::<Vec<(String, String)>, Counter>::default();
    for (kind, name) in [(event_kind::DROP, "drop"), (event_kind::NEW_FLOW, "new_flow")] {
        let k = usize::from(kind);
        for (outcome, n) in [
            ("emitted", events.emitted[k]),
            ("suppressed", events.suppressed[k]),
            ("lost", events.lost[k]),
        ] {
            let labels = vec![
                ("kind".to_owned(), name.to_owned()),
                ("outcome".to_owned(), outcome.to_owned()),
            ];
            outcomes.get_or_create(&labels).inc_by(n);
        }
    }
    reg.register(
        "events",
        "Verdict events the dataplane had to report, by kind and what became of them (emitted, suppressed by the rate limit, lost for want of room in the ring buffer)",
        outcomes,
    );
    let rule_hits = Family::<Vec<(String, String)>, Counter>::default();
    let rule_packets = Family::<Vec<(String, String)>, Counter>::default();
    for row in local_rule_stats(state, stats) {
        let labels = vec![
            ("universe".to_owned(), row.universe),
            ("group".to_owned(), row.group),
            ("rule".to_owned(), row.rule),
        ];
        rule_hits.get_or_create(&labels).inc_by(row.hits.flows);
        rule_packets.get_or_create(&labels).inc_by(row.hits.packets);
    }
    reg.register(
        "rule_hits",
        "New flows admitted by each rule on this host (every rule whose entries the host holds; 0 if it never matched)",
        rule_hits,
    );
    reg.register(
        "rule_packets",
        "Packets admitted by each rule on this host since versed started, both ways of every flow it admitted (counted in conntrack, read at each flow-log interval)",
        rule_packets,
    );
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    };
    let rules: usize = state.groups.values().map(|g| g.ingress.len() + g.egress.len()).sum();
    gauge(
        &mut reg,
        "endpoints",
        "Endpoints in the desired state this host holds (every host's; a host that serves no API holds only the universes with an endpoint on it)",
        state.endpoints.len() as u64,
    );
    gauge(
        &mut reg,
        "rules",
        "Security group rules in the desired state this host holds",
        rules as u64,
    );
    gauge(
        &mut reg,
        "security_groups",
        "Security groups in the desired state this host holds",
        state.groups.len() as u64,
    );
    gauge(
        &mut reg,
        "universes",
        "Universes in the desired state this host holds",
        state.universes.len() as u64,
    );
    gauge(
        &mut reg,
        "map_entries",
        "Entries this host holds in its dataplane's maps for the desired state (endpoints, routes, CIDR classes, policy, peer hosts, VNIs, rule slots; conntrack aside)",
        stats.map_entries,
    );
    gauge(
        &mut reg,
        "resident_memory_bytes",
        "Resident memory of this host's versed, bytes",
        stats.resident_bytes,
    );
    gauge(&mut reg, "revision", "Revision of the desired state (S13)", state.revision);
    gauge(
        &mut reg,
        "realized_revision",
        "Revision realized in this host's dataplane (S13)",
        realized,
    );

    // S14: per endpoint of this host.
    let label = |e: &model::Endpoint| vec![("endpoint".to_owned(), e.id.clone())];
    let budget = Family::<Vec<(String, String)>, Gauge<i64>>::default();
    let used = Family::<Vec<(String, String)>, Gauge<i64>>::default();
    let available = Family::<Vec<(String, String)>, Gauge<i64>>::default();
    let exceeded = Family::<Vec<(String, String)>, Counter>::default();
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for e in state.endpoints.values() {
        let Some(o) = stats.usage(host, e) else { continue };
        budget.get_or_create(&label(e)).set(as_i64(o.budget));
        used.get_or_create(&label(e)).set(as_i64(o.used));
        available.get_or_create(&label(e)).set(as_i64(o.budget.saturating_sub(o.used)));
        exceeded.get_or_create(&label(e)).inc_by(o.exceeded);
    }
    reg.register(
        "conntrack_budget",
        "Conntrack budget of each endpoint of this host: flows it may have tracked at once (S14)",
        budget,
    );
    reg.register(
        "conntrack_used",
        "Tracked flows charged to each endpoint of this host (live, or expired and not yet collected)",
        used,
    );
    reg.register(
        "conntrack_available",
        "Flows each endpoint of this host may still start before its budget is spent",
        available,
    );
    reg.register(
        "conntrack_budget_exceeded",
        "New flows of each endpoint of this host dropped because its conntrack budget was spent",
        exceeded,
    );
    let gc = &stats.gc;
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        reg.register(name, help, c);
    };
    counter(
        &mut reg,
        "audit_write_failures",
        "Audit records this host could not write to the store (each one logged)",
        audit.failures(),
    );
    counter(
        &mut reg,
        "audit_suppressed",
        "Requests refused for their credentials or their rate beyond what this host records",
        audit.suppressed(),
    );
    counter(
        &mut reg,
        "store_watch_events",
        "Events the store's etcd watch received (0 with the embedded store)",
        watch.events,
    );
    counter(
        &mut reg,
        "store_watch_bytes",
        "Bytes of the watch responses the store received from etcd (protobuf and gRPC prefix)",
        watch.bytes,
    );
    counter(
        &mut reg,
        "etcd_lease_failovers",
        "Lease requests (liveness renewals, grants and record puts; the idempotency lease grant) one etcd member did not answer in time or failed in the transport, tried again on the next member (0 with the embedded store)",
        leases.failovers,
    );
    counter(
        &mut reg,
        "etcd_lease_expiries",
        "This host's liveness leases given up for expired (etcd answered so, or their TTL passed with no renewal answered), each replaced by a new lease with the record put again (0 with the embedded store)",
        leases.expiries,
    );
    counter(
        &mut reg,
        "conntrack_gc_runs",
        "Garbage collections of the conntrack table (periodic, under budget pressure, and after endpoints were deleted)",
        gc.runs,
    );
    counter(
        &mut reg,
        "conntrack_gc_scanned",
        "Conntrack entries read by garbage collection",
        gc.scanned,
    );
    counter(
        &mut reg,
        "conntrack_gc_deleted",
        "Conntrack entries deleted by garbage collection (expired, or of deleted endpoints)",
        gc.deleted,
    );
    let seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    seconds.inc_by(gc.seconds);
    reg.register("conntrack_gc_seconds", "Time spent in conntrack garbage collection", seconds);
    let last = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    last.set(gc.last.duration.as_secs_f64());
    reg.register(
        "conntrack_gc_last_duration_seconds",
        "Duration of the last conntrack garbage collection",
        last,
    );
    gauge(
        &mut reg,
        "conntrack_gc_last_scanned",
        "Conntrack entries the last garbage collection read",
        gc.last.scanned,
    );
    reg.register(
        "edit_phase_seconds",
        "Where the edits' time goes on this host, by phase (see the README, \"Scale\"): the API's \
         request, idempotency lookup, validation, commit, watch echo, conflict wait, realization \
         here and on the other hosts, audit record; the reconciler's rounds, compiles and reports",
        crate::phases::family(),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

async fn openapi() -> Response {
    json_ok(&openapi_document())
}

/// The OpenAPI 3 description of this API (see [`crate::openapi`]).
pub fn openapi_document() -> serde_json::Value {
    crate::openapi::document()
}
