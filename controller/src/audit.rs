//! The audit trail (S15): every mutation, accepted or refused, and every request refused for
//! its credentials, recorded in the store so that every host's API shows the whole fleet's.
//!
//! Contract:
//! - [`record`] (a middleware outside authentication and the rate limit) writes one
//!   [`AuditRecord`] per request whose method changes something (POST, PUT, PATCH, DELETE),
//!   whatever its answer, and per request of any method refused because its token is unknown,
//!   revoked, expired or malformed.
//!   A record holds the time, the host that served it, the principal (`tok-…`, `local-root`,
//!   or `unauthenticated` with the claimed token id), the source address, the action (method
//!   and route), the universe and object ids involved (what handlers [`Note`]d), the status,
//!   the revision the mutation produced (`Verse-Revision`), and the error code of a refusal.
//! - The record is written before the answer leaves. The record of a mutation the store
//!   commits (through the API's edit path) is written in the edit's own commit (one etcd
//!   transaction, one line of the embedded store's log: [`Note::in_commit`]), so it exists exactly
//!   when the edit does; every other record (a refusal, a replay, an edit that changed nothing)
//!   is written after the answer is known. A record that cannot be written is logged (at error,
//!   with the record) and counted (`verse_audit_write_failures_total`); the request's answer is
//!   not changed by it.
//! - Refusals for credentials, and mutations refused for the rate limit (429), cost the refused
//!   client nothing, so what they can write is bounded: at most [`REFUSALS_PER_SECOND`] per host
//!   on average (bursts of [`REFUSALS_BURST`]); beyond that they are counted
//!   (`verse_audit_suppressed_total`) and logged once per second, not stored, so a flood of bad
//!   tokens or of writes cannot push the fleet's real records out of the bounded trail, nor
//!   turn into a flood of writes to the store.
//! - Storage and retention are the store's (`Store::append_audit`, `Store::query_audit`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State as AxState};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use crate::api::{AppState, REVISION_HEADER};
use crate::auth::Refusal;
use crate::model::Timestamp;
use crate::phases::{self, Phase};

/// How many refusals for credentials one host records per second, on average.
pub const REFUSALS_PER_SECOND: f64 = 20.0;
/// How many it records in a burst.
pub const REFUSALS_BURST: f64 = 200.0;
/// The principal of a request refused for its credentials.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Longest action (method and path) recorded: a path of an unknown route is the client's text.
const MAX_ACTION: usize = 200;

