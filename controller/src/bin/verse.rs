//! `verse`: the command-line client of the Verse API. Same nouns as the API: universe, sg,
//! rule, endpoint, host, token, audit.
//!
//! Where and as whom (first found wins): `--api`/`VERSE_API` and `--token`/`VERSE_TOKEN`; then
//! the context of the config file (`--context`/`VERSE_CONTEXT`, else its `current_context`);
//! then, as root with no token, the local socket of the host's `versed`
//! (`unix:/var/lib/verse/api.sock`, if it exists); else `http://127.0.0.1:7070` without a
//! token. Over `https://`, the certificate is checked against `--ca-file`/`VERSE_CA_FILE` or
//! pinned by `--fingerprint`/`VERSE_TLS_FINGERPRINT`, else the context's `ca_file` or
//! `fingerprint`, else the system's roots. The config file (`--config`/`VERSE_CONFIG`, default
//! `$XDG_CONFIG_HOME/verse/config.toml` or `~/.config/verse/config.toml`) is TOML:
//!
//! ```toml
//! current_context = "prod"
//! [contexts.prod]
//! api = "https://10.0.0.1:7070"
//! token_file = "~/.config/verse/prod.token"   # or: token = "vt_..."
//! ca_file = "~/.config/verse/prod-ca.pem"     # or: fingerprint = "<sha256 of versed's certificate>"
//! [contexts.local]
//! api = "unix:/var/lib/verse/api.sock"
//! ```
//!
//! Exit status: 0 on success, 1 when the server refused the request or could not be reached
//! (its message on stderr), 2 on a usage error (or an unusable config file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use verse::api::{CreatedToken, EndpointView, Host, TokenView};
use verse::audit::AuditRecord;
use verse::client::{self, Client, DEFAULT_API};
use verse::events::StreamItem;
use verse::flowlogs::FlowLogRecord;
use verse::hits::GroupView;
use verse::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateToken, CreateUniverse, PatchEndpoint, Role,
    Rule, SecurityGroup, Universe,
};

/// The local socket of a `versed` with the default `state_dir`.
const DEFAULT_SOCKET: &str = "/var/lib/verse/api.sock";

