//! Who is asking, and what they may do (S15).
//!
//! Contract:
//! - Every API request acts as a [`Principal`]: a token (`Authorization: Bearer <secret>`), or
//!   `local-root`, a request without a token on the local unix socket (`<state-dir>/api.sock`,
//!   mode 0600: only root can connect, and the peer's uid, read from the socket, must be 0).
//!   `GET /healthz`, `GET /v1/openapi.json` and the web page's assets (`/ui`, no data in them)
//!   need no principal; everything else without one is a 401 (the router applies
//!   [`authenticate`], then the rate limit, then [`require`]).
//! - A token's secret is `vt_<8 hex>_<64 hex>` (256 random bits from the OS); its id is
//!   `tok-<the same 8 hex>`. The store keeps the token (`model::Token`) with the SHA-256 of the
//!   secret only, so a token made on one host is known to every host at once, and deleting it
//!   revokes it everywhere. A presented secret is looked up by its id and its hash compared in
//!   constant time. Unknown, revoked and wrong secrets get the same answer; only the holder of
//!   the right secret learns that it expired.
//! - Access is decided in one place, [`decide`], from the table [`GRANTS`]: a principal
//!   confined to a universe does not see objects of any other universe (they do not exist for
//!   it: 404, and lists leave them out); within what it sees, its role grants reads and writes
//!   per kind of object (403 otherwise). Admins and `local-root` may do everything.
//! - A first admin token: see [`bootstrap_admin`].

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use axum::extract::{ConnectInfo, Request, State as AxState};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::{AppState, ErrorBody, ErrorDetail};
use crate::model::{Role, State, Token};
use crate::store::Store;

/// The name of the principal of a request on the local unix socket (root on the host).
pub const LOCAL_ROOT: &str = "local-root";
/// File name, in the state directory, of the first admin token made at first start.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File name, in the state directory, of the local unix socket.
pub const SOCKET_FILE: &str = "api.sock";
/// Every secret starts with this.
pub const SECRET_PREFIX: &str = "vt_";
/// Hex digits of the random part of a secret (32 bytes).
const SECRET_HEX: usize = 64;

/// Who a request acts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Root on this host, on the local unix socket without a token: an admin.
    LocalRoot,
    /// The holder of a token.
    Token { id: String, role: Role, universe: Option<String> },
}

impl Principal {
    /// `local-root` or the token's id: how the audit trail names it.
    pub fn name(&self) -> &str {
        match self {
            Principal::LocalRoot => LOCAL_ROOT,
            Principal::Token { id, .. } => id,
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Principal::LocalRoot => Role::Admin,
            Principal::Token { role, .. } => *role,
        }
    }

    /// The universe this principal is confined to, if any.
    pub fn universe(&self) -> Option<&str> {
        match self {
            Principal::LocalRoot => None,
            Principal::Token { universe, .. } => universe.as_deref(),
        }
    }

    /// Whether objects of `universe` exist for this principal.
    pub fn sees(&self, universe: &str) -> bool {
        self.universe().is_none_or(|u| u == universe)
    }

    /// Whether it sees every universe (admins, `local-root`, fleet-wide viewers).
    pub fn fleet_wide(&self) -> bool {
        self.universe().is_none()
    }

    /// `tok-… (editor of uni-…)`, for error messages.
    pub fn describe(&self) -> String {
        match (self, self.universe()) {
            (Principal::LocalRoot, _) => LOCAL_ROOT.to_owned(),
            (p, Some(u)) => format!("token {} ({} of {u})", p.name(), p.role().name()),
            (p, None) => format!("token {} ({}, fleet-wide)", p.name(), p.role().name()),
        }
    }
}

/// The kinds of object access is granted on. Rules belong to their security group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Universe,
    /// Security groups and their rules.
    Group,
    Endpoint,
    /// `GET /v1/hosts`.
    Host,
    Token,
    /// `GET /v1/audit` (each principal sees the records of the universes it sees).
    Audit,
    /// `GET /metrics`: fleet-wide counts and this host's drop counters, not per universe.
    Metrics,
    /// `GET /v1/trace` of a packet of a universe: reading its verdict from this host's maps
    /// (read), and pushing it through the real programs with `run` (write: it executes the
    /// dataplane, on private maps).
    Trace,
}

