//! `versed`, the Verse daemon: serves the REST API and keeps this host's endpoint interfaces and
//! eBPF dataplane in line with the desired state.
//!
//! It serves the API on `listen` (TCP; every request needs a token) and on the local unix
//! socket `<state-dir>/api.sock` (root only; no token needed). At start it makes sure the store
//! has an admin token (see `auth::bootstrap_admin`).
//!
//! It runs inside the network namespace of the host it serves. Stopping it (SIGTERM, SIGINT)
//! stops the API and the reconciler only: pinned maps, pinned TCX links and endpoint interfaces
//! stay in place, so the dataplane keeps enforcing the last realized state (and established
//! flows keep flowing) until the next `versed` picks up from what is pinned.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use verse::api::{self, AppState, Stats, StatsFn};
use verse::auth::{self, Bootstrap};
use verse::config::{Args, Config};
use verse::dataplane::Dataplane;
use verse::dataplane::TraceRunner;
use verse::events::{self, Hub, Sources};
use verse::flowlogs::{self, FlowLogs};
use verse::reconcile::{CtSettings, GcStats, RealizedState, Reconciler, SharedDataplane, Underlay};
use verse::sim::{self, SimFleet, SimOptions};
use verse::store::{Realized, Store};
use verse::trace::{self, KernelRun, RunInput};
use verse::verdict::Timeouts;
use verse::{limits, server};