/// One entry of the trail, as the store keeps it and `GET /v1/audit` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: Timestamp,
    /// The host whose API served the request.
    pub host: String,
    /// `tok-…`, `local-root`, or `unauthenticated`.
    pub principal: String,
    /// `ADDR:PORT`, `unix (uid U, pid P)`, or `unknown`.
    pub source: String,
    /// Method and route: `POST /v1/security-groups/{id}/rules`.
    pub action: String,
    /// The universe the request acted on, when it names or reaches one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
    /// Ids the request named (in its path or body) or created.
    #[serde(default)]
    pub objects: Vec<String>,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The revision the mutation produced (accepted mutations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// For a refusal: the error code, and for a refused credential what was wrong with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What handlers learn about a request for its record: the middleware puts one in the
/// request's extensions; authentication and handlers fill it in.
#[derive(Clone, Debug, Default)]
pub struct Note(Arc<Mutex<NoteInner>>);

#[derive(Clone, Debug, Default)]
struct NoteInner {
    principal: Option<String>,
    refusal: Option<Refusal>,
    universe: Option<String>,
    objects: Vec<String>,
    /// What the middleware knows of the request before it runs (`None` outside it).
    request: Option<Seen>,
    /// The record was written with the edit's commit: the middleware writes none.
    written: bool,
}

/// The parts of a record the middleware knows before the handler runs.
#[derive(Clone, Debug)]
struct Seen {
    host: String,
    source: String,
    action: String,
}

impl Note {
    fn with<T>(&self, f: impl FnOnce(&mut NoteInner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
    pub fn principal(&self, name: &str) {
        self.with(|n| n.principal = Some(name.to_owned()));
    }
    pub fn refused(&self, refusal: &Refusal) {
        self.with(|n| n.refusal = Some(refusal.clone()));
    }
    /// The universe the request acts on (the first one noted wins).
    pub fn universe(&self, id: &str) {
        self.with(|n| {
            n.universe.get_or_insert_with(|| id.to_owned());
        });
    }
    /// An id the request names or created.
    pub fn object(&self, id: &str) {
        self.with(|n| {
            if !n.objects.iter().any(|o| o == id) {
                n.objects.push(id.to_owned());
            }
        });
    }

    /// A copy of what is noted so far, to note more in without touching this one (an edit's
    /// attempt that may not commit).
    pub fn draft(&self) -> Note {
        Note(Arc::new(Mutex::new(self.with(|n| n.clone()))))
    }

    /// The record of this request answered `status` by an edit the store is about to commit
    /// (its revision is the commit's, the store's to fill in); `None` outside the middleware.
    pub fn in_commit(&self, status: u16) -> Option<AuditRecord> {
        self.with(|n| {
            let seen = n.request.as_ref()?;
            Some(AuditRecord {
                time: Timestamp(SystemTime::now()),
                host: seen.host.clone(),
                principal: n.principal.clone().unwrap_or_else(|| UNAUTHENTICATED.to_owned()),
                source: seen.source.clone(),
                action: seen.action.clone(),
                universe: n.universe.clone(),
                objects: n.objects.clone(),
                status,
                revision: None,
                detail: None,
            })
        })
    }

    /// The record is durable with the edit's commit: the middleware must not write another.
    pub fn written(&self) {
        self.with(|n| n.written = true);
    }
}

/// The trail's counters and the bound on refusals recorded; one per `versed` (in `AppState`).
#[derive(Debug)]
pub struct Auditor {
    failures: AtomicU64,
    suppressed: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the last "suppressed" warning was logged.
    warned: Option<Instant>,
}

impl Default for Auditor {
    fn default() -> Auditor {
        Auditor {
            failures: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            bucket: Mutex::new(Bucket { tokens: REFUSALS_BURST, at: Instant::now(), warned: None }),
        }
    }
}

impl Auditor {
    /// Records that could not be written.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    /// Refusals for credentials or the rate limit not recorded because of the bound.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Whether one more refusal for credentials or the rate limit may be recorded now.
    fn admit_refusal(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * REFUSALS_PER_SECOND;
        b.tokens = (b.tokens + refill).min(REFUSALS_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return true;
        }
        let n = self.suppressed.fetch_add(1, Ordering::Relaxed) + 1;
        if b.warned.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            b.warned = Some(now);
            tracing::warn!(
                suppressed_total = n,
                "too many requests refused for their credentials or their rate: not recording each \
                 of them in the audit trail (counted in verse_audit_suppressed_total)"
            );
        }
        false
    }
}

fn is_mutation(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware that writes the trail (see the module contract). It wraps authentication,
/// so it sees 401s too.
pub async fn record(AxState(st): AxState<AppState>, mut req: Request, next: Next) -> Response {
    let note = Note::default();
    req.extensions_mut().insert(note.clone());
    let method = req.method().clone();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => p.as_str().to_owned(),
        None => req.uri().path().to_owned(),
    };
    let mut action = format!("{method} {route}");
    if action.len() > MAX_ACTION {
        let mut end = MAX_ACTION;
        while !action.is_char_boundary(end) {
            end -= 1;
        }
        action.truncate(end);
        action.push('…');
    }
    let source = crate::auth::source(&req);
    note.with(|n| {
        n.request =
            Some(Seen { host: st.host.clone(), source: source.clone(), action: action.clone() })
    });
    let started = Instant::now();
    let resp = next.run(req).await;

    let n = note.with(|n| n.clone());
    if n.written {
        phases::since(Phase::Request, started);
        return resp;
    }
    let credential_refused =
        n.refusal.as_ref().is_some_and(|r| !matches!(r, Refusal::Missing) || is_mutation(&method));
    if !is_mutation(&method) && !credential_refused {
        return resp;
    }
    let status = resp.status();
    let flood = n.refusal.is_some() || status == axum::http::StatusCode::TOO_MANY_REQUESTS;
    if flood && !st.audit.admit_refusal() {
        return resp;
    }
    let revision = resp
        .headers()
        .get(REVISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .filter(|_| status.is_success());
    let detail = match &n.refusal {
        Some(r) => Some(match r.claimed() {
            Some(id) => format!("{} ({id})", refusal_code(r)),
            None => refusal_code(r).to_owned(),
        }),
        None if !status.is_success() => resp
            .extensions()
            .get::<crate::api::ErrorCode>()
            .map(|c| c.0.to_owned())
            .or_else(|| Some(format!("http_{}", status.as_u16()))),
        None => None,
    };
    let principal = match (&n.principal, &n.refusal) {
        (Some(p), _) => p.clone(),
        _ => UNAUTHENTICATED.to_owned(),
    };
    let rec = AuditRecord {
        time: Timestamp(SystemTime::now()),
        host: st.host.clone(),
        principal,
        source,
        action,
        universe: n.universe,
        objects: n.objects,
        status: status.as_u16(),
        revision,
        detail,
    };
    let written = Instant::now();
    let appended = st.store.append_audit(&rec).await;
    phases::since(Phase::Audit, written);
    if is_mutation(&method) {
        phases::since(Phase::Request, started);
    }
    if let Err(e) = appended {
        st.audit.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %e,
            record = %serde_json::to_string(&rec).unwrap_or_default(),
            "AUDIT RECORD LOST: could not write it to the store (counted in \
             verse_audit_write_failures_total)"
        );
    }
    resp
}

fn refusal_code(r: &Refusal) -> &'static str {
    match r {
        Refusal::Missing => "no_token",
        Refusal::NotRoot { .. } => "local_socket_not_root",
        Refusal::Malformed => "malformed_token",
        Refusal::Unknown { .. } => "unknown_or_revoked_token",
        Refusal::Expired { .. } => "expired_token",
    }
}

/// `GET /v1/audit`: which records, newest last.
#[derive(Clone, Debug)]
pub struct Query {
    /// Only records at or after this time.
    pub since: Option<SystemTime>,
    /// Only this universe's records.
    pub universe: Option<String>,
    /// At most this many (the newest).
    pub limit: usize,
}

/// Default and largest `limit` of `GET /v1/audit`.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;