#[derive(Parser)]
#[command(name = "verse", version, about = "Command-line client of the Verse API")]
struct Cli {
    /// API of a versed: https://HOST:PORT (or http:// on loopback), or unix:PATH for its local
    /// socket (root only). Default: the context's; else, as root without a token,
    /// unix:/var/lib/verse/api.sock; else http://127.0.0.1:7070.
    #[arg(long, global = true, env = "VERSE_API", value_name = "URL")]
    api: Option<String>,
    /// API token (vt_...). Default: the context's.
    #[arg(long, global = true, env = "VERSE_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,
    /// A context of the config file. Default: its current_context.
    #[arg(long, global = true, env = "VERSE_CONTEXT", value_name = "NAME")]
    context: Option<String>,
    /// Config file. Default: $XDG_CONFIG_HOME/verse/config.toml (~/.config/verse/config.toml).
    #[arg(long, global = true, env = "VERSE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Over https://, trust only the certificates of this PEM file (the CA of versed's
    /// certificate, or versed's self-signed <state-dir>/tls/api.crt) instead of the system's.
    /// Default: the context's ca_file.
    #[arg(long, global = true, env = "VERSE_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Over https://, accept exactly the certificate with this SHA-256 fingerprint (as versed
    /// logs it at start), whatever its name or issuer. Default: the context's fingerprint.
    #[arg(long, global = true, env = "VERSE_TLS_FINGERPRINT", value_name = "SHA256")]
    fingerprint: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Universes: isolated tenant networks.
    #[command(subcommand)]
    Universe(UniverseCmd),
    /// Security groups.
    #[command(subcommand)]
    Sg(SgCmd),
    /// Rules of a security group.
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Endpoints: workload interfaces.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Hosts and the revision each has realized.
    #[command(subcommand)]
    Host(HostCmd),
    /// API tokens (admin only).
    #[command(subcommand)]
    Token(TokenCmd),
    /// The audit trail: every mutation and every refused credential, newest last.
    Audit {
        /// Only this universe's records.
        #[arg(long)]
        universe: Option<String>,
        /// Only records since an RFC 3339 time (UTC) or this long ago: 1h, 30m, 7d.
        #[arg(long)]
        since: Option<String>,
        /// At most this many, the newest (server default 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Flow logs of an endpoint: per flow, direction and interval, its packets, bytes, TCP
    /// flags, ACCEPT with the rule or REJECT with the reason, oldest first (README, "Why was my
    /// packet dropped?"). Read from the endpoint's host.
    FlowLogs {
        #[arg(long)]
        endpoint: String,
        /// Only records of intervals ending since an RFC 3339 time (UTC) or this long ago: 1h.
        #[arg(long)]
        since: Option<String>,
        /// At most this many, the newest (server default 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The live verdict events of every host: dropped packets and new flows admitted by policy,
    /// with the rule that admitted them or what a policy drop searched (README, "Why was my
    /// packet dropped?").
    Monitor {
        #[arg(long)]
        universe: Option<String>,
        /// The local endpoint judged, or either endpoint of the packet.
        #[arg(long)]
        endpoint: Option<String>,
        /// A group whose rule admitted the flow, or whose rules a policy drop searched.
        #[arg(long)]
        group: Option<String>,
        #[arg(long, value_parser = ["admitted", "dropped"])]
        verdict: Option<String>,
        /// A drop reason (README, "How it works").
        #[arg(long)]
        reason: Option<String>,
        /// A rule id (sgr-...) that admitted the flow.
        #[arg(long)]
        rule: Option<String>,
        /// tcp, udp, icmp or a protocol number.
        #[arg(long)]
        protocol: Option<String>,
        /// Either port.
        #[arg(long)]
        port: Option<u16>,
        /// One host's events only.
        #[arg(long)]
        host: Option<String>,
        /// Start with up to this many of the most recent events of each host.
        #[arg(long, default_value_t = 0)]
        recent: usize,
        /// Print the recent events and stop, instead of following the live ones.
        #[arg(long)]
        no_follow: bool,
    },
    /// Why would a packet pass or be dropped? The verdict the dataplane would reach, step by
    /// step, from the maps the hosts have realized (no traffic sent): the sender's host, then
    /// the receiver's if it is another.
    Trace(TraceArgs),
    /// Wait until every healthy host has realized a revision.
    Wait {
        /// The revision to wait for (printed on stderr by every mutation).
        #[arg(long)]
        revision: u64,
        /// How long to wait: 30s, 500ms, 2m, or a number of seconds.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Args)]
struct TraceArgs {
    /// The sender: an endpoint id (ep-...) or an address of the universe (an IPv6 address, in
    /// either, traces IPv6).
    #[arg(long)]
    from: String,
    /// The receiver: an endpoint id (ep-...) or an address of the universe.
    #[arg(long)]
    to: String,
    /// tcp, udp, icmp, icmpv6 (which traces IPv6), or a protocol number.
    #[arg(long)]
    protocol: String,
    /// TCP/UDP destination port.
    #[arg(long)]
    port: Option<u16>,
    /// TCP/UDP source port (default: one no live flow uses).
    #[arg(long)]
    sport: Option<u16>,
    /// ICMP type (default 8, echo request; ICMPv6: 128).
    #[arg(long)]
    icmp_type: Option<u8>,
    /// ICMP code (default 0).
    #[arg(long)]
    icmp_code: Option<u8>,
    /// The universe, when neither --from nor --to is an endpoint id.
    #[arg(long)]
    universe: Option<String>,
    /// Also push a synthesized frame through the real programs (BPF_PROG_TEST_RUN) on each
    /// host involved, on private conntrack and counters, and show what the kernel did.
    #[arg(long)]
    run: bool,
    /// The API of a host of the fleet, to ask it directly: NAME=URL (repeat). Without one, a
    /// host's part is asked of --api, which relays it to the address that host registered.
    #[arg(long = "host-api", value_name = "NAME=URL", value_parser = parse_host_api)]
    host_apis: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum UniverseCmd {
    /// Create a universe (and its default group).
    Create {
        name: String,
        /// An IPv4 CIDR of the universe; repeat for several.
        #[arg(long = "cidr", required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        /// An IPv6 CIDR as well (/44 to /64); repeat for several. IPv6 flows between endpoints
        /// of one host and between hosts.
        #[arg(long = "ipv6-cidr", value_name = "CIDR")]
        ipv6_cidrs: Vec<String>,
    },
    List,
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum SgCmd {
    /// Create a security group (no ingress rule, egress to all).
    Create {
        #[arg(long)]
        universe: String,
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    List {
        #[arg(long)]
        universe: Option<String>,
    },
    /// Show a group and its rules.
    Show {
        id: String,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum RuleCmd {
    /// Add a rule to a security group.
    Add(RuleAdd),
    /// Delete a rule of a security group.
    Delete { sg: String, rule: String },
    /// The rules of a security group.
    List {
        sg: String,
        /// With the new flows each rule admitted, summed over the fleet (HITS; 0: it never
        /// matched), and their packets both ways (PACKETS, counted since each daemon started).
        #[arg(long)]
        stats: bool,
    },
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("peer").required(true).args(["cidr", "group"]))]
struct RuleAdd {
    /// Security group id.
    sg: String,
    #[arg(long, value_parser = ["ingress", "egress"])]
    direction: String,
    /// tcp, udp, icmp, icmpv6, all, or a protocol number.
    #[arg(long)]
    protocol: String,
    /// A port or an inclusive range: 80, 8000-8100.
    #[arg(long, value_parser = parse_ports, value_name = "PORT[-PORT]")]
    ports: Option<(i64, i64)>,
    /// ICMP type (-1 = any).
    #[arg(long, allow_negative_numbers = true)]
    icmp_type: Option<i64>,
    /// ICMP code (-1 = any).
    #[arg(long, allow_negative_numbers = true)]
    icmp_code: Option<i64>,
    /// Peer CIDR.
    #[arg(long)]
    cidr: Option<String>,
    /// Peer security group id.
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    description: Option<String>,
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Plug a network namespace into a universe.
    Create {
        #[arg(long)]
        universe: String,
        /// An existing `ip netns` namespace.
        #[arg(long)]
        netns: String,
        #[arg(long)]
        ip: String,
        /// An IPv6 address as well, within the universe's IPv6 CIDRs (configured in the
        /// workload as ADDR/128 with a default route via the CIDR's second address).
        #[arg(long)]
        ipv6: Option<String>,
        /// A security group id; repeat for several (default: the universe's default group).
        #[arg(long = "sg", value_name = "SG")]
        sgs: Vec<String>,
        /// Host to place it on (default: the host serving the API).
        #[arg(long)]
        host: Option<String>,
        /// Flows it may have tracked at once (default: the serving daemon's
        /// `conntrack.endpoint_budget`).
        #[arg(long, value_name = "FLOWS")]
        conntrack_budget: Option<i64>,
        /// Write flow logs of its traffic (default: off).
        #[arg(long)]
        flow_logs: bool,
    },
    List {
        #[arg(long)]
        universe: Option<String>,
        #[arg(long)]
        host: Option<String>,
    },
    Show {
        id: String,
    },
    /// Change an endpoint: replace its security groups, turn its flow logs on or off.
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true).args(["sgs", "flow_logs"]))]
    Update {
        id: String,
        /// A security group id; repeat for several (replaces them all).
        #[arg(long = "sg", value_name = "SG")]
        sgs: Vec<String>,
        /// Turn its flow logs on or off (from the next interval its host closes).
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        flow_logs: Option<bool>,
    },
    Delete {
        id: String,
    },
}

/// `on` or `off` (also `true`/`false`).
fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

#[derive(Subcommand)]
enum HostCmd {
    List,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; prints its secret, which is not shown again.
    Create {
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The universe an editor or viewer is confined to (a viewer without one reads the
        /// whole fleet).
        #[arg(long)]
        universe: Option<String>,
        /// An RFC 3339 time (UTC) or a lifetime: 90d, 12h.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token, on every host at once.
    Delete { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Admin,
    Editor,
    Viewer,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Editor => Role::Editor,
            RoleArg::Viewer => Role::Viewer,
        }
    }
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    current_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context>,
}

/// Where one API is and how to authenticate to it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Context {
    api: Option<String>,
    token: Option<String>,
    /// A file holding the token (relative to the config file's directory; `~/` is home).
    token_file: Option<PathBuf>,
    /// The PEM file of the certificates to trust over https:// (relative like `token_file`).
    ca_file: Option<PathBuf>,
    /// The SHA-256 fingerprint of the one certificate to accept over https://.
    fingerprint: Option<String>,
}

/// Where to send requests, as whom, and what to trust over TLS.
struct Connection {
    api: String,
    token: Option<String>,
    tls: client::ClientTls,
}

/// `~/x` under `$HOME`; a relative path under `base`.
fn resolve(path: &Path, base: &Path) -> PathBuf {
    if let (Ok(rest), Some(home)) = (path.strip_prefix("~"), std::env::var_os("HOME")) {
        return PathBuf::from(home).join(rest);
    }
    base.join(path)
}

/// The default config file, if a home or config directory is known.
fn default_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("verse").join("config.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/verse/config.toml"))
}

/// The API address, token and TLS trust to use (see the module docs for the order).
fn connection(cli: &Cli) -> Result<Connection, String> {
    let (path, explicit) = match &cli.config {
        Some(p) => (Some(p.clone()), true),
        None => (default_config(), false),
    };
    let file = match &path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => toml::from_str::<ConfigFile>(&text)
                .map_err(|e| format!("config file {}: {e}", p.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                ConfigFile::default()
            }
            Err(e) => return Err(format!("config file {}: {e}", p.display())),
        },
        None => ConfigFile::default(),
    };
    let base = path.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
    let name = cli.context.clone().or(file.current_context.clone());
    let context = match &name {
        Some(n) => file.contexts.get(n).ok_or_else(|| {
            let known: Vec<&str> = file.contexts.keys().map(String::as_str).collect();
            format!(
                "no context {n:?} in {} (known: {})",
                path.as_deref().map_or("the config file".into(), |p| p.display().to_string()),
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )
        })?,
        None => &Context::default(),
    };
    let token = match (&cli.token, &context.token, &context.token_file) {
        (Some(t), _, _) => Some(t.clone()),
        (None, Some(_), Some(_)) => {
            return Err(format!(
                "context {:?}: give token or token_file, not both",
                name.unwrap_or_default()
            ))
        }
        (None, Some(t), None) => Some(t.clone()),
        (None, None, Some(f)) => {
            let f = resolve(f, base);
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("token_file {}: {e}", f.display()))?;
            Some(text.trim().to_owned())
        }
        (None, None, None) => None,
    };
    let api = match (&cli.api, &context.api) {
        (Some(a), _) | (None, Some(a)) => a.clone(),
        (None, None) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            if root && token.is_none() && Path::new(DEFAULT_SOCKET).exists() {
                format!("unix:{DEFAULT_SOCKET}")
            } else {
                DEFAULT_API.to_owned()
            }
        }
    };
    // What to trust over TLS: the command line's, if it says anything, else the context's.
    let tls = if cli.ca_file.is_some() || cli.fingerprint.is_some() {
        client::ClientTls { ca_file: cli.ca_file.clone(), fingerprint: cli.fingerprint.clone() }
    } else {
        if context.ca_file.is_some() && context.fingerprint.is_some() {
            return Err(format!(
                "context {:?}: give ca_file or fingerprint, not both",
                name.unwrap_or_default()
            ));
        }
        client::ClientTls {
            ca_file: context.ca_file.as_deref().map(|f| resolve(f, base)),
            fingerprint: context.fingerprint.clone(),
        }
    };
    Ok(Connection { api, token, tls })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let conn = match connection(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verse: {e}");
            return ExitCode::from(2);
        }
    };
    let (host_token, host_tls) = (conn.token.clone(), conn.tls.clone());
    let client = match Client::with_tls(&conn.api, &conn.tls) {
        Ok(c) => match conn.token {
            Some(t) => c.with_token(t),
            None => c,
        },
        Err(e) => {
            eprintln!("verse: {e}");
            return ExitCode::from(2);
        }
    };
    let hosts = HostClients { default: client.clone(), token: host_token, tls: host_tls };
    match run(&client, &hosts, cli.output, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                client::Error::Api { message, .. } => eprintln!("verse: {message}"),
                other => eprintln!("verse: {other}"),
            }
            ExitCode::from(1)
        }
    }
}