impl Resource {
    fn plural(self) -> &'static str {
        match self {
            Resource::Universe => "universes",
            Resource::Group => "security groups and rules",
            Resource::Endpoint => "endpoints",
            Resource::Host => "hosts",
            Resource::Token => "tokens",
            Resource::Audit => "the audit trail",
            Resource::Metrics => "the metrics",
            Resource::Trace => "packet traces (run: through the kernel programs)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    /// Create, change or delete.
    Write,
}

/// The answer of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The object is in a universe the principal does not see: answer as if it did not exist.
    NotFound,
    /// The principal sees the object but its role does not allow this.
    Forbidden,
}

/// One row of [`GRANTS`]: what each kind of non-admin principal may do to one kind of object
/// (in the universes it sees).
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    pub resource: Resource,
    pub op: Op,
    /// An editor of one universe.
    pub editor: bool,
    /// A viewer of one universe.
    pub viewer: bool,
    /// A viewer without a universe (read-only over the whole fleet: monitoring, auditors).
    pub fleet_viewer: bool,
}

const fn grant(resource: Resource, op: Op, editor: bool, viewer: bool, fleet: bool) -> Grant {
    Grant { resource, op, editor, viewer, fleet_viewer: fleet }
}

/// Who may do what, besides admins (and `local-root`), who may do everything. A kind of object
/// or an operation missing here is refused. Universe-confined principals never see another
/// universe's objects whatever this says (see [`decide`]).
pub const GRANTS: &[Grant] = {
    use Op::{Read, Write};
    use Resource::*;
    &[
        //    resource   op     editor viewer fleet-wide viewer
        grant(Universe, Read, true, true, true),
        grant(Universe, Write, false, false, false),
        grant(Group, Read, true, true, true),
        grant(Group, Write, true, false, false),
        grant(Endpoint, Read, true, true, true),
        grant(Endpoint, Write, true, false, false),
        grant(Host, Read, true, true, true),
        grant(Token, Read, false, false, false),
        grant(Token, Write, false, false, false),
        grant(Audit, Read, true, true, true),
        grant(Metrics, Read, false, false, true),
        grant(Trace, Read, true, true, true),
        grant(Trace, Write, true, false, false),
    ]
};

/// May `p` do `op` to a `resource` of `universe` (`None`: not in a universe, or a universe to
/// be created)?
pub fn decide(p: &Principal, resource: Resource, op: Op, universe: Option<&str>) -> Decision {
    if p.role() == Role::Admin {
        return Decision::Allow;
    }
    if let Some(u) = universe {
        if !p.sees(u) {
            return Decision::NotFound;
        }
    }
    let row = GRANTS.iter().find(|g| g.resource == resource && g.op == op);
    let granted = row.is_some_and(|g| match (p.role(), p.universe()) {
        (Role::Editor, _) => g.editor,
        (Role::Viewer, Some(_)) => g.viewer,
        (Role::Viewer, None) => g.fleet_viewer,
        (Role::Admin, _) => true,
    });
    if granted {
        Decision::Allow
    } else {
        Decision::Forbidden
    }
}

/// The message of a 403.
pub fn forbidden_message(p: &Principal, resource: Resource, op: Op) -> String {
    let what = match op {
        Op::Read => "read",
        Op::Write => "change",
    };
    format!("{} may not {what} {}", p.describe(), resource.plural())
}

// ---- Secrets ----

/// A fresh token: its id, its secret (shown once) and the hash the store keeps.
#[derive(Clone, Debug)]
pub struct NewSecret {
    pub id: String,
    pub secret: String,
    pub hash: String,
}

