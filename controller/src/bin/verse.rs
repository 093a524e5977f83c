//! `verse`: the command-line client of the Verse API. Same nouns as the API: universe, sg,
//! rule, endpoint, host.
//!
//! Exit status: 0 on success, 1 when the server refused the request or could not be reached
//! (its message on stderr), 2 on a usage error.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use verse::api::{EndpointView, Host};
use verse::client::{self, Client, DEFAULT_API};
use verse::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, PatchEndpoint, Rule, SecurityGroup,
    Universe,
};

#[derive(Parser)]
#[command(name = "verse", version, about = "Command-line client of the Verse API")]
struct Cli {
    /// API address of a versed.
    #[arg(long, global = true, env = "VERSE_API", default_value = DEFAULT_API, value_name = "URL")]
    api: String,
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

#[derive(Subcommand)]
enum UniverseCmd {
    /// Create a universe (and its default group).
    Create {
        name: String,
        /// An IPv4 CIDR of the universe; repeat for several.
        #[arg(long = "cidr", required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
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
        /// A security group id; repeat for several (default: the universe's default group).
        #[arg(long = "sg", value_name = "SG")]
        sgs: Vec<String>,
        /// Host to place it on (default: the host serving the API).
        #[arg(long)]
        host: Option<String>,
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
    /// Replace the security groups of an endpoint.
    Update {
        id: String,
        #[arg(long = "sg", value_name = "SG", required = true)]
        sgs: Vec<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match Client::new(&cli.api) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verse: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&client, cli.output, cli.command) {
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

fn run(c: &Client, fmt: Format, cmd: Command) -> client::Result<()> {
    let out = Out { fmt };
    match cmd {
        Command::Universe(cmd) => match cmd {
            UniverseCmd::Create { name, mut cidrs } => {
                let req = if cidrs.len() == 1 {
                    CreateUniverse { name, cidr: cidrs.pop(), cidrs: None }
                } else {
                    CreateUniverse { name, cidr: None, cidrs: Some(cidrs) }
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
        },
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Create { universe, netns, ip, sgs, host } => {
                let req = CreateEndpoint {
                    universe,
                    host,
                    netns,
                    ip,
                    security_groups: (!sgs.is_empty()).then_some(sgs),
                };
                let (e, rev) = c.create_endpoint(&req)?;
                out.mutated(rev);
                out.endpoints(&[e], false);
            }
            EndpointCmd::List { universe, host } => {
                out.endpoints(&c.list_endpoints(universe.as_deref(), host.as_deref())?, true)
            }
            EndpointCmd::Show { id } => out.endpoints(&[c.get_endpoint(&id)?], false),
            EndpointCmd::Update { id, sgs } => {
                let (e, rev) = c.patch_endpoint(&id, &PatchEndpoint { security_groups: sgs })?;
                out.mutated(rev);
                out.endpoints(&[e], false);
            }
            EndpointCmd::Delete { id } => out.deleted(&id, c.delete_endpoint(&id)?),
        },
        Command::Host(HostCmd::List) => out.hosts(&c.list_hosts()?),
        Command::Wait { revision, timeout } => {
            let hosts = c.wait_revision(revision, timeout)?;
            out.hosts(&hosts);
        }
    }
    Ok(())
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
                let cidrs: Vec<String> = u.cidrs.iter().map(|c| c.to_string()).collect();
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

    fn rules(&self, rs: &[Rule], list: bool) {
        if self.fmt == Format::Json {
            return self.json_items(rs, list);
        }
        let rows = rs
            .iter()
            .map(|r| {
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
            })
            .collect();
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
                    e.ip.to_string(),
                    e.mac.clone(),
                    e.interface.clone(),
                    e.security_groups.join(","),
                ]
            })
            .collect();
        table(
            &["ID", "UNIVERSE", "HOST", "NETNS", "IP", "MAC", "INTERFACE", "SECURITY_GROUPS"],
            rows,
        );
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