fn run(c: &Client, hosts: &HostClients, fmt: Format, cmd: Command) -> client::Result<()> {
    let out = Out { fmt };
    match cmd {
        Command::Universe(cmd) => match cmd {
            UniverseCmd::Create { name, mut cidrs, ipv6_cidrs } => {
                let ipv6_cidrs = (!ipv6_cidrs.is_empty()).then_some(ipv6_cidrs);
                let req = if cidrs.len() == 1 {
                    CreateUniverse { name, cidr: cidrs.pop(), cidrs: None, ipv6_cidrs }
                } else {
                    CreateUniverse { name, cidr: None, cidrs: Some(cidrs), ipv6_cidrs }
                };
                let (u, rev) = c.create_universe(&req)?;
                out.mutated(rev);
                out.universes(&[u], false);
            }
            UniverseCmd::List => out.universes(&c.list_universes()?, true),
            UniverseCmd::Show { id } => out.universes(&[c.get_universe(&id)?], false),
            UniverseCmd::Delete { id } => out.deleted(&id, c.delete_universe(&id)?),
        },
        Command::Sg(cmd) => match cmd {
            SgCmd::Create { universe, name, description } => {
                let (g, rev) = c.create_group(&CreateGroup { universe, name, description })?;
                out.mutated(rev);
                out.group(&g);
            }
            SgCmd::List { universe } => out.groups(&c.list_groups(universe.as_deref())?),
            SgCmd::Show { id } => out.group(&c.get_group(&id)?),
            SgCmd::Delete { id } => out.deleted(&id, c.delete_group(&id)?),
        },
        Command::Rule(cmd) => match cmd {
            RuleCmd::Add(a) => {
                let req = CreateRule {
                    direction: a.direction,
                    protocol: serde_json::Value::String(a.protocol),
                    from_port: a.ports.map(|p| p.0),
                    to_port: a.ports.map(|p| p.1),
                    icmp_type: a.icmp_type,
                    icmp_code: a.icmp_code,
                    cidr: a.cidr,
                    group: a.group,
                    description: a.description,
                };
                let (r, rev) = c.add_rule(&a.sg, &req)?;
                out.mutated(rev);
                out.rules(&[r], false);
            }
            RuleCmd::Delete { sg, rule } => out.deleted(&rule, c.delete_rule(&sg, &rule)?),
            RuleCmd::List { sg, stats: false } => {
                let g = c.get_group(&sg)?;
                let rules: Vec<Rule> = g.ingress.iter().chain(&g.egress).cloned().collect();
                out.rules(&rules, true);
            }
            RuleCmd::List { sg, stats: true } => out.rule_stats(&c.group_view(&sg)?),
        },
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Create {
                universe,
                netns,
                ip,
                ipv6,
                sgs,
                host,
                conntrack_budget,
                flow_logs,
            } => {
                let req = CreateEndpoint {
                    universe,
                    host,
                    netns,
                    ip,
                    security_groups: (!sgs.is_empty()).then_some(sgs),
                    conntrack_budget,
                    flow_logs: flow_logs.then_some(true),
                    ipv6,
                };
                let (e, rev) = c.create_endpoint(&req)?;
                out.mutated(rev);
                out.endpoints(&[e], false);
            }
            EndpointCmd::List { universe, host } => {
                out.endpoints(&c.list_endpoints(universe.as_deref(), host.as_deref())?, true)
            }
            EndpointCmd::Show { id } => out.endpoints(&[c.get_endpoint(&id)?], false),
            EndpointCmd::Update { id, sgs, flow_logs } => {
                let req =
                    PatchEndpoint { security_groups: (!sgs.is_empty()).then_some(sgs), flow_logs };
                let (e, rev) = c.patch_endpoint(&id, &req)?;
                out.mutated(rev);
                out.endpoints(&[e], false);
            }
            EndpointCmd::Delete { id } => out.deleted(&id, c.delete_endpoint(&id)?),
        },
        Command::Host(HostCmd::List) => out.hosts(&c.list_hosts()?),
        Command::Token(cmd) => match cmd {
            TokenCmd::Create { role, universe, expires, description } => {
                let req = CreateToken { role: role.into(), universe, expires, description };
                let (t, rev) = c.create_token(&req)?;
                out.mutated(rev);
                out.created_token(&t);
            }
            TokenCmd::List => out.tokens(&c.list_tokens()?),
            TokenCmd::Delete { id } => out.deleted(&id, c.delete_token(&id)?),
        },
        Command::Audit { universe, since, limit } => {
            out.audit(&c.audit(universe.as_deref(), since.as_deref(), limit)?)
        }
        Command::FlowLogs { endpoint, since, limit } => {
            out.flow_logs(&c.flow_logs(&endpoint, since.as_deref(), limit)?)
        }
        Command::Monitor {
            universe,
            endpoint,
            group,
            verdict,
            reason,
            rule,
            protocol,
            port,
            host,
            recent,
            no_follow,
        } => {
            let port = port.map(|p| p.to_string());
            let recent = recent.to_string();
            let follow = (!no_follow).to_string();
            let query = [
                ("universe", universe.as_deref()),
                ("endpoint", endpoint.as_deref()),
                ("group", group.as_deref()),
                ("verdict", verdict.as_deref()),
                ("reason", reason.as_deref()),
                ("rule", rule.as_deref()),
                ("protocol", protocol.as_deref()),
                ("port", port.as_deref()),
                ("host", host.as_deref()),
                ("recent", Some(recent.as_str())),
                ("follow", Some(follow.as_str())),
            ];
            if fmt != Format::Json {
                println!("{}", monitor_row(None));
            }
            c.events(&query, |item| {
                match fmt {
                    Format::Json => match serde_json::to_string(&item) {
                        Ok(line) => println!("{line}"),
                        Err(e) => eprintln!("verse: cannot print an event as JSON: {e}"),
                    },
                    _ => println!("{}", monitor_row(Some(&item))),
                }
                // A closed stdout (verse monitor | head) ends the stream.
                use std::io::Write;
                std::io::stdout().flush().is_ok()
            })?;
        }
        Command::Trace(args) => trace(c, hosts, &out, args)?,
        Command::Wait { revision, timeout } => {
            let hosts = c.wait_revision(revision, timeout)?;
            out.hosts(&hosts);
        }
    }
    Ok(())
}