/// Draws a fresh secret from the operating system's random source.
pub fn new_secret() -> Result<NewSecret, rand::rand_core::OsError> {
    use rand::TryRngCore;
    let mut bytes = [0u8; 4 + SECRET_HEX / 2];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes)?;
    let hex = hex(&bytes);
    let secret = format!("{SECRET_PREFIX}{}_{}", &hex[..8], &hex[8..]);
    Ok(NewSecret { id: format!("tok-{}", &hex[..8]), hash: hash_secret(&secret), secret })
}

/// The id of the token a secret claims to be (`tok-…`), if it is shaped like a secret.
pub fn secret_id(secret: &str) -> Option<String> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    let lower_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (id.len() == 8 && lower_hex(id) && random.len() == SECRET_HEX && lower_hex(random))
        .then(|| format!("tok-{id}"))
}

/// Lowercase hex SHA-256 of a secret: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a request has no principal (401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header, not on the local socket as root.
    Missing,
    /// On the local socket, but not as root.
    NotRoot { uid: u32 },
    /// A header that is not `Bearer <secret>`, or a secret not shaped like one.
    Malformed,
    /// No such token (never made, revoked), or the wrong secret for it.
    Unknown { id: String },
    /// The right secret of a token past its expiry.
    Expired { id: String, at: String },
}

impl Refusal {
    /// What the client is told (and the audit trail records).
    pub fn message(&self) -> String {
        match self {
            Refusal::Missing => "this request needs a token: send `Authorization: Bearer <token>` \
                                 (or, as root on the host, use the local unix socket)"
                .to_owned(),
            Refusal::NotRoot { uid } => format!(
                "the local unix socket serves root only (peer uid {uid}); send a token instead"
            ),
            Refusal::Malformed => {
                "malformed credentials: expected `Authorization: Bearer vt_...`".to_owned()
            }
            Refusal::Unknown { id } => format!("token {id} is unknown or revoked"),
            Refusal::Expired { id, at } => format!("token {id} expired at {at}"),
        }
    }

    /// The token id the request claimed, if any (not proof of anything unless `Expired`).
    pub fn claimed(&self) -> Option<&str> {
        match self {
            Refusal::Unknown { id } | Refusal::Expired { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// Checks a presented secret against the tokens of `state`.
pub fn verify(state: &State, secret: &str, now: SystemTime) -> Result<Principal, Refusal> {
    let id = secret_id(secret).ok_or(Refusal::Malformed)?;
    let unknown = || Refusal::Unknown { id: id.clone() };
    // Hashed before the lookup, so an unknown id costs what a known one does.
    let presented = hash_secret(secret);
    let token = state.tokens.get(&id).ok_or_else(unknown)?;
    if !bool::from(presented.as_bytes().ct_eq(token.hash.as_bytes())) {
        return Err(unknown());
    }
    if token.expired(now) {
        let at = token.expires.map(|t| t.to_string()).unwrap_or_default();
        return Err(Refusal::Expired { id, at });
    }
    Ok(Principal::Token {
        id: token.id.clone(),
        role: token.role,
        universe: token.universe.clone(),
    })
}

// ---- Connections ----

/// The peer of a connection to the local unix socket, read from the socket (`SO_PEERCRED`).
/// Only the unix listener of `versed` makes these; a request over TCP never carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPeer {
    /// `None` if the credentials could not be read (then the peer is not root).
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl LocalPeer {
    /// The peer of a connection to the local socket, from the kernel (`SO_PEERCRED`).
    pub fn of(stream: &tokio::net::UnixStream) -> LocalPeer {
        match stream.peer_cred() {
            Ok(cred) => LocalPeer { uid: Some(cred.uid()), pid: cred.pid() },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the credentials of a local API client");
                LocalPeer { uid: None, pid: None }
            }
        }
    }
}

impl std::fmt::Display for LocalPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uid = self.uid.map_or_else(|| "?".to_owned(), |u| u.to_string());
        let pid = self.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
        write!(f, "unix (uid {uid}, pid {pid})")
    }
}

/// For `axum::serve` over the local socket (in-process tests); `versed` serves it with
/// [`crate::server::serve`].
impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for LocalPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        LocalPeer::of(stream.io())
    }
}

