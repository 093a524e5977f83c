//! The daemon's settings: a TOML file, every setting optional with a working default, and the
//! command-line flags that override it.
//!
//! Contract: [`Config::load`] reads the file named by `--config` (or starts from the defaults),
//! applies the flags, and validates the result; a file with an unknown key or a value of the
//! wrong type is refused with an error naming the key. [`Config::default_toml`] prints every
//! setting with its documentation and default (`versed --print-default-config`), and parses
//! back to [`Config::default`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dataplane_common as dp;
use serde::{Deserialize, Serialize};

use crate::store::AuditRetention;

/// What went wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file named by `--config` could not be read.
    #[error("failed to read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML for [`Config`] (unknown key, wrong type, ...); the message of
    /// the TOML parser names the key and its line.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A setting has a value that parses but cannot be used.
    #[error("invalid setting {key} = {value:?}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    /// This machine's hostname could not be read (and `host` was not set).
    #[error("failed to read this machine's hostname (set `host` or --host): {0}")]
    Hostname(std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `versed` command line. Flags override the settings of the file.
#[derive(Clone, Debug, Default, clap::Parser)]
#[command(
    name = "versed",
    version,
    about = "The Verse daemon: serves the API and programs this host's dataplane"
)]
pub struct Args {
    /// TOML settings file (see --print-default-config); without it, the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print every setting with its documentation and default value, then exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Address the REST API listens on (overrides `listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Directory of the daemon's state (overrides `state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Name of this host in the control plane (overrides `host`).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// Underlay interface (overrides `underlay`).
    #[arg(long, value_name = "IFACE")]
    pub underlay: Option<String>,
    /// Control-plane store: `embedded` or `etcd://HOST:PORT[,HOST:PORT...]` (overrides `store`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// File holding an admin token to register if the store has none (overrides
    /// `admin_token_file`).
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the API over plain HTTP even on an address that is not loopback (sets
    /// `api.insecure_http`): anyone on the path can read and change every request.
    #[arg(long)]
    pub insecure_http: bool,
    /// Start from an empty desired state even though the state file is missing (or etcd holds
    /// none) while the dataplane still holds a previous run's: every endpoint and rule it
    /// enforces is removed. Without it, versed refuses to start then, and says how to recover.
    #[arg(long)]
    pub empty_state: bool,
    /// Serve no API on this host (sets `api.serve = false`; needs an etcd store): it enforces
    /// its own endpoints, follows only the universes with an endpoint on it, and answers only
    /// `/healthz` and `/metrics`.
    #[arg(long)]
    pub no_api: bool,
    /// Run N simulated hosts instead of this one (scale tests; needs an etcd store): each runs
    /// the control plane over in-memory maps; `--listen` serves `GET /v1/simulation` only.
    #[arg(long, value_name = "N", help_heading = "Simulation")]
    pub simulate_hosts: Option<usize>,
    /// Names of the simulated hosts: this prefix and a four-digit number from 0001.
    #[arg(long, value_name = "PREFIX", default_value = "sim-", help_heading = "Simulation")]
    pub simulate_prefix: String,
    /// etcd clients (gRPC connections) the simulated hosts share; 0: one per host.
    #[arg(long, value_name = "K", default_value_t = 0, help_heading = "Simulation")]
    pub simulate_connections: usize,
}

/// Where the desired state lives, parsed from the `store` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A JSON file in `state_dir`: one host, nothing to install.
    Embedded,
    /// An etcd cluster, by its client endpoints (`HOST:PORT`).
    Etcd(Vec<String>),
}

impl StoreKind {
    /// Parses `embedded` or `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str) -> Result<StoreKind> {
        let invalid = |reason: &str| Error::Invalid {
            key: "store",
            value: url.to_owned(),
            reason: reason.to_owned(),
        };
        if url == "embedded" {
            return Ok(StoreKind::Embedded);
        }
        let Some(list) = url.strip_prefix("etcd://") else {
            return Err(invalid("expected \"embedded\" or \"etcd://HOST:PORT[,HOST:PORT...]\""));
        };
        let mut endpoints = Vec::new();
        for hp in list.split(',') {
            let port_ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !port_ok {
                return Err(invalid(&format!("etcd endpoint {hp:?} is not HOST:PORT")));
            }
            endpoints.push(hp.to_owned());
        }
        Ok(StoreKind::Etcd(endpoints))
    }
}

/// Connection tracking: idle timeouts, seconds (S9); budgets (S14); garbage collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conntrack {
    pub tcp_established: u64,
    pub tcp_opening: u64,
    pub tcp_closing: u64,
    pub udp_replied: u64,
    pub udp_one_way: u64,
    pub icmp: u64,
    pub other: u64,
    /// Budget of an endpoint created through this daemon's API without one.
    pub endpoint_budget: u32,
    /// Longest time between two garbage collections, seconds.
    pub gc_interval: u64,
}

impl Default for Conntrack {
    fn default() -> Conntrack {
        use dp::ct_state as s;
        let secs = |state: u8| s::DEFAULT_TIMEOUT_SECS[usize::from(state)];
        Conntrack {
            tcp_established: secs(s::TCP_ESTABLISHED),
            tcp_opening: secs(s::TCP_OPENING),
            tcp_closing: secs(s::TCP_CLOSING),
            udp_replied: secs(s::UDP_REPLIED),
            udp_one_way: secs(s::UDP_ONE_WAY),
            icmp: secs(s::ICMP),
            other: secs(s::OTHER),
            endpoint_budget: crate::model::DEFAULT_CONNTRACK_BUDGET,
            gc_interval: 30,
        }
    }
}

/// Verdict events, flow logs and counters (`[observability]`); see [`Config::default_toml`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Observability {
    pub events: bool,
    pub event_rate: u32,
    pub event_burst: u32,
    pub event_history: u32,
    pub flow_log_interval: u64,
    pub flow_log_rotate_bytes: u64,
    pub flow_log_keep: u32,
}

impl Default for Observability {
    fn default() -> Observability {
        Observability {
            events: true,
            event_rate: 1000,
            event_burst: 1000,
            event_history: 10_000,
            flow_log_interval: 60,
            flow_log_rotate_bytes: 16 << 20,
            flow_log_keep: 4,
        }
    }
}