/// How long a stopping versed lets the reconciler finish the round it is in.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", Config::default_toml());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes, joined by ": ". The errors of this crate already end their message with
/// their source's, so a cause the message so far already ends with is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if text.ends_with(&msg) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&msg);
    }
    text
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args).context("loading the configuration")?;
    if let Some(hosts) = args.simulate_hosts {
        return simulate(&config, &args, hosts).await;
    }
    let host = config.host_name().context("naming this host")?;
    let bpf_dir = config.bpf_dir();

    root_only_dir(&config.state_dir)?;
    let underlay = match &config.underlay {
        Some(iface) => Some(Underlay::lookup(iface).await.context("reading the underlay")?),
        None => None,
    };
    let underlay_ip = underlay.as_ref().map(|u| u.ip);

    let store = Store::open(&config)
        .await
        .with_context(|| format!("opening the store {}", config.store))?;

    warn_if_bpffs_is_ours(&bpf_dir);
    let mut dp_config = config.dataplane_config().context("building the dataplane settings")?;
    if let Some(u) = &underlay {
        u.configure(&mut dp_config);
    }
    let mut dataplane = Dataplane::load(&bpf_dir, &dp_config)
        .with_context(|| format!("loading the dataplane (bpffs {})", bpf_dir.display()))?;
    if let Some(u) = &underlay {
        // Before this host is announced: other hosts send here once they learn its address.
        dataplane.attach_underlay(&u.iface).context("attaching to the underlay")?;
    }
    let event_ring = dataplane.take_events();
    let dataplane: SharedDataplane = Arc::new(Mutex::new(dataplane));
    // With an underlay, every packet an endpoint sends must fit it once wrapped.
    let endpoint_mtu = underlay.as_ref().map_or(config.mtu, Underlay::endpoint_mtu);
    let realized_state: RealizedState = Arc::default();
    let gc_stats = Arc::new(Mutex::new(GcStats::default()));
    let ct = CtSettings {
        timeouts: Timeouts::from_config(&dp_config),
        gc_interval: config.gc_interval(),
    };
    let o = &config.observability;
    let flow_logs =
        Arc::new(FlowLogs::new(&host, &config.state_dir.join("flow-logs"), o.flow_log_keep));
    let reconciler =
        Reconciler::new(dataplane.clone(), host.clone(), endpoint_mtu, ct, gc_stats.clone())
            .context("reading what the pinned maps hold")?
            .with_realized_state(realized_state.clone())
            .with_flow_logs(flow_logs.clone());
    let map_entries = reconciler.map_entries();

    refuse_a_lost_state(&config, &store, &reconciler, args.empty_state)?;
    let api_url = config.api_url(underlay_ip);
    // The certificate the API serves, registered with its address: other hosts send a caller's
    // token there only over TLS with exactly this certificate (README, "Why was my packet
    // dropped?").
    let tls = server::tls_from_config(&config, &host)?;
    let api_fingerprint = tls.as_ref().filter(|_| config.api.serve).map(|t| t.fingerprint.clone());
    store
        .register_host_with_api(&host, underlay_ip, api_url.clone(), api_fingerprint.clone())
        .await
        .context("registering this host")?;
    // A host that serves no API takes no edit, so it makes no admin token either (and its etcd
    // role need not write `tokens/`): the hosts that serve the API do.
    let bootstrap = match config.api.serve {
        true => {
            auth::bootstrap_admin(&store, &config.state_dir, config.admin_token_file.as_deref())
                .await
                .context("setting up the first admin token")?
        }
        false => Bootstrap::Present,
    };
    match bootstrap {
        Bootstrap::Present => {}
        Bootstrap::Registered { id } => {
            tracing::info!(token = %id, "registered the admin token of admin_token_file")
        }
        Bootstrap::Ignored { id } => tracing::warn!(
            token = %id,
            "the store already has admin tokens: the token of admin_token_file was not registered"
        ),
        Bootstrap::Generated { id, file } => tracing::info!(
            token = %id,
            file = %file.display(),
            "no admin token in the store: made one (read it from the file, as root)"
        ),
    }

    let (realized_tx, realized_rx) = watch::channel(Realized::default());
    let states = store.subscribe();
    // The store tells the fleet what this host has realized (S13); never blocks. The task ends
    // when the reconciler drops `realized_tx`.
    let reporting = {
        let store = store.clone();
        let host = host.clone();
        let mut realized = realized_rx.clone();
        tokio::spawn(async move {
            loop {
                let report = realized.borrow_and_update().clone();
                store.report(&host, report);
                if realized.changed().await.is_err() {
                    break;
                }
            }
        })
    };

    // Verdict events: drained from the ring buffer, rendered, kept and streamed by the hub; the
    // counts of what the dataplane could not report are read once a second.
    let hub = Arc::new(Hub::new(&host, config.observability.event_history as usize));
    let sources = Sources {
        states: store.subscribe(),
        local: reconciler.local_endpoints(),
        flow_logs: Some(flow_logs.clone()),
        publish: config.observability.events,
    };
    // With `events = false` the ring is still drained for the REJECT records of flow logs,
    // and the kernel writes events only while an endpoint here has flow logs on.
    let draining = event_ring.map(|ring| tokio::spawn(events::drain(ring, hub.clone(), sources)));
    let drop_events_for_logs = (!config.observability.events).then(|| {
        tokio::spawn(flowlogs::keep_drop_events(dataplane.clone(), store.subscribe(), host.clone()))
    });
    let counting = {
        let hub = hub.clone();
        let dataplane = dataplane.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                // Never waits for the reconciler: a busy lock skips a tick.
                let counts = match dataplane.try_lock() {
                    Ok(dp) => dp.event_counts(),
                    Err(_) => continue,
                };
                match counts {
                    Ok(c) => hub.update_counts(c),
                    Err(e) => tracing::warn!(error = %e, "reading the event counters"),
                }
            }
        })
    };

    // Flow logs: an interval task reads conntrack and writes the records (README, "Why was my
    // packet dropped?").
    let logging = tokio::spawn(flowlogs::run(
        flow_logs.clone(),
        dataplane.clone(),
        store.subscribe(),
        flowlogs::Settings {
            interval: Duration::from_secs(config.observability.flow_log_interval),
            rotate_bytes: config.observability.flow_log_rotate_bytes,
        },
        |dp: &SharedDataplane| {
            let counts = dp.lock().unwrap_or_else(PoisonError::into_inner).event_counts();
            counts.map_or(0, |c| {
                let d = usize::from(dataplane_common::event_kind::DROP);
                c.suppressed[d].saturating_add(c.lost[d])
            })
        },
    ));

    let tracer = Arc::new(Tracer {
        dataplane: dataplane.clone(),
        realized: realized_state,
        config: dp_config,
        underlay_ip,
        runner: Mutex::new(None),
    });
    let stats_logs = flow_logs.clone();
    let stats: StatsFn = Arc::new(move || {
        let dp = dataplane.lock().unwrap_or_else(PoisonError::into_inner);
        let gc = gc_stats.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Ok(Stats {
            drops: dp.drop_counts()?,
            rule_hits: dp.rule_hits()?,
            rule_packets: stats_logs.rule_packets(),
            ct_owners: dp.ct_owners(),
            gc,
            map_entries: map_entries.load(std::sync::atomic::Ordering::Relaxed),
            resident_bytes: sim::rss_bytes(),
        })
    });
    let limits = limits::Limits::new(config.limit_settings());
    let app_state = AppState::new(store, host.clone(), underlay_ip, realized_rx, stats)
        .with_limits(limits)
        .with_api_url(api_url.clone())
        .with_api_fingerprint(api_fingerprint)
        .with_events(hub)
        .with_flow_logs(flow_logs)
        .with_conntrack_budget(config.conntrack.endpoint_budget)
        .with_trace(tracer);
    // A host that serves no API holds only its own part of the desired state (its store has a
    // scope, `Config::etcd_options`): it answers /healthz and /metrics, nothing else.
    let app = match config.api.serve {
        true => api::router(app_state),
        false => api::router_without_api(app_state),
    };

    let mut server_settings = config.server_settings();
    match server::raise_fd_limit() {
        Ok(fds) => {
            let cap = server::effective_cap(server_settings.max_connections, fds);
            if cap < server_settings.max_connections {
                tracing::warn!(
                    max_connections = server_settings.max_connections,
                    open_file_limit = fds,
                    cap,
                    "api.max_connections is above half the open-file limit; capping it"
                );
            }
            server_settings.max_connections = cap;
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let socket_path = config.api_socket();
    let local = auth::bind_local_socket(&socket_path).context("serving the local API socket")?;
    tracing::info!(
        host = %host,
        listen = %config.listen,
        socket = %socket_path.display(),
        state_dir = %config.state_dir.display(),
        bpf_dir = %bpf_dir.display(),
        store = %config.store,
        underlay = ?underlay,
        endpoint_mtu,
        tls = tls.is_some(),
        max_connections = server_settings.max_connections,
        api_url = ?api_url,
        serves_api = config.api.serve,
        "versed started"
    );
    let (stop_tx, stop_rx) = watch::channel(());
    let reconciling = tokio::spawn(reconciler.run(states, realized_tx, stop_rx));
    // One signal stops both listeners.
    let (stop_api_tx, stop_api) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_api_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Both listeners with the same connection limits, each its own table of connections.
    let tcp = server::serve(listener, app.clone(), tls, server_settings, stopped(stop_api.clone()));
    let unix = server::serve_local(local, app, server_settings, stopped(stop_api));
    tokio::join!(tcp, unix);
    let _ = std::fs::remove_file(&socket_path);

    // The API is gone; the reconciler stops after the round it is in. Cutting a long round
    // short is safe too: every step is idempotent and the next start converges from what the
    // kernel holds.
    let _ = stop_tx.send(());
    let mut reconciling = reconciling;
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut reconciling).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "the reconciler did not finish its round in time; stopping it");
        reconciling.abort();
    }
    let _ = reporting.await;
    counting.abort();
    logging.abort();
    if let Some(d) = draining {
        d.abort();
    }
    if let Some(t) = drop_events_for_logs {
        t.abort();
    }
    tracing::info!(
        "versed stopped; pinned maps, links and interfaces stay in place and keep enforcing"
    );
    Ok(())
}