/// Where a request came from, for the audit trail: `ADDR:PORT` over TCP, `unix (uid U, pid P)`
/// on the local socket, `unknown` for a request with no connection (in-process).
pub fn source(req: &Request) -> String {
    if let Some(ConnectInfo(p)) = req.extensions().get::<ConnectInfo<LocalPeer>>() {
        return p.to_string();
    }
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>() {
        return addr.to_string();
    }
    "unknown".to_owned()
}

/// Resolves the principal of a request: a bearer token if one is presented (on either
/// listener), else `local-root` for root on the local socket.
pub fn principal(req: &Request, state: &State, now: SystemTime) -> Result<Principal, Refusal> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(Refusal::Malformed)?;
        return verify(state, secret, now);
    }
    match req.extensions().get::<ConnectInfo<LocalPeer>>() {
        Some(ConnectInfo(LocalPeer { uid: Some(0), .. })) => Ok(Principal::LocalRoot),
        Some(ConnectInfo(peer)) => Err(Refusal::NotRoot { uid: peer.uid.unwrap_or(u32::MAX) }),
        None => Err(Refusal::Missing),
    }
}

/// The first middleware of every route that needs a principal: resolves it, and puts the
/// [`Principal`] in the request's extensions (the rate limit, the handlers and the audit trail
/// read it there), or else the [`Refusal`], which [`require`] answers (after the rate limit,
/// so that a flood of bad credentials is limited too).
pub async fn authenticate(
    AxState(st): AxState<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let result = principal(&req, &st.store.snapshot(), SystemTime::now());
    let note = req.extensions().get::<crate::audit::Note>().cloned();
    match result {
        Ok(p) => {
            if let Some(note) = &note {
                note.principal(p.name());
            }
            req.extensions_mut().insert(p);
        }
        Err(refusal) => {
            if let Some(note) = &note {
                note.refused(&refusal);
            }
            req.extensions_mut().insert(refusal);
        }
    }
    next.run(req).await
}

/// Lets a request with a [`Principal`] on; answers any other 401, with a JSON error and
/// `WWW-Authenticate: Bearer`, saying why ([`authenticate`] resolved it).
pub async fn require(req: Request, next: Next) -> Response {
    if req.extensions().get::<Principal>().is_some() {
        return next.run(req).await;
    }
    let refusal = req.extensions().get::<Refusal>().cloned().unwrap_or(Refusal::Missing);
    let body = ErrorBody {
        error: ErrorDetail { code: "unauthenticated".into(), message: refusal.message() },
    };
    let mut resp = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"verse\""));
    resp
}

// ---- The local socket ----

/// Binds the local unix socket at `path`, mode 0600, replacing a stale socket there. The
/// socket is bound under a temporary name and renamed into place once its mode is set, so no
/// one can connect to it at `path` before it is root-only.
pub fn bind_local_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let ctx = |what: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| ctx("removing the stale socket", path, e))?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; remove it", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("reading", path, e)),
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = std::os::unix::net::UnixListener::bind(&temp)
        .map_err(|e| ctx("binding the unix socket", &temp, e))?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(ctx("placing the unix socket at", path, e));
    }
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

// ---- The first admin token ----

/// What [`bootstrap_admin`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The store already had an admin token (the operator's, if one was given, is among them).
    Present,
    /// The operator's token (from `admin_token_file`) was registered.
    Registered { id: String },
    /// The operator's token was not registered: the store already has other admin tokens.
    Ignored { id: String },
    /// A token was made and written to the file.
    Generated { id: String, file: PathBuf },
}