/// The daemon's settings. See [`Config::default_toml`] for each one's meaning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// `None`: `<state_dir>/bpf` (see [`Config::bpf_dir`]).
    pub bpf_dir: Option<PathBuf>,
    /// `None`: this machine's hostname, filled in by [`Config::load`].
    pub host: Option<String>,
    pub underlay: Option<String>,
    pub store: String,
    /// Key prefix of the fleet's state in etcd.
    pub etcd_prefix: String,
    /// Seconds a host stays healthy after its versed last renewed its liveness in etcd.
    pub etcd_lease_ttl: u64,
    /// etcd store over TLS: the CA that signed etcd's certificate (PEM). Setting it turns TLS
    /// on for every etcd endpoint.
    pub etcd_ca_file: Option<PathBuf>,
    /// etcd store over TLS: this host's client certificate and key (PEM), for etcd's
    /// `--client-cert-auth`.
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    pub mtu: u32,
    pub gateway_mac: String,
    /// `None`: `<state_dir>/api.sock` (see [`Config::api_socket`]).
    pub api_socket: Option<PathBuf>,
    /// A file holding the first admin token (instead of one made into the state directory).
    pub admin_token_file: Option<PathBuf>,
    /// The etcd user this host authenticates as (etcd RBAC), with `etcd_password_file`.
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    /// Audit records kept (about; the oldest go first).
    pub audit_retention_records: usize,
    /// Days an audit record is kept.
    pub audit_retention_days: u64,
    /// `None`: derived from `listen` and the underlay (see [`Config::api_url`]).
    pub advertise_api: Option<String>,
    pub conntrack: Conntrack,
    pub api: ApiSettings,
    pub observability: Observability,
}

/// When the API is served over TLS (`api.tls`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS when a certificate is given or the listen address is not loopback.
    #[default]
    Auto,
    /// Always TLS.
    On,
    /// Plain HTTP (on a non-loopback address only with `insecure_http`).
    Off,
}

/// The API server: TLS, connection limits, request limits (`[api]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// false: this host serves no API and follows only its own universes (see
    /// [`Config::default_toml`]).
    pub serve: bool,
    pub tls: TlsMode,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub insecure_http: bool,
    pub max_connections: u32,
    /// Seconds.
    pub header_timeout: u64,
    /// Seconds.
    pub idle_timeout: u64,
    /// Seconds.
    pub body_timeout: u64,
    pub max_body_bytes: u64,
    pub read_rate: u32,
    pub read_burst: u32,
    pub write_rate: u32,
    pub write_burst: u32,
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            serve: true,
            tls: TlsMode::Auto,
            tls_cert_file: None,
            tls_key_file: None,
            insecure_http: false,
            max_connections: 1024,
            header_timeout: 10,
            idle_timeout: 60,
            body_timeout: 30,
            max_body_bytes: 1 << 20,
            read_rate: 100,
            read_burst: 200,
            write_rate: 50,
            write_burst: 100,
        }
    }
}

/// How the API is served, as [`Config::api_transport`] decides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTransport {
    /// Plain HTTP; `insecure` when on an address that is not loopback (explicitly asked for).
    Http { insecure: bool },
    /// TLS with the certificate and key of these files.
    TlsFiles { cert: PathBuf, key: PathBuf },
    /// TLS with the self-signed pair kept in (or generated into) `<state_dir>/tls/`.
    TlsSelfSigned,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            state_dir: PathBuf::from("/var/lib/verse"),
            bpf_dir: None,
            host: None,
            underlay: None,
            store: "embedded".into(),
            etcd_prefix: crate::store::etcd::DEFAULT_PREFIX.into(),
            etcd_lease_ttl: crate::store::etcd::DEFAULT_LEASE_TTL.as_secs(),
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            mtu: 1500,
            gateway_mac: "02:76:65:72:73:65".into(),
            api_socket: None,
            admin_token_file: None,
            etcd_user: None,
            etcd_password_file: None,
            audit_retention_records: AuditRetention::default().max_records,
            audit_retention_days: AuditRetention::default().max_age.as_secs() / 86400,
            advertise_api: None,
            conntrack: Conntrack::default(),
            api: ApiSettings::default(),
            observability: Observability::default(),
        }
    }
}

/// Smallest MTU an IPv4 link must carry (RFC 791: every host must accept 576-byte datagrams;
/// 68 is the minimum link MTU, RFC 791 / RFC 1122 3.3.2).
const MIN_MTU: u32 = 68;
/// Largest MTU a veth accepts (`ETH_MAX_MTU` in `include/uapi/linux/if_ether.h`).
const MAX_MTU: u32 = 65535;

impl Config {
    /// Reads `args.config` (or the defaults), applies the flags of `args`, fills in the hostname
    /// and validates. The result has `host` set.
    pub fn load(args: &Args) -> Result<Config> {
        let mut cfg = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = args.listen {
            cfg.listen = v;
        }
        if let Some(v) = &args.state_dir {
            cfg.state_dir = v.clone();
        }
        if let Some(v) = &args.host {
            cfg.host = Some(v.clone());
        }
        if let Some(v) = &args.underlay {
            cfg.underlay = Some(v.clone());
        }
        if let Some(v) = &args.store {
            cfg.store = v.clone();
        }
        if let Some(v) = &args.admin_token_file {
            cfg.admin_token_file = Some(v.clone());
        }
        if args.insecure_http {
            cfg.api.insecure_http = true;
        }
        if args.no_api {
            cfg.api.serve = false;
        }
        if cfg.host.is_none() {
            cfg.host = Some(hostname().map_err(Error::Hostname)?);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a settings file (no flags, no validation beyond the TOML types).
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text).map_err(|message| Error::Parse { path: path.to_owned(), message })
    }