/// `GET /v1/trace`'s view of this host: the realized state, the kernel maps, and a second load
/// of the programs for runs (made at the first run, kept).
struct Tracer {
    dataplane: SharedDataplane,
    realized: RealizedState,
    config: dataplane_common::Config,
    underlay_ip: Option<std::net::Ipv4Addr>,
    runner: Mutex<Option<TraceRunner>>,
}

impl trace::Source for Tracer {
    fn realized(&self) -> anyhow::Result<trace::Realized> {
        let state = self.realized.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let dp = self.dataplane.lock().unwrap_or_else(PoisonError::into_inner);
        let maps = dp.read().context("reading the dataplane maps")?;
        let conntrack = dp.conntrack().context("reading the conntrack table")?;
        let conntrack6 = dp.conntrack6().context("reading the IPv6 conntrack table")?;
        drop(dp);
        Ok(trace::Realized {
            state,
            maps,
            conntrack,
            conntrack6,
            now_ns: coarse_now_ns(),
            config: self.config,
            underlay_ip: self.underlay_ip,
        })
    }

    fn run(&self, input: &RunInput) -> anyhow::Result<KernelRun> {
        let mut runner = self.runner.lock().unwrap_or_else(PoisonError::into_inner);
        if runner.is_none() {
            let dp = self.dataplane.lock().unwrap_or_else(PoisonError::into_inner);
            *runner = Some(dp.trace_runner().context("loading the programs for trace runs")?);
        }
        let Some(runner) = runner.as_mut() else {
            anyhow::bail!("no trace runner");
        };
        let out = runner
            .run(input.hook, &input.frame, input.ifindex, &input.conntrack, &input.conntrack6)
            .with_context(|| format!("running {}", input.hook))?;
        Ok(trace::kernel_run(
            input.hook,
            &input.frame,
            out.output.return_code,
            &out.output.packet,
            out.dropped,
        ))
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of conntrack entries
/// (`bpf_ktime_get_coarse_ns`).
fn coarse_now_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid value of this plain C struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Creates the state directory, or tightens it, to mode 0700: it holds the first admin token,
/// the local socket, the desired state (with the hashes of the tokens) and the audit trail.
fn root_only_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let ctx = || format!("creating the state directory {}", dir.display());
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(ctx)?;
    let mode = std::fs::metadata(dir).with_context(ctx)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making the state directory {} root's only", dir.display()))?;
        tracing::info!(
            state_dir = %dir.display(),
            was = format!("{mode:o}"),
            "made the state directory root's only (0700)"
        );
    }
    Ok(())
}