/// Why the first admin token could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot read the admin token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the admin token file {path} does not hold a Verse token (expected vt_<8 hex>_<64 hex>, \
         for example: printf 'vt_%s_%s\\n' $(openssl rand -hex 4) $(openssl rand -hex 32))"
    )]
    Malformed { path: PathBuf },
    #[error("cannot draw a random token: {0}")]
    Random(#[from] rand::rand_core::OsError),
    #[error("cannot write the admin token to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot record the admin token in the store: {0}")]
    Store(#[from] crate::store::Error),
}

/// Makes sure the fleet has a way in: if the store has no admin token that is still valid,
/// registers the operator's (`given`, a file holding a secret), or else makes one and writes
/// it to `<state_dir>/admin.token` (mode 0600). In a fleet the first host to start does this;
/// the others find the token in the store. Whoever reads these files is root on a host, who
/// could use the local socket anyway, so a new token after every admin token was revoked or
/// expired opens nothing new.
pub async fn bootstrap_admin(
    store: &Store,
    state_dir: &Path,
    given: Option<&Path>,
) -> Result<Bootstrap, BootstrapError> {
    let given = match given {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| BootstrapError::Read { path: path.to_owned(), source })?;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        file = %path.display(),
                        mode = format!("{:o}", meta.permissions().mode() & 0o777),
                        "the admin token file can be read by others than its owner: chmod 600 it"
                    );
                }
            }
            let secret = text.trim().to_owned();
            let id = secret_id(&secret)
                .ok_or_else(|| BootstrapError::Malformed { path: path.to_owned() })?;
            Some((id, hash_secret(&secret)))
        }
    };
    let fresh = match given {
        Some(_) => None,
        None => Some(new_secret()?),
    };
    let (id, hash) = match (&given, &fresh) {
        (Some((id, hash)), _) => (id.clone(), hash.clone()),
        (None, Some(f)) => (f.id.clone(), f.hash.clone()),
        (None, None) => unreachable!("a token is either given or made"),
    };
    let now = SystemTime::now();
    let description = match given {
        Some(_) => "admin token from the operator's admin_token_file",
        None => "first admin token, made at first start",
    };
    let (added, _) = store
        .edit(|s| {
            let admins = s.tokens.values().any(|t| t.role == Role::Admin && !t.expired(now));
            if admins {
                return Ok(false);
            }
            if s.tokens.contains_key(&id) {
                // An expired or colliding token of that id: make way for the new one.
                s.tokens.remove(&id);
            }
            let token = Token {
                id: id.clone(),
                role: Role::Admin,
                universe: None,
                description: description.to_owned(),
                created: crate::model::Timestamp(now),
                expires: None,
                hash: hash.clone(),
            };
            s.tokens.insert(id.clone(), token);
            s.revision += 1;
            Ok(true)
        })
        .await?;
    let known = store.snapshot().tokens.get(&id).is_some_and(|t| t.hash == hash);
    Ok(match (added, fresh) {
        (true, Some(fresh)) => {
            let file = state_dir.join(ADMIN_TOKEN_FILE);
            write_secret(&file, &fresh.secret)
                .map_err(|source| BootstrapError::Write { path: file.clone(), source })?;
            Bootstrap::Generated { id, file }
        }
        (true, None) => Bootstrap::Registered { id },
        (false, _) if given.is_some() && !known => Bootstrap::Ignored { id },
        (false, _) => Bootstrap::Present,
    })
}