/// A rule as the tables show it: ID, DIRECTION, PROTOCOL, PORTS, PEER, DESCRIPTION.
fn rule_cells(r: &Rule) -> Vec<String> {
    let v = serde_json::to_value(r).unwrap_or_default();
    let s = |k: &str| match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let ports = match (s("from_port"), s("to_port"), s("icmp_type"), s("icmp_code")) {
        (f, t, _, _) if !f.is_empty() && f == t => f,
        (f, t, _, _) if !f.is_empty() => format!("{f}-{t}"),
        (_, _, ty, code) if !ty.is_empty() => format!("type {ty} code {code}"),
        _ => "all".into(),
    };
    let peer = if s("cidr").is_empty() { s("group") } else { s("cidr") };
    vec![s("id"), s("direction"), s("protocol"), ports, peer, s("description")]
}

/// One line of `verse monitor`'s table; the header for `None`.
fn monitor_row(item: Option<&StreamItem>) -> String {
    let cells: Vec<String> = match item {
        None => ["TIME", "HOST", "VERDICT", "REASON", "ENDPOINT", "FLOW", "RULE", "MESSAGE"]
            .map(str::to_owned)
            .to_vec(),
        Some(StreamItem::Notice(n)) => {
            vec![
                n.time.to_string(),
                n.host.clone(),
                "notice".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                n.message.clone(),
            ]
        }
        Some(StreamItem::Event(e)) => {
            // An IPv6 address with a port in brackets (`[fd00::7]:443`).
            let addr = |ip: Option<std::net::IpAddr>, port: Option<u16>| match (ip, port) {
                (Some(ip), Some(p)) => std::net::SocketAddr::new(ip, p).to_string(),
                (Some(ip), None) => ip.to_string(),
                (None, _) => "?".into(),
            };
            let flow = format!(
                "{} {} -> {}",
                e.protocol.as_deref().unwrap_or("-"),
                addr(e.src, e.transport.sport),
                addr(e.dst, e.transport.dport)
            );
            let rules: Vec<&str> = e.rules.iter().map(|r| r.id.as_str()).collect();
            vec![
                e.time.to_string(),
                e.host.clone(),
                e.verdict.name().into(),
                e.reason.clone().unwrap_or_default(),
                e.endpoint.clone().unwrap_or_default(),
                flow,
                rules.join(","),
                e.message.clone(),
            ]
        }
    };
    // Fixed widths: rows are printed as they come.
    let widths = [30, 10, 9, 18, 12, 40, 26];
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        match widths.get(i) {
            Some(&w) => line.push_str(&format!("{cell:<w$} ")),
            None => line.push_str(cell),
        }
    }
    line.trim_end().to_owned()
}