/// Refuses to start from an empty desired state (no edit was ever stored: the state file is
/// missing, or etcd holds nothing under the prefix) while this host still has a previous run's
/// state (the embedded store's last-good copy, or anything in the pinned maps): the first
/// round would remove every endpoint and rule the dataplane enforces. `--empty-state` accepts
/// it.
fn refuse_a_lost_state(
    config: &Config,
    store: &Store,
    reconciler: &Reconciler,
    empty_state: bool,
) -> anyhow::Result<()> {
    if store.snapshot().revision != 0 {
        return Ok(());
    }
    let copy = config.state_dir.join(verse::store::LAST_GOOD_FILE);
    let state_file = config.state_dir.join(verse::store::STATE_FILE);
    let embedded = matches!(store, Store::Embedded(_));
    let has_copy = embedded && copy.exists();
    let inherited = reconciler.inherited();
    if !has_copy && inherited == 0 {
        return Ok(());
    }
    let what = match (has_copy, inherited) {
        (true, 0) => format!("its last good copy {} is there", copy.display()),
        (true, n) => format!(
            "its last good copy {} is there, and the pinned dataplane holds {n} entries of a \
             previous run",
            copy.display()
        ),
        (false, n) => format!("the pinned dataplane holds {n} entries of a previous run"),
    };
    if empty_state {
        tracing::warn!(
            "starting from an empty desired state as asked (--empty-state) although {what}: \
            everything the dataplane enforced is removed"
        );
        return Ok(());
    }
    let recover = if embedded {
        format!(
            "restore it with `cp {} {}` and start versed again",
            copy.display(),
            state_file.display()
        )
    } else {
        format!(
            "check the store ({}) and etcd_prefix ({}): they name a fleet with no state",
            config.store, config.etcd_prefix
        )
    };
    anyhow::bail!(
        "refusing to start: the desired state is empty ({}), but {what}; starting would remove \
         every endpoint and rule this host enforces. To recover, {recover}. To start afresh and \
         remove them, start versed once with --empty-state",
        if embedded {
            format!("{} is missing", state_file.display())
        } else {
            "etcd holds none".to_owned()
        }
    )
}

/// `versed --simulate-hosts N`: N simulated hosts (see `verse::sim`) until SIGTERM or SIGINT,
/// their report served at `GET /v1/simulation` on `listen`.
async fn simulate(config: &Config, args: &Args, hosts: usize) -> anyhow::Result<()> {
    let etcd = config
        .etcd_options()?
        .context("--simulate-hosts needs an etcd store (--store etcd://HOST:PORT)")?;
    let fleet = SimFleet::start(SimOptions {
        hosts,
        prefix: args.simulate_prefix.clone(),
        etcd,
        connections: args.simulate_connections,
        start_concurrency: 16,
    })
    .await
    .context("starting the simulated hosts")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(hosts, prefix = %args.simulate_prefix, listen = %config.listen,
        store = %config.store, "simulating hosts");
    let fleet = Arc::new(fleet);
    axum::serve(listener, sim::router(fleet.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the simulation's report")?;
    drop(fleet);
    tracing::info!("simulation stopped");
    Ok(())
}

/// Warns when no bpffs is mounted at `dir` yet. The dataplane then mounts one itself, in this
/// process's mount namespace; under `ip netns exec` that namespace is private to versed and dies
/// with it, taking the pinned maps and links along: the dataplane would stop enforcing (and
/// forget its connections) whenever versed is down. Mounting the bpffs beforehand, from the
/// host's mount namespace, keeps it alive across restarts.
fn warn_if_bpffs_is_ours(dir: &std::path::Path) {
    if matches!(verse::dataplane::is_bpffs(dir), Ok(true)) {
        return;
    }
    tracing::warn!(
        bpf_dir = %dir.display(),
        "no bpffs mounted at the bpf directory: versed mounts one in its own mount namespace, \
         which under `ip netns exec` vanishes when versed exits, and the pinned maps and links \
         with it; to keep enforcing while versed is down, run `mount -t bpf bpf {}` from the \
         host's mount namespace before starting versed",
        dir.display()
    );
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let int = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT; stop with SIGTERM");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: stopping"),
        _ = int => tracing::info!("SIGINT: stopping"),
    }
}