/// Writes `secret` and a newline to `path`, mode 0600, replacing it atomically.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CreateToken, TokenSecret};

    fn token(role: Role, universe: Option<&str>) -> Principal {
        Principal::Token { id: "tok-1".into(), role, universe: universe.map(str::to_owned) }
    }

    #[test]
    fn secrets_are_random_shaped_and_verified_by_hash() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.secret.len(), 3 + 8 + 1 + 64);
        assert_eq!(secret_id(&a.secret).as_deref(), Some(a.id.as_str()));
        assert_eq!(a.hash, hash_secret(&a.secret));
        assert!(!a.hash.contains(&a.secret[12..]), "the hash is not the secret");
        for bad in ["", "vt_", "vt_1234567_", &a.secret[1..], &a.secret.to_uppercase()] {
            assert_eq!(secret_id(bad), None, "{bad:?}");
        }

        let mut s = State::default();
        let u = s
            .create_universe(crate::model::CreateUniverse {
                name: "blue".into(),
                cidr: Some("10.1.0.0/16".into()),
                cidrs: None,
                ipv6_cidrs: None,
            })
            .unwrap();
        let now = SystemTime::now();
        let req = CreateToken {
            role: Role::Viewer,
            universe: Some(u.id.clone()),
            expires: Some("1h".into()),
            description: None,
        };
        s.create_token(req, &TokenSecret { id: a.id.clone(), hash: a.hash.clone(), now }).unwrap();
        assert_eq!(
            verify(&s, &a.secret, now),
            Ok(Principal::Token { id: a.id.clone(), role: Role::Viewer, universe: Some(u.id) })
        );
        // Right id, wrong secret: the same answer as an unknown token.
        let forged = format!("{}{}", &a.secret[..12], "0".repeat(64));
        assert_eq!(verify(&s, &forged, now), Err(Refusal::Unknown { id: a.id.clone() }));
        assert_eq!(verify(&s, &b.secret, now), Err(Refusal::Unknown { id: b.id.clone() }));
        assert_eq!(verify(&s, "Bearer x", now), Err(Refusal::Malformed));
        let later = now + std::time::Duration::from_secs(3601);
        assert!(matches!(verify(&s, &a.secret, later), Err(Refusal::Expired { .. })));
        s.delete_token(&a.id).unwrap();
        assert_eq!(verify(&s, &a.secret, now), Err(Refusal::Unknown { id: a.id }));
    }

    #[test]
    fn decisions_follow_the_grants_and_hide_other_universes() {
        use Decision::*;
        use Op::*;
        use Resource::*;
        let admin = token(Role::Admin, None);
        let editor = token(Role::Editor, Some("uni-a"));
        let viewer = token(Role::Viewer, Some("uni-a"));
        let fleet = token(Role::Viewer, None);
        for p in [&admin, &Principal::LocalRoot] {
            for r in [Universe, Group, Endpoint, Host, Token, Audit, Metrics, Trace] {
                for op in [Read, Write] {
                    assert_eq!(decide(p, r, op, Some("uni-b")), Allow);
                }
            }
        }
        assert_eq!(decide(&editor, Group, Write, Some("uni-a")), Allow);
        assert_eq!(decide(&editor, Group, Write, Some("uni-b")), NotFound);
        assert_eq!(decide(&editor, Group, Read, Some("uni-b")), NotFound);
        assert_eq!(decide(&editor, Universe, Write, Some("uni-a")), Forbidden);
        assert_eq!(decide(&editor, Universe, Write, None), Forbidden);
        assert_eq!(decide(&editor, Token, Read, None), Forbidden);
        assert_eq!(decide(&editor, Host, Read, None), Allow);
        assert_eq!(decide(&editor, Metrics, Read, None), Forbidden);
        assert_eq!(decide(&viewer, Endpoint, Read, Some("uni-a")), Allow);
        assert_eq!(decide(&viewer, Endpoint, Write, Some("uni-a")), Forbidden);
        assert_eq!(decide(&viewer, Endpoint, Write, Some("uni-b")), NotFound);
        assert_eq!(decide(&fleet, Endpoint, Read, Some("uni-b")), Allow);
        assert_eq!(decide(&fleet, Endpoint, Write, Some("uni-b")), Forbidden);
        assert_eq!(decide(&fleet, Metrics, Read, None), Allow);
        assert_eq!(decide(&fleet, Token, Read, None), Forbidden);
        assert_eq!(decide(&viewer, Trace, Read, Some("uni-a")), Allow);
        assert_eq!(decide(&viewer, Trace, Write, Some("uni-a")), Forbidden);
        assert_eq!(decide(&editor, Trace, Write, Some("uni-a")), Allow);
        assert_eq!(decide(&editor, Trace, Read, Some("uni-b")), NotFound);
        assert_eq!(decide(&fleet, Trace, Write, Some("uni-b")), Forbidden);
        // Host writes have no grant row: refused to all but admins.
        assert_eq!(decide(&editor, Host, Write, None), Forbidden);
    }
}