/// How to reach the API of another host of the fleet: with the same token, trusting what the
/// main client trusts over https:// (a CA file serves a fleet; a pinned fingerprint matches one
/// host's certificate only).
struct HostClients {
    default: Client,
    token: Option<String>,
    tls: client::ClientTls,
}

/// `NAME=URL`.
fn parse_host_api(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=URL"))?;
    Client::new(url).map_err(|e| e.to_string())?;
    Ok((name.to_owned(), url.to_owned()))
}

/// `verse trace`: the sender's host first, then the receiver's if the packet is wrapped for it.
fn trace(c: &Client, hosts: &HostClients, out: &Out, a: TraceArgs) -> client::Result<()> {
    use verse::trace::{Action, TraceRequest};
    let req = TraceRequest {
        from: a.from.clone(),
        to: a.to.clone(),
        universe: a.universe.clone(),
        protocol: a.protocol.clone(),
        port: a.port,
        sport: a.sport,
        icmp_type: a.icmp_type,
        icmp_code: a.icmp_code,
        run: a.run,
    };
    // A host given with --host-api is asked directly; any other through --api, which relays
    // the request to the host (host=).
    let ask = |host: &str, req: &TraceRequest| -> client::Result<verse::trace::TraceAnswer> {
        match a.host_apis.iter().find(|(n, _)| n == host) {
            Some((_, url)) => {
                let cl = Client::with_tls(url, &hosts.tls)?;
                let cl = match &hosts.token {
                    Some(t) => cl.with_token(t.clone()),
                    None => cl,
                };
                cl.trace(req)
            }
            None => hosts.default.trace_on(req, Some(host)),
        }
    };
    // The sender's host: the one that places the sender endpoint. Each hop must come from the
    // host it is about: an API of another host answers for its own hooks (or refuses), and an
    // answer from the wrong host is never shown as that host's part.
    let sender_host = sender_host(c, &req)?;
    // A host the API cannot relay to (it registered no address the relay may use) is not
    // traced: the hop says why, and the API's own part is shown if it has one.
    let unavailable = |e: &client::Error| match e {
        client::Error::Api { code, message, .. } if code == "host_unavailable" => {
            Some(message.clone())
        }
        _ => None,
    };
    let (first, why_not) = match ask(&sender_host, &req) {
        Ok(answer) => (answer, None),
        Err(e) => match unavailable(&e) {
            Some(why) => {
                (hosts.default.trace(&req).map_err(|e| on_host(e, &sender_host))?, Some(why))
            }
            None => return Err(on_host(e, &sender_host)),
        },
    };
    let mut untraced = Vec::new();
    if first.host != sender_host {
        let because = why_not.map(|w| format!("{w}; ")).unwrap_or_default();
        untraced.push(Untraced {
            host: sender_host.clone(),
            hook: "from_endpoint",
            why: format!(
                "{because}the sender's hook runs on {sender_host}, and this API is {}'s: give \
                 {sender_host}'s API with --host-api {sender_host}=URL",
                first.host
            ),
        });
    }
    let mut hops = vec![first];
    if untraced.is_empty() {
        if let Some(last) = hops.last() {
            if last.verdict.action == Action::Wrap {
                let next = last.verdict.next_host.clone().unwrap_or_default();
                let mut req = req.clone();
                // The same packet: the receiver's host judges the sender's source port too.
                req.sport = last.packet.transport.sport;
                match ask(&next, &req) {
                    Ok(answer) if answer.host == next => hops.push(answer),
                    Ok(answer) => untraced.push(Untraced {
                        host: next.clone(),
                        hook: "from_underlay",
                        why: format!(
                            "the packet is wrapped for {next}, whose from_underlay judges it next, \
                             and this API is {}'s: give {next}'s API with --host-api {next}=URL",
                            answer.host
                        ),
                    }),
                    Err(e) => match unavailable(&e) {
                        Some(why) => untraced.push(Untraced {
                            host: next.clone(),
                            hook: "from_underlay",
                            why: format!(
                                "the packet is wrapped for {next}, whose from_underlay judges it \
                                 next, and this API cannot ask it ({why}): give {next}'s API with \
                                 --host-api {next}=URL"
                            ),
                        }),
                        None => return Err(on_host(e, &next)),
                    },
                }
            }
        }
    }
    out.trace(&hops, &untraced);
    match untraced.first() {
        None => Ok(()),
        Some(u) => Err(client::Error::Api {
            status: 0,
            code: "incomplete".into(),
            message: format!("the trace is incomplete: {} ({}) was not traced", u.host, u.hook),
        }),
    }
}