    /// Parses settings from TOML text; the error names the offending key.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.to_string())
    }

    /// Checks every setting that parses but might not be usable.
    pub fn validate(&self) -> Result<()> {
        StoreKind::parse(&self.store)?;
        let p = &self.etcd_prefix;
        if !p.starts_with('/')
            || !p.ends_with('/')
            || p.contains("//")
            || p.contains(char::is_whitespace)
        {
            return Err(Error::Invalid {
                key: "etcd_prefix",
                value: p.clone(),
                reason: "expected a key prefix that starts and ends with '/' (\"/verse/\")".into(),
            });
        }
        if !(1..=3600).contains(&self.etcd_lease_ttl) {
            return Err(Error::Invalid {
                key: "etcd_lease_ttl",
                value: self.etcd_lease_ttl.to_string(),
                reason: "must be within 1..=3600 seconds".into(),
            });
        }
        if let Some(host) = &self.host {
            validate_host_name(host)?;
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(Error::Invalid {
                key: "mtu",
                value: self.mtu.to_string(),
                reason: format!("must be within {MIN_MTU}..={MAX_MTU}"),
            });
        }
        self.gateway_mac_bytes()?;
        if self.etcd_user.is_some() != self.etcd_password_file.is_some() {
            return Err(Error::Invalid {
                key: "etcd_user",
                value: self.etcd_user.clone().unwrap_or_default(),
                reason: "etcd_user and etcd_password_file go together".into(),
            });
        }
        if self.audit_retention_records == 0 {
            return Err(Error::Invalid {
                key: "audit_retention_records",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if !(1..=36_500).contains(&self.audit_retention_days) {
            return Err(Error::Invalid {
                key: "audit_retention_days",
                value: self.audit_retention_days.to_string(),
                reason: "must be within 1..=36500".into(),
            });
        }
        if let Some(u) = &self.underlay {
            if u.is_empty() || u.len() > 15 || u.contains('/') || u.contains(char::is_whitespace) {
                return Err(Error::Invalid {
                    key: "underlay",
                    value: u.clone(),
                    reason: "not an interface name (1 to 15 bytes, no '/' or space)".into(),
                });
            }
        }
        self.validate_etcd_tls()?;
        self.validate_no_api()?;
        self.api_transport()?;
        let api = &self.api;
        if let Some(url) = &self.advertise_api {
            parse_api_url(url).map_err(|reason| Error::Invalid {
                key: "advertise_api",
                value: url.clone(),
                reason,
            })?;
        }
        let o = &self.observability;
        for (key, value, range) in [
            ("api.max_connections", u64::from(api.max_connections), 1..=1_000_000u64),
            ("api.header_timeout", api.header_timeout, 1..=3600),
            ("api.idle_timeout", api.idle_timeout, 1..=86_400),
            ("api.body_timeout", api.body_timeout, 1..=3600),
            ("api.max_body_bytes", api.max_body_bytes, 1024..=(1 << 30)),
            ("api.read_rate", u64::from(api.read_rate), 1..=1_000_000),
            ("api.read_burst", u64::from(api.read_burst), 1..=1_000_000),
            ("api.write_rate", u64::from(api.write_rate), 1..=1_000_000),
            ("api.write_burst", u64::from(api.write_burst), 1..=1_000_000),
            ("observability.event_rate", u64::from(o.event_rate), 1..=10_000_000u64),
            ("observability.event_burst", u64::from(o.event_burst), 1..=10_000_000),
            ("observability.event_history", u64::from(o.event_history), 0..=1_000_000),
            (
                "observability.flow_log_interval",
                o.flow_log_interval,
                crate::flowlogs::MIN_INTERVAL..=crate::flowlogs::MAX_INTERVAL,
            ),
            ("observability.flow_log_rotate_bytes", o.flow_log_rotate_bytes, 4096..=(1 << 40)),
            ("observability.flow_log_keep", u64::from(o.flow_log_keep), 0..=1000),
        ] {
            if !range.contains(&value) {
                return Err(Error::Invalid {
                    key,
                    value: value.to_string(),
                    reason: format!("must be within {}..={}", range.start(), range.end()),
                });
            }
        }
        let ct = &self.conntrack;
        for (key, secs) in [
            ("conntrack.tcp_established", ct.tcp_established),
            ("conntrack.tcp_opening", ct.tcp_opening),
            ("conntrack.tcp_closing", ct.tcp_closing),
            ("conntrack.udp_replied", ct.udp_replied),
            ("conntrack.udp_one_way", ct.udp_one_way),
            ("conntrack.icmp", ct.icmp),
            ("conntrack.other", ct.other),
        ] {
            // Zero would expire every entry at once, so no reply would ever be admitted (S6);
            // the upper bound keeps the nanosecond value within u64.
            if secs == 0 || secs.checked_mul(1_000_000_000).is_none() {
                return Err(Error::Invalid {
                    key,
                    value: secs.to_string(),
                    reason: "must be at least 1 second and at most 18446744073 seconds".into(),
                });
            }
        }
        if !(1..=dp::capacity::CONNTRACK).contains(&ct.endpoint_budget) {
            return Err(Error::Invalid {
                key: "conntrack.endpoint_budget",
                value: ct.endpoint_budget.to_string(),
                reason: format!(
                    "must be within 1..={} (the flows one host tracks)",
                    dp::capacity::CONNTRACK
                ),
            });
        }
        if !(1..=3600).contains(&ct.gc_interval) {
            return Err(Error::Invalid {
                key: "conntrack.gc_interval",
                value: ct.gc_interval.to_string(),
                reason: "must be within 1..=3600 seconds".into(),
            });
        }
        Ok(())
    }

    /// How the API is served (see `api.tls` in [`Config::default_toml`]): refuses plain HTTP on
    /// an address that is not loopback unless `api.insecure_http` asks for it, and settings that
    /// contradict each other.
    pub fn api_transport(&self) -> Result<ApiTransport> {
        let api = &self.api;
        let loopback = crate::server::is_loopback(self.listen.ip());
        let invalid = |key: &'static str, value: String, reason: &str| Error::Invalid {
            key,
            value,
            reason: reason.to_owned(),
        };
        let files = match (&api.tls_cert_file, &api.tls_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(invalid(
                    "api.tls_key_file",
                    String::new(),
                    &format!("api.tls_cert_file = {cert:?} needs its key too"),
                ))
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "api.tls_cert_file",
                    String::new(),
                    &format!("api.tls_key_file = {key:?} needs its certificate too"),
                ))
            }
        };
        let plain = match api.tls {
            TlsMode::On => false,
            TlsMode::Off => true,
            TlsMode::Auto => api.insecure_http || (files.is_none() && loopback),
        };
        if plain {
            if files.is_some() {
                return Err(invalid(
                    "api.tls",
                    format!("{:?}", api.tls).to_lowercase(),
                    "plain HTTP was asked for (api.tls = \"off\" or insecure_http) but a certificate is given",
                ));
            }
            if !loopback && !api.insecure_http {
                return Err(invalid(
                    "api.tls",
                    "off".into(),
                    &format!(
                        "refusing plain HTTP on {}, which is not a loopback address: give \
                         api.tls_cert_file and api.tls_key_file, or leave api.tls = \"auto\" for a \
                         self-signed certificate, or set api.insecure_http = true (--insecure-http)",
                        self.listen
                    ),
                ));
            }
            return Ok(ApiTransport::Http { insecure: !loopback });
        }
        if api.insecure_http {
            return Err(invalid(
                "api.insecure_http",
                "true".into(),
                "contradicts api.tls = \"on\"",
            ));
        }
        Ok(match files {
            Some((cert, key)) => ApiTransport::TlsFiles { cert, key },
            None => ApiTransport::TlsSelfSigned,
        })
    }

    /// A host that serves no API (`api.serve = false`) needs an etcd store (the embedded
    /// store's only editor is its own API) and advertises no API address.
    fn validate_no_api(&self) -> Result<()> {
        if self.api.serve {
            return Ok(());
        }
        if !matches!(StoreKind::parse(&self.store)?, StoreKind::Etcd(_)) {
            return Err(Error::Invalid {
                key: "api.serve",
                value: "false".into(),
                reason: format!(
                    "a host that serves no API needs an etcd store (store = {:?}): the \
                     embedded store is edited only through this host's API",
                    self.store
                ),
            });
        }
        if let Some(url) = &self.advertise_api {
            return Err(Error::Invalid {
                key: "advertise_api",
                value: url.clone(),
                reason: "contradicts api.serve = false (this host serves no API)".into(),
            });
        }
        Ok(())
    }

    /// The etcd TLS files come as a CA alone, or a CA with a client certificate and key.
    fn validate_etcd_tls(&self) -> Result<()> {
        let given = |v: &Option<PathBuf>| v.is_some();
        let (ca, cert, key) =
            (given(&self.etcd_ca_file), given(&self.etcd_cert_file), given(&self.etcd_key_file));
        if cert != key {
            return Err(Error::Invalid {
                key: if cert { "etcd_key_file" } else { "etcd_cert_file" },
                value: String::new(),
                reason: "etcd_cert_file and etcd_key_file go together".into(),
            });
        }
        if cert && !ca {
            return Err(Error::Invalid {
                key: "etcd_ca_file",
                value: String::new(),
                reason: "a client certificate for etcd needs etcd_ca_file (the CA of etcd's \
                         certificate) too"
                    .into(),
            });
        }
        Ok(())
    }

    /// The limits of the API's server ([`crate::server`]).
    pub fn server_settings(&self) -> crate::server::Settings {
        crate::server::Settings {
            max_connections: usize::try_from(self.api.max_connections).unwrap_or(usize::MAX),
            header_timeout: std::time::Duration::from_secs(self.api.header_timeout),
            idle_timeout: std::time::Duration::from_secs(self.api.idle_timeout),
        }
    }

    /// The per-request limits of the API ([`crate::limits`]).
    pub fn limit_settings(&self) -> crate::limits::Settings {
        let api = &self.api;
        crate::limits::Settings {
            max_body_bytes: usize::try_from(api.max_body_bytes).unwrap_or(usize::MAX),
            body_timeout: std::time::Duration::from_secs(api.body_timeout),
            reads: crate::limits::Rate {
                per_second: f64::from(api.read_rate),
                burst: f64::from(api.read_burst),
            },
            writes: crate::limits::Rate {
                per_second: f64::from(api.write_rate),
                burst: f64::from(api.write_burst),
            },
        }
    }

    /// The garbage collection interval (`conntrack.gc_interval`).
    pub fn gc_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.conntrack.gc_interval)
    }

    /// Where the desired state lives (`store`, already validated by [`Config::load`]).
    pub fn store_kind(&self) -> Result<StoreKind> {
        StoreKind::parse(&self.store)
    }

    /// The etcd settings, when `store` names an etcd cluster (this reads the password file).
    pub fn etcd_options(&self) -> Result<Option<crate::store::EtcdOptions>> {
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| Error::Read { path: path.clone(), source })?;
                let password = text.trim_end_matches(['\n', '\r']).to_owned();
                Some((user.clone(), password))
            }
            _ => None,
        };
        Ok(match self.store_kind()? {
            StoreKind::Embedded => None,
            StoreKind::Etcd(endpoints) => Some(crate::store::EtcdOptions {
                endpoints,
                prefix: self.etcd_prefix.clone(),
                lease_ttl: std::time::Duration::from_secs(self.etcd_lease_ttl),
                liveness_linger: crate::store::etcd::LIVENESS_LINGER,
                // A host that serves no API follows only what it enforces.
                scope: if self.api.serve { None } else { Some(self.host_name()?) },
                user,
                audit_retention: self.audit_retention(),
                tls: self.etcd_ca_file.as_ref().map(|ca| crate::store::EtcdTls {
                    ca_file: ca.clone(),
                    identity: self.etcd_cert_file.clone().zip(self.etcd_key_file.clone()),
                }),
            }),
        })
    }

    /// How much of the audit trail the store keeps.
    pub fn audit_retention(&self) -> AuditRetention {
        AuditRetention {
            max_records: self.audit_retention_records,
            max_age: std::time::Duration::from_secs(
                self.audit_retention_days.saturating_mul(86400),
            ),
        }
    }

    /// The local unix socket of the API (root only).
    pub fn api_socket(&self) -> PathBuf {
        self.api_socket.clone().unwrap_or_else(|| self.state_dir.join(crate::auth::SOCKET_FILE))
    }

    /// The bpffs directory where maps and links are pinned.
    pub fn bpf_dir(&self) -> PathBuf {
        self.bpf_dir.clone().unwrap_or_else(|| self.state_dir.join("bpf"))
    }

    /// The host name this daemon serves: the `host` setting, else this machine's hostname.
    pub fn host_name(&self) -> Result<String> {
        match &self.host {
            Some(h) => Ok(h.clone()),
            None => hostname().map_err(Error::Hostname),
        }
    }

    /// `gateway_mac` as bytes.
    pub fn gateway_mac_bytes(&self) -> Result<[u8; 6]> {
        parse_mac(&self.gateway_mac).ok_or_else(|| Error::Invalid {
            key: "gateway_mac",
            value: self.gateway_mac.clone(),
            reason: "expected six hex bytes separated by ':' (02:76:65:72:73:65)".into(),
        })
    }

    /// The settings the dataplane reads from `VERSE_CONFIG`.
    pub fn dataplane_config(&self) -> Result<dp::Config> {
        use dp::ct_state as s;
        let ct = &self.conntrack;
        let mut timeouts_ns = [0u64; s::COUNT];
        for (state, secs) in [
            (s::TCP_OPENING, ct.tcp_opening),
            (s::TCP_ESTABLISHED, ct.tcp_established),
            (s::TCP_CLOSING, ct.tcp_closing),
            (s::UDP_ONE_WAY, ct.udp_one_way),
            (s::UDP_REPLIED, ct.udp_replied),
            (s::ICMP, ct.icmp),
            (s::OTHER, ct.other),
        ] {
            timeouts_ns[usize::from(state)] = secs.saturating_mul(1_000_000_000);
        }
        let o = &self.observability;
        let mut flags = 0;
        if o.events {
            flags |= dp::config_flags::EVENTS;
        }
        let event_interval_ns = 1_000_000_000 / u64::from(o.event_rate.max(1));
        // The underlay fields are filled in by versed once it has looked the interface up.
        Ok(dp::Config {
            timeouts_ns,
            gateway_mac: self.gateway_mac_bytes()?,
            flags,
            event_interval_ns,
            event_burst_ns: event_interval_ns.saturating_mul(u64::from(o.event_burst)),
            ..dp::Config::default()
        })
    }

    /// Where the other hosts of the fleet reach this host's API: `advertise_api`, else
    /// `<scheme>://<listen>` when `listen` is a specific address that is not loopback, else
    /// `<scheme>://<underlay_ip>:<port>` when `listen` is a wildcard and this host has an
    /// underlay (`https` when the API is served over TLS, see [`Config::api_transport`]);
    /// `None` when they cannot (listening on loopback only).
    pub fn api_url(&self, underlay_ip: Option<std::net::Ipv4Addr>) -> Option<String> {
        if !self.api.serve {
            return None;
        }
        if let Some(url) = &self.advertise_api {
            return Some(url.trim_end_matches('/').to_owned());
        }
        let ip = self.listen.ip();
        if ip.is_loopback() {
            return None;
        }
        let scheme = match self.api_transport() {
            Ok(ApiTransport::Http { .. }) => "http",
            _ => "https",
        };
        if ip.is_unspecified() {
            return underlay_ip.map(|u| format!("{scheme}://{u}:{}", self.listen.port()));
        }
        Some(format!("{scheme}://{}", self.listen))
    }

    /// Every setting with a comment above it and its default value; parses back to
    /// [`Config::default`]. Settings whose default is derived at start are shown commented out.
    pub fn default_toml() -> String {
        let d = Config::default();
        let ct = &d.conntrack;
        format!(
            r#"# versed settings. Every setting is optional; the values shown are the defaults.
# Command-line flags (--listen, --state-dir, --host, --underlay, --store, --admin-token-file,
# --insecure-http, --no-api) override this file.

# Address and port of the REST API (and of /metrics, /healthz). Every request but /healthz
# and /v1/openapi.json needs a token (Authorization: Bearer ...), see the README, "Access".
listen = "{listen}"

# Directory of the daemon's own state (created mode 0700): the embedded store's state.json and
# audit trail, the first admin token (admin.token, mode 0600) and the local socket live here.
state_dir = "{state_dir}"

# The local unix socket of the API (mode 0600): root on this host gets in without a token,
# as an admin. Default: "<state_dir>/api.sock".
# api_socket = "{state_dir}/api.sock"

# A file holding an admin token (vt_<8 hex>_<64 hex>) to register at start if the store has no
# valid admin token. Default: none; then versed makes one into "<state_dir>/admin.token".
# admin_token_file = "/etc/verse/admin.token"

# Audit trail (every mutation and every refused credential, in the store): how many records
# to keep, about (the oldest go first)...
audit_retention_records = {audit_records}
# ...and for how many days.
audit_retention_days = {audit_days}

# bpffs directory where the dataplane's maps and links are pinned, so that they survive a
# restart of versed. Default: "<state_dir>/bpf" (a bpffs is mounted there if none is).
# bpf_dir = "{state_dir}/bpf"

# Name of this host in the control plane; endpoints created here without a host are placed on
# it. Default: this machine's hostname.
# host = "my-host"

# Interface facing the underlay network between hosts (unused while the store is embedded).
# Default: none.
# underlay = "eth1"

# Where the desired state lives: "embedded" (a file in state_dir, one host) or
# "etcd://HOST:PORT[,HOST:PORT...]" (an etcd cluster shared by every host of the fleet).
store = "{store}"

# etcd store: prefix of every key of the fleet's state (several fleets can share one etcd).
etcd_prefix = "{etcd_prefix}"

# etcd store: seconds after which a host whose versed stopped renewing its liveness record
# (stopped, crashed, or cut off from etcd) is shown unhealthy, and no longer waited for.
etcd_lease_ttl = {etcd_lease_ttl}

# etcd store over TLS (etcd started with --cert-file/--key-file, and maybe
# --client-cert-auth): the CA of etcd's certificate, PEM. Setting it turns TLS on for every
# etcd endpoint. Default: none (plain gRPC).
# etcd_ca_file = "/etc/verse/etcd-ca.pem"

# etcd store over TLS: this host's client certificate and its key, PEM, when etcd asks clients
# for one (--client-cert-auth). Both or neither. Default: none.
# etcd_cert_file = "/etc/verse/etcd-client.pem"
# etcd_key_file = "/etc/verse/etcd-client.key"

# etcd store: the etcd user this host authenticates as, and a file holding its password (etcd
# RBAC; see the README, "etcd access control", for the roles a host needs). Default: none.
# etcd_user = "verse-host-a"
# etcd_password_file = "/etc/verse/etcd-password"

# MTU of the workload interfaces (eth0 in each workload namespace and its host-side veth).
mtu = {mtu}

# MAC address the dataplane answers ARP requests with and writes as the source of frames it
# delivers to workloads (the workloads' gateway).
gateway_mac = "{gateway_mac}"

# Where the other hosts of the fleet reach this host's API, to relay its verdict events, flow
# logs and rule counters into one view (GET /v1/events and others; see the README, "Why was my
# packet dropped?"). Relayed requests carry the caller's token, so another host sends them only
# over TLS to the certificate this host registers with the address (its API's, when it serves
# TLS), or over plain HTTP to a loopback address: a plain-HTTP address across the network is
# never asked. Default: "https://<listen>" (http:// without TLS) when listen is a specific
# address that is not loopback, "https://<underlay address>:<port>" when listen is 0.0.0.0;
# none when listen is loopback (then this host's events are seen only through its own API).
# advertise_api = "https://198.18.0.1:7070"

# Connection tracking. Idle timeouts of tracked connections, in seconds (a flow idle longer than
# this is forgotten, and its next packet is judged by the rules again); budgets; garbage
# collection.
[conntrack]
# TCP connection once both sides have answered.
tcp_established = {tcp_established}
# TCP connection during its handshake.
tcp_opening = {tcp_opening}
# TCP connection after a FIN or RST.
tcp_closing = {tcp_closing}
# UDP flow after a reply was seen.
udp_replied = {udp_replied}
# UDP flow that has only gone one way.
udp_one_way = {udp_one_way}
# ICMP echo (ping) by identifier.
icmp = {icmp}
# Any other IP protocol, by addresses and protocol.
other = {other}
# Conntrack budget of an endpoint created through this daemon's API without
# `conntrack_budget`: the flows it may have tracked at once on its host. New flows beyond it
# are dropped for that endpoint alone (drop reason conntrack_budget_exceeded). The budgets of
# the endpoints of one host add up to at most {capacity} flows; an endpoint that would not fit
# is refused (409).
endpoint_budget = {endpoint_budget}
# Longest time, in seconds, between two garbage collections of the conntrack table (expired
# flows, and flows of deleted endpoints, give their owner's budget back when collected).
# Collections also run sooner, for an endpoint that has used 90% of its budget, once one of its
# flows expires (at most once per 20 times the duration of the last collection, and per second).
gc_interval = {gc_interval}

# The REST API's server.
[api]
# Serve the API on this host (--no-api sets false). A host that serves no API needs an etcd
# store; it enforces the endpoints placed on it through other hosts' APIs, follows and keeps
# only the hosts, the tokens, its own placements and the universes with an endpoint on it (its
# memory, maps and watch traffic grow with its own workloads, not the fleet's), and answers
# only /healthz and /metrics on `listen` and on the local socket: every other request is
# answered 404 `api_not_served` (README, "Scale"). It advertises no API address, so other
# hosts' fleet-wide views (events, flow logs, rule counters, traces) say it cannot be asked.
serve = {serve}
# TLS: "auto" serves TLS when a certificate is given or `listen` is not a loopback address,
# and plain HTTP on loopback otherwise; "on" always serves TLS; "off" serves plain HTTP, which
# versed refuses on an address that is not loopback unless insecure_http = true.
tls = "{tls}"
# Certificate chain (leaf first) and private key, PEM. Without them, TLS uses a self-signed
# pair that versed generates at first start into <state_dir>/tls/ (api.crt, api.key) and keeps;
# its SHA-256 fingerprint is in the log at every start. Default: none.
# tls_cert_file = "/etc/verse/api.crt"
# tls_key_file = "/etc/verse/api.key"
# Serve plain HTTP even on an address that is not loopback (--insecure-http): anyone on the
# path can read the requests and change them.
insecure_http = {insecure_http}
# Connections served at once. At the cap, a new connection closes the one that has waited the
# longest without a request in progress; at most half of the open-file limit (versed raises
# its soft limit to the hard limit at start).
max_connections = {max_connections}
# Seconds a connection has to send a whole request head (and, first, its TLS handshake), from
# its opening or from the first byte of the head.
header_timeout = {header_timeout}
# Seconds a connection may stay open between requests.
idle_timeout = {idle_timeout}
# Seconds a request body may take to arrive after its head (then 408).
body_timeout = {body_timeout}
# Largest request body, in bytes (larger: 413).
max_body_bytes = {max_body_bytes}
# Reads (GET) a second each principal (today: each client address) may make; beyond its rate
# and burst a request is answered 429 with Retry-After.
read_rate = {read_rate}
# Reads a principal may save up for a burst.
read_burst = {read_burst}
# Writes (every other method) a second each principal may make.
write_rate = {write_rate}
# Writes a principal may save up for a burst.
write_burst = {write_burst}
# Why was my packet dropped? Verdict events (README, "Why was my packet dropped?").
[observability]
# Report verdict events (each dropped packet, each new flow admitted by policy) from the
# dataplane to versed (GET /v1/events, verse monitor).
events = {events}
# Each CPU reports at most this many events of a kind (drops, new flows) per second on
# average...
event_rate = {event_rate}
# ...and at most this many at once. Beyond that, events are counted (verse_events_total
# {{outcome="suppressed"}}) but not reported: a flood costs a bounded share of a CPU.
event_burst = {event_burst}
# Recent events kept in memory for GET /v1/events?recent=N.
event_history = {event_history}
# Flow logs of the endpoints that have them on (README, "Why was my packet dropped?"): one
# record per endpoint, flow and direction per this many seconds (10 to 600), written as JSON
# lines under <state_dir>/flow-logs and read with GET /v1/flow-logs (verse flow-logs).
flow_log_interval = {flow_log_interval}
# The file is rotated when the next record would take it past this many bytes...
flow_log_rotate_bytes = {flow_log_rotate_bytes}
# ...and this many rotated files are kept: the flow logs never take more than
# flow_log_rotate_bytes * (flow_log_keep + 1) bytes.
flow_log_keep = {flow_log_keep}
"#,
            listen = d.listen,
            state_dir = d.state_dir.display(),
            store = d.store,
            etcd_prefix = d.etcd_prefix,
            etcd_lease_ttl = d.etcd_lease_ttl,
            audit_records = d.audit_retention_records,
            audit_days = d.audit_retention_days,
            mtu = d.mtu,
            gateway_mac = d.gateway_mac,
            tcp_established = ct.tcp_established,
            tcp_opening = ct.tcp_opening,
            tcp_closing = ct.tcp_closing,
            udp_replied = ct.udp_replied,
            udp_one_way = ct.udp_one_way,
            icmp = ct.icmp,
            other = ct.other,
            serve = d.api.serve,
            tls = format!("{:?}", d.api.tls).to_lowercase(),
            insecure_http = d.api.insecure_http,
            max_connections = d.api.max_connections,
            header_timeout = d.api.header_timeout,
            idle_timeout = d.api.idle_timeout,
            body_timeout = d.api.body_timeout,
            max_body_bytes = d.api.max_body_bytes,
            read_rate = d.api.read_rate,
            read_burst = d.api.read_burst,
            write_rate = d.api.write_rate,
            write_burst = d.api.write_burst,
            events = d.observability.events,
            event_rate = d.observability.event_rate,
            event_burst = d.observability.event_burst,
            event_history = d.observability.event_history,
            flow_log_interval = d.observability.flow_log_interval,
            flow_log_rotate_bytes = d.observability.flow_log_rotate_bytes,
            flow_log_keep = d.observability.flow_log_keep,
            endpoint_budget = ct.endpoint_budget,
            gc_interval = ct.gc_interval,
            capacity = dp::capacity::CONNTRACK,
        )
    }
}