/// A hop of the packet's path that `verse trace` could not ask its host about.
#[derive(serde::Serialize)]
struct Untraced {
    host: String,
    hook: &'static str,
    why: String,
}

/// The host the sender of `req` is placed on.
fn sender_host(c: &Client, req: &verse::trace::TraceRequest) -> client::Result<String> {
    if req.from.starts_with("ep-") {
        return Ok(c.get_endpoint(&req.from)?.host);
    }
    let universe = match (&req.universe, req.to.starts_with("ep-")) {
        (Some(u), _) => u.clone(),
        (None, true) => c.get_endpoint(&req.to)?.universe,
        (None, false) => {
            return Err(client::Error::Api {
                status: 400,
                code: "invalid_argument".into(),
                message: "universe: needed when neither --from nor --to is an endpoint id".into(),
            })
        }
    };
    let eps = c.list_endpoints(Some(&universe), None)?;
    eps.iter().find(|e| e.ip.to_string() == req.from).map(|e| e.host.clone()).ok_or_else(|| {
        client::Error::Api {
            status: 409,
            code: "no_sender".into(),
            message: format!(
                "from: no endpoint of universe {universe} has address {}; every packet of a \
                 universe is sent by one of its endpoints",
                req.from
            ),
        }
    })
}

/// A refusal of another host's API, with the hint of how to reach it.
fn on_host(e: client::Error, host: &str) -> client::Error {
    match e {
        client::Error::Api { status, code, message } if code == "wrong_host" => {
            client::Error::Api {
                status,
                code,
                message: format!(
                    "{message} (this API is not {host}'s: give it with --host-api {host}=URL)"
                ),
            }
        }
        other => other,
    }
}

/// Prints results in the chosen format: aligned tables, or pretty JSON (a `show` of one object
/// prints the object, a list prints an array).
struct Out {
    fmt: Format,
}

impl Out {
    fn mutated(&self, revision: u64) {
        eprintln!("revision {revision}");
    }

    fn deleted(&self, id: &str, revision: u64) {
        self.mutated(revision);
        if self.fmt == Format::Table {
            println!("deleted {id}");
        }
    }