/// Host names travel in the API and as store keys (`hosts/<name>`, `alive/<name>`): keep them
/// plain.
fn validate_host_name(host: &str) -> Result<()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            key: "host",
            value: host.to_owned(),
            reason: "expected 1 to 253 characters among letters, digits, '-', '.', '_'".into(),
        })
    }
}

/// Checks an API address other hosts use: `http://HOST:PORT` (or `https://`), no path.
pub fn parse_api_url(url: &str) -> std::result::Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("expected http://HOST:PORT")?;
    let rest = rest.trim_end_matches('/');
    let ok = rest.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if ok {
        Ok(())
    } else {
        Err("expected http://HOST:PORT".into())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, case-insensitive).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// This machine's hostname (the UTS namespace's; `ip netns exec` keeps it).
pub fn hostname() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length passed; gethostname writes at most
    // that many bytes and we only read up to the first NUL within the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    if name.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "the hostname is empty"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn default_toml_parses_back_to_the_defaults_and_documents_every_setting() {
        let text = Config::default_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
        // Every key of the serialized defaults appears in the text, after a comment line.
        let lines: Vec<&str> = text.lines().collect();
        for key in [
            "listen",
            "state_dir",
            "bpf_dir",
            "host",
            "underlay",
            "store",
            "etcd_prefix",
            "etcd_lease_ttl",
            "mtu",
            "gateway_mac",
            "api_socket",
            "admin_token_file",
            "etcd_user",
            "etcd_password_file",
            "audit_retention_records",
            "audit_retention_days",
            "tcp_established",
            "tcp_opening",
            "tcp_closing",
            "udp_replied",
            "udp_one_way",
            "icmp",
            "other",
            "etcd_ca_file",
            "etcd_cert_file",
            "etcd_key_file",
            "serve",
            "tls",
            "tls_cert_file",
            "tls_key_file",
            "insecure_http",
            "max_connections",
            "header_timeout",
            "idle_timeout",
            "body_timeout",
            "max_body_bytes",
            "read_rate",
            "read_burst",
            "write_rate",
            "write_burst",
            "advertise_api",
            "events",
            "event_rate",
            "event_burst",
            "event_history",
            "flow_log_interval",
            "flow_log_rotate_bytes",
            "flow_log_keep",
            "endpoint_budget",
            "gc_interval",
        ] {
            let i = lines
                .iter()
                .position(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = ")))
                .unwrap_or_else(|| panic!("{key} missing from the default config"));
            assert!(lines[i - 1].starts_with('#'), "{key} has no comment above it");
        }
    }

    #[test]
    fn unknown_key_is_refused_naming_the_key() {
        let err = Config::from_toml("listen = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
        let err = Config::from_toml("[conntrack]\ntcp_establihsed = 3\n").unwrap_err();
        assert!(err.contains("tcp_establihsed"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused_naming_the_key() {
        let err = Config::from_toml("mtu = \"big\"\n").unwrap_err();
        assert!(err.contains("mtu"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("verse-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("versed.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nhost = \"from-file\"\nmtu = 9000\n")
            .unwrap();
        let args = Args::parse_from([
            "versed",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9001",
            "--state-dir",
            "/tmp/x",
        ]);
        let cfg = Config::load(&args).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(cfg.host.as_deref(), Some("from-file"));
        assert_eq!(cfg.mtu, 9000);
        assert_eq!(cfg.bpf_dir(), PathBuf::from("/tmp/x/bpf"));
    }

    #[test]
    fn etcd_store_is_accepted_and_bad_store_urls_are_refused() {
        let args = Args::parse_from([
            "versed",
            "--host",
            "h1",
            "--store",
            "etcd://127.0.0.1:2379,10.0.0.2:2379",
        ]);
        let cfg = Config::load(&args).unwrap();
        let etcd = cfg.etcd_options().unwrap().unwrap();
        assert_eq!(etcd.endpoints, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(etcd.prefix, "/verse/");
        assert_eq!(etcd.lease_ttl, std::time::Duration::from_secs(5));
        assert_eq!(
            Config { host: Some("h".into()), ..Config::default() }.etcd_options().unwrap(),
            None
        );
        let c = Config { host: Some("h".into()), etcd_prefix: "verse".into(), ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("etcd_prefix"));
        let c = Config { host: Some("h".into()), etcd_lease_ttl: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("etcd_lease_ttl"));
        let args = Args::parse_from(["versed", "--host", "h1", "--store", "etcd://nohost"]);
        assert!(Config::load(&args).unwrap_err().to_string().contains("store"));
        let args = Args::parse_from(["versed", "--host", "h1", "--store", "consul://x"]);
        assert!(Config::load(&args).unwrap_err().to_string().contains("store"));
        assert_eq!(
            StoreKind::parse("etcd://a:1,b:2").unwrap(),
            StoreKind::Etcd(vec!["a:1".into(), "b:2".into()])
        );
    }

    #[test]
    fn a_host_that_serves_no_api_follows_only_its_own_part_of_etcd() {
        let store = "etcd://127.0.0.1:2379";
        let args = Args::parse_from(["versed", "--host", "h1", "--store", store]);
        let cfg = Config::load(&args).unwrap();
        assert!(cfg.api.serve);
        assert_eq!(cfg.etcd_options().unwrap().unwrap().scope, None);
        let args = Args::parse_from(["versed", "--host", "h1", "--store", store, "--no-api"]);
        let cfg = Config::load(&args).unwrap();
        assert!(!cfg.api.serve);
        assert_eq!(cfg.etcd_options().unwrap().unwrap().scope.as_deref(), Some("h1"));
        // It advertises no API address, even listening where others could reach it.
        let open = Config { listen: "0.0.0.0:7070".parse().unwrap(), ..cfg.clone() };
        assert_eq!(open.api_url(Some(std::net::Ipv4Addr::new(198, 18, 0, 1))), None);
        // The same from the file.
        let file = Config::from_toml("store = \"etcd://a:1\"\n[api]\nserve = false\n").unwrap();
        assert!(!file.api.serve);
        // The embedded store has no editor but its own API.
        let err = Config::load(&Args::parse_from(["versed", "--host", "h1", "--no-api"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("api.serve") && err.contains("etcd"), "{err}");
        let c = Config { advertise_api: Some("https://198.18.0.1:7070".into()), ..cfg };
        assert!(c.validate().unwrap_err().to_string().contains("advertise_api"));
    }

    #[test]
    fn etcd_credentials_and_audit_retention_reach_the_store_options() {
        let dir = std::env::temp_dir().join(format!("verse-config-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = Config {
            host: Some("h".into()),
            store: "etcd://127.0.0.1:2379".into(),
            etcd_user: Some("verse-h".into()),
            etcd_password_file: Some(pw.clone()),
            audit_retention_records: 50,
            audit_retention_days: 2,
            ..Config::default()
        };
        c.validate().unwrap();
        let o = c.etcd_options().unwrap().unwrap();
        assert_eq!(o.user, Some(("verse-h".into(), "s3cret".into())));
        assert_eq!(o.audit_retention.max_records, 50);
        assert_eq!(o.audit_retention.max_age, std::time::Duration::from_secs(2 * 86400));
        let c = Config { etcd_password_file: None, ..c };
        assert!(c.validate().unwrap_err().to_string().contains("etcd_user"));
        let c = Config { etcd_user: None, etcd_password_file: Some(dir.join("missing")), ..c };
        assert!(c.validate().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        let c = Config { host: Some("h".into()), audit_retention_records: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("audit_retention_records"));
        assert_eq!(Config::default().api_socket(), PathBuf::from("/var/lib/verse/api.sock"));
    }

    #[test]
    fn dataplane_config_carries_the_s9_timeouts_and_gateway_mac() {
        let c = Config::default().dataplane_config().unwrap();
        use dp::ct_state as s;
        assert_eq!(c.timeouts_ns[usize::from(s::TCP_ESTABLISHED)], 432_000 * 1_000_000_000);
        assert_eq!(c.timeouts_ns[usize::from(s::TCP_OPENING)], 60 * 1_000_000_000);
        assert_eq!(c.timeouts_ns[usize::from(s::UDP_ONE_WAY)], 30 * 1_000_000_000);
        assert_eq!(c.timeouts_ns[usize::from(s::UDP_REPLIED)], 180 * 1_000_000_000);
        assert_eq!(c.timeouts_ns[usize::from(s::OTHER)], 600 * 1_000_000_000);
        assert_eq!(c.gateway_mac, [0x02, 0x76, 0x65, 0x72, 0x73, 0x65]);
    }

    #[test]
    fn plain_http_only_on_loopback_unless_asked_and_tls_otherwise() {
        let with = |listen: &str, api: ApiSettings| Config {
            host: Some("h".into()),
            listen: listen.parse().unwrap(),
            api,
            ..Config::default()
        };
        let t = |c: Config| c.api_transport();
        // The default: plain HTTP on loopback, a self-signed certificate anywhere else.
        assert_eq!(
            t(with("127.0.0.1:7070", ApiSettings::default())).unwrap(),
            ApiTransport::Http { insecure: false }
        );
        assert_eq!(
            t(with("0.0.0.0:7070", ApiSettings::default())).unwrap(),
            ApiTransport::TlsSelfSigned
        );
        assert_eq!(
            t(with("[::1]:7070", ApiSettings { tls: TlsMode::On, ..ApiSettings::default() }))
                .unwrap(),
            ApiTransport::TlsSelfSigned
        );
        let files = ApiSettings {
            tls_cert_file: Some("/c".into()),
            tls_key_file: Some("/k".into()),
            ..ApiSettings::default()
        };
        assert_eq!(
            t(with("127.0.0.1:7070", files.clone())).unwrap(),
            ApiTransport::TlsFiles { cert: "/c".into(), key: "/k".into() }
        );
        // Plain HTTP elsewhere only when asked for.
        let off = ApiSettings { tls: TlsMode::Off, ..ApiSettings::default() };
        let err = t(with("198.18.0.1:7070", off.clone())).unwrap_err().to_string();
        assert!(err.contains("insecure_http") && err.contains("198.18.0.1"), "{err}");
        let insecure = ApiSettings { insecure_http: true, ..ApiSettings::default() };
        assert_eq!(
            t(with("0.0.0.0:7070", insecure.clone())).unwrap(),
            ApiTransport::Http { insecure: true }
        );
        let args =
            Args::parse_from(["versed", "--host", "h", "--listen", "0.0.0.0:1", "--insecure-http"]);
        assert_eq!(
            Config::load(&args).unwrap().api_transport().unwrap(),
            ApiTransport::Http { insecure: true }
        );
        // Contradictions are refused, naming a setting.
        let half = ApiSettings { tls_cert_file: Some("/c".into()), ..ApiSettings::default() };
        assert!(t(with("127.0.0.1:1", half)).unwrap_err().to_string().contains("api.tls_key_file"));
        let both = ApiSettings { insecure_http: true, ..files };
        assert!(t(with("127.0.0.1:1", both)).unwrap_err().to_string().contains("api.tls"));
        let on = ApiSettings { tls: TlsMode::On, insecure_http: true, ..ApiSettings::default() };
        assert!(t(with("127.0.0.1:1", on)).unwrap_err().to_string().contains("insecure_http"));
        let toml = "[api]\ntls = \"sometimes\"\n";
        assert!(Config::from_toml(toml).unwrap_err().contains("tls"));
    }

    #[test]
    fn etcd_tls_files_go_together() {
        let c = Config {
            host: Some("h".into()),
            etcd_cert_file: Some("/c".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("etcd_key_file"));
        let c = Config {
            host: Some("h".into()),
            etcd_cert_file: Some("/c".into()),
            etcd_key_file: Some("/k".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("etcd_ca_file"));
        let args = Args::parse_from(["versed", "--host", "h", "--store", "etcd://127.0.0.1:2379"]);
        let mut c = Config::load(&args).unwrap();
        c.etcd_ca_file = Some("/ca".into());
        let tls = c.etcd_options().unwrap().unwrap().tls.unwrap();
        assert_eq!((tls.ca_file, tls.identity), ("/ca".into(), None));
    }

    #[test]
    fn invalid_values_name_their_setting() {
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.gateway_mac = "02:76:65".into();
        assert!(c.validate().unwrap_err().to_string().contains("gateway_mac"));
        let c = Config { host: Some("h".into()), mtu: 10, ..Config::default() };
        assert!(c.validate().unwrap_err().to_string().contains("mtu"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.conntrack.icmp = 0;
        assert!(c.validate().unwrap_err().to_string().contains("conntrack.icmp"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.api.max_connections = 0;
        assert!(c.validate().unwrap_err().to_string().contains("api.max_connections"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.api.write_rate = 0;
        assert!(c.validate().unwrap_err().to_string().contains("api.write_rate"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.observability.event_rate = 0;
        assert!(c.validate().unwrap_err().to_string().contains("observability.event_rate"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.observability.flow_log_interval = 9;
        assert!(c.validate().unwrap_err().to_string().contains("observability.flow_log_interval"));
        c.observability.flow_log_interval = 601;
        assert!(c.validate().unwrap_err().to_string().contains("observability.flow_log_interval"));
        c.observability.flow_log_interval = 10;
        c.validate().unwrap();
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.conntrack.endpoint_budget = 0;
        assert!(c.validate().unwrap_err().to_string().contains("conntrack.endpoint_budget"));
        c.conntrack.endpoint_budget = dp::capacity::CONNTRACK + 1;
        assert!(c.validate().unwrap_err().to_string().contains("conntrack.endpoint_budget"));
        let mut c = Config { host: Some("h".into()), ..Config::default() };
        c.conntrack.gc_interval = 0;
        assert!(c.validate().unwrap_err().to_string().contains("conntrack.gc_interval"));
        let c = Config {
            host: Some("h".into()),
            advertise_api: Some("198.18.0.1:7070".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("advertise_api"));
    }

    #[test]
    fn the_api_url_other_hosts_use() {
        let api = ApiSettings { tls: TlsMode::Off, insecure_http: true, ..ApiSettings::default() };
        let at = |listen: &str| Config {
            listen: listen.parse().unwrap(),
            api: api.clone(),
            ..Config::default()
        };
        let ul = Some("198.18.0.3".parse().unwrap());
        let tls = Config { listen: "10.1.2.3:9".parse().unwrap(), ..Config::default() };
        assert_eq!(tls.api_url(ul).as_deref(), Some("https://10.1.2.3:9"), "TLS by default");
        assert_eq!(at("127.0.0.1:7070").api_url(ul), None);
        assert_eq!(at("0.0.0.0:7070").api_url(ul).as_deref(), Some("http://198.18.0.3:7070"));
        assert_eq!(at("0.0.0.0:7070").api_url(None), None);
        assert_eq!(at("10.1.2.3:9").api_url(ul).as_deref(), Some("http://10.1.2.3:9"));
        let c = Config { advertise_api: Some("http://h3:7070/".into()), ..at("127.0.0.1:1") };
        assert_eq!(c.api_url(ul).as_deref(), Some("http://h3:7070"));
    }

    #[test]
    fn observability_reaches_the_dataplane_config() {
        let mut c = Config::default();
        let d = c.dataplane_config().unwrap();
        assert_eq!(d.flags, dp::config_flags::EVENTS);
        assert_eq!(d.event_interval_ns, 1_000_000);
        assert_eq!(d.event_burst_ns, 1_000_000_000);
        c.observability.events = false;
        assert_eq!(c.dataplane_config().unwrap().flags, 0);
    }
}