    fn json<T: Serialize + ?Sized>(&self, v: &T) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("verse: cannot print the answer as JSON: {e}"),
        }
    }

    /// A list as an array; a single object (`show`, `create`) as itself.
    fn json_items<T: Serialize>(&self, items: &[T], list: bool) {
        match items {
            [one] if !list => self.json(one),
            _ => self.json(items),
        }
    }

    fn universes(&self, us: &[Universe], list: bool) {
        if self.fmt == Format::Json {
            return self.json_items(us, list);
        }
        let rows = us
            .iter()
            .map(|u| {
                let v4 = u.cidrs.iter().map(|c| c.to_string());
                let cidrs: Vec<String> =
                    v4.chain(u.ipv6_cidrs.iter().map(|c| c.to_string())).collect();
                vec![u.id.clone(), u.name.clone(), u.vni.to_string(), cidrs.join(",")]
            })
            .collect();
        table(&["ID", "NAME", "VNI", "CIDRS"], rows);
    }

    fn groups(&self, gs: &[SecurityGroup]) {
        if self.fmt == Format::Json {
            return self.json(gs);
        }
        let rows = gs
            .iter()
            .map(|g| {
                vec![
                    g.id.clone(),
                    g.universe.clone(),
                    g.name.clone(),
                    g.ingress.len().to_string(),
                    g.egress.len().to_string(),
                    g.description.clone(),
                ]
            })
            .collect();
        table(&["ID", "UNIVERSE", "NAME", "INGRESS", "EGRESS", "DESCRIPTION"], rows);
    }

    fn group(&self, g: &SecurityGroup) {
        if self.fmt == Format::Json {
            return self.json(g);
        }
        table(
            &["ID", "UNIVERSE", "NAME", "DESCRIPTION"],
            vec![vec![g.id.clone(), g.universe.clone(), g.name.clone(), g.description.clone()]],
        );
        println!();
        let rules: Vec<Rule> = g.ingress.iter().chain(&g.egress).cloned().collect();
        self.rules(&rules, true);
    }

    fn rule_stats(&self, g: &GroupView) {
        if self.fmt == Format::Json {
            return self.json(g);
        }
        let rows = g
            .ingress
            .iter()
            .chain(&g.egress)
            .map(|r| {
                let mut cells = rule_cells(&r.rule);
                cells.insert(5, r.hits.flows.to_string());
                cells.insert(6, r.hits.packets.to_string());
                cells.insert(
                    7,
                    if r.hits.flows == 0 && r.hits.packets == 0 {
                        "never matched".into()
                    } else {
                        String::new()
                    },
                );
                cells
            })
            .collect();
        table(
            &["ID", "DIRECTION", "PROTOCOL", "PORTS", "PEER", "HITS", "PACKETS", "", "DESCRIPTION"],
            rows,
        );
        let from = &g.hits_from;
        eprintln!(
            "counted on: {}",
            if from.hosts.is_empty() { "no host".into() } else { from.hosts.join(", ") }
        );
        for m in &from.missing {
            eprintln!("not counted: {}: {}", m.host, m.error);
        }
    }

    fn rules(&self, rs: &[Rule], list: bool) {
        if self.fmt == Format::Json {
            return self.json_items(rs, list);
        }
        let rows = rs.iter().map(rule_cells).collect();
        table(&["ID", "DIRECTION", "PROTOCOL", "PORTS", "PEER", "DESCRIPTION"], rows);
    }

    fn endpoints(&self, es: &[EndpointView], list: bool) {
        if self.fmt == Format::Json {
            return self.json_items(es, list);
        }
        let rows = es
            .iter()
            .map(|e| {
                vec![
                    e.id.clone(),
                    e.universe.clone(),
                    e.host.clone(),
                    e.netns.clone(),
                    match e.ipv6 {
                        Some(six) => format!("{},{six}", e.ip),
                        None => e.ip.to_string(),
                    },
                    e.mac.clone(),
                    e.interface.clone(),
                    e.security_groups.join(","),
                    match e.conntrack {
                        Some(u) => format!("{}/{}", u.used, u.budget),
                        None => format!("-/{}", e.conntrack_budget),
                    },
                ]
            })
            .collect();
        table(
            &[
                "ID",
                "UNIVERSE",
                "HOST",
                "NETNS",
                "IP",
                "MAC",
                "INTERFACE",
                "SECURITY_GROUPS",
                "CONNTRACK",
            ],
            rows,
        );
    }

    /// The secret alone on stdout (`TOKEN=$(verse token create ...)`), the rest on stderr.
    fn created_token(&self, t: &CreatedToken) {
        if self.fmt == Format::Json {
            return self.json(t);
        }
        let scope = t.universe.as_deref().map_or("fleet-wide".to_owned(), |u| format!("of {u}"));
        let expires = t.expires.map_or("never expires".to_owned(), |e| format!("expires {e}"));
        eprintln!(
            "token {} ({} {scope}, {expires}): the secret below is shown once; store it now",
            t.id,
            t.role.name()
        );
        println!("{}", t.token);
    }

    fn tokens(&self, ts: &[TokenView]) {
        if self.fmt == Format::Json {
            return self.json(ts);
        }
        let rows = ts
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.role.name().to_owned(),
                    t.universe.clone().unwrap_or_else(|| "-".into()),
                    t.expires.map_or_else(|| "never".into(), |e| e.to_string()),
                    t.created.to_string(),
                    t.description.clone(),
                ]
            })
            .collect();
        table(&["ID", "ROLE", "UNIVERSE", "EXPIRES", "CREATED", "DESCRIPTION"], rows);
    }

    fn flow_logs(&self, rs: &[FlowLogRecord]) {
        if self.fmt == Format::Json {
            return self.json(rs);
        }
        let rows = rs
            .iter()
            .map(|r| {
                let dir = match r.flow_direction {
                    verse::model::Direction::Ingress => "ingress",
                    verse::model::Direction::Egress => "egress",
                };
                let action = match r.action {
                    verse::flowlogs::Action::Accept => "ACCEPT",
                    verse::flowlogs::Action::Reject => "REJECT",
                };
                vec![
                    r.start.to_string(),
                    r.end.to_string(),
                    dir.to_owned(),
                    action.to_owned(),
                    verse::events::protocol_name(r.protocol),
                    std::net::SocketAddr::new(r.srcaddr, r.srcport).to_string(),
                    std::net::SocketAddr::new(r.dstaddr, r.dstport).to_string(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                    format!("{:#04x}", r.tcp_flags),
                    r.rule.clone().or_else(|| r.reason.clone()).unwrap_or_else(|| "-".into()),
                    if r.sampled {
                        format!("sampled ({} unreported)", r.unreported_drops)
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        table(
            &[
                "START",
                "END",
                "DIRECTION",
                "ACTION",
                "PROTOCOL",
                "SOURCE",
                "DESTINATION",
                "PACKETS",
                "BYTES",
                "TCP-FLAGS",
                "RULE/REASON",
                "",
            ],
            rows,
        );
    }

    fn audit(&self, rs: &[AuditRecord]) {
        if self.fmt == Format::Json {
            return self.json(rs);
        }
        let rows = rs
            .iter()
            .map(|r| {
                vec![
                    r.time.to_string(),
                    r.host.clone(),
                    r.principal.clone(),
                    r.source.clone(),
                    r.action.clone(),
                    r.status.to_string(),
                    r.revision.map_or_else(|| "-".into(), |v| v.to_string()),
                    r.universe.clone().unwrap_or_else(|| "-".into()),
                    r.objects.join(","),
                    r.detail.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &[
                "TIME",
                "HOST",
                "PRINCIPAL",
                "SOURCE",
                "ACTION",
                "STATUS",
                "REVISION",
                "UNIVERSE",
                "OBJECTS",
                "DETAIL",
            ],
            rows,
        );
    }

    fn trace(&self, hops: &[verse::trace::TraceAnswer], untraced: &[Untraced]) {
        use verse::trace::{Action, Decision};
        if self.fmt == Format::Json {
            return self.json(&serde_json::json!({ "hops": hops, "untraced": untraced }));
        }
        let Some(first) = hops.first() else { return };
        let p = &first.packet;
        let name = |ep: &Option<String>| ep.as_ref().map(|e| format!(" ({e})")).unwrap_or_default();
        println!(
            "packet: {}{} -> {}{} {} in universe {}{}",
            p.src,
            name(&p.src_endpoint),
            p.dst,
            name(&p.dst_endpoint),
            p.service(),
            p.universe,
            p.transport.sport.map(|s| format!(", source port {s}")).unwrap_or_default()
        );
        for h in hops {
            let fresh = if h.maps_match { "maps match it" } else { "MAPS DIFFER FROM IT" };
            println!("{}: revision {} realized, {fresh}", h.host, h.revision);
        }
        println!();
        let rows = hops
            .iter()
            .flat_map(|h| &h.steps)
            .map(|s| {
                let result = match (&s.reason, s.outcome) {
                    (Some(r), _) => format!("drop ({r})"),
                    (None, o) => serde_json::to_value(o)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                };
                vec![s.host.clone(), s.hook.clone(), s.check.clone(), result, s.detail.clone()]
            })
            .collect();
        table(&["HOST", "HOOK", "CHECK", "RESULT", "DETAIL"], rows);
        println!();
        let word = |d: &Decision| {
            let a = match d.action {
                Action::Deliver => "deliver",
                Action::Wrap => "wrap",
                Action::Pass => "pass",
                Action::Drop => "drop",
            };
            match &d.reason {
                Some(r) => format!("{a} ({r})"),
                None => a.to_owned(),
            }
        };
        for h in hops {
            println!("{}: {} — {}", h.host, word(&h.verdict.decision()), h.verdict.summary);
            if let Some(m) = &h.model {
                println!("{}: reference model: {}", h.host, word(m));
            }
            if let Some(k) = &h.kernel {
                println!(
                    "{}: kernel ({}, BPF_PROG_TEST_RUN): {}",
                    h.host,
                    k.hook,
                    word(&k.decision())
                );
            }
        }
        for u in untraced {
            println!("{}: NOT TRACED ({}) — {}", u.host, u.hook, u.why);
        }
    }

    fn hosts(&self, hs: &[Host]) {
        if self.fmt == Format::Json {
            return self.json(hs);
        }
        let rows = hs
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    h.underlay_ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
                    h.revision.to_string(),
                    h.healthy.to_string(),
                ]
            })
            .collect();
        table(&["NAME", "UNDERLAY_IP", "REVISION", "HEALTHY"], rows);
    }
}

/// Prints rows under headers, columns padded to their widest cell; the last column is not
/// padded (no trailing spaces).
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `80` or `8000-8100`.
fn parse_ports(s: &str) -> Result<(i64, i64), String> {
    let port = |p: &str| {
        p.trim().parse::<u16>().map(i64::from).map_err(|_| format!("{p:?} is not a port (0-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => Ok((port(a)?, port(b)?)),
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

/// `30s`, `500ms`, `2m`, `1h`, or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (30s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}
