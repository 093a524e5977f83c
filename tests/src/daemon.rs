//! The daemon under test: `versed` in a host namespace ([`Versed`], [`Host`]), the `verse` CLI,
//! and the workloads a host plugs ([`Workload`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::*;

/// Where `versed` and `verse` are: `$VERSE_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else the
/// workspace's `target/debug`. `cargo xtask test` builds them first and sets `VERSE_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VERSE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("debug");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("debug")
}

pub(crate) fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build -p verse --bins` (cargo xtask test does) \
         or point VERSE_BIN_DIR at it",
        path.display()
    );
    path
}

/// Runs the `verse` CLI inside the network namespace `netns` (`ip netns exec`), with `args`;
/// the caller judges the outcome.
pub fn verse_cli(netns: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(binary("verse"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run verse {args:?} in {netns}: {e}"))
}

/// A running `versed` in a host namespace. Killed on drop; its log is printed if the test is
/// failing. The state directory (and so the bpffs under it) belongs to the caller and survives
/// [`Versed::restart`].
#[derive(Debug)]
pub struct Versed {
    netns: String,
    bin: PathBuf,
    state_dir: PathBuf,
    host: String,
    port: u16,
    log_path: PathBuf,
    config: Option<PathBuf>,
    /// Further flags after the ones [`Versed::start`] always passes (`--store`, `--underlay`).
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// A file of a token: the value of `--admin-token-file` in `args`, if there is one.
fn admin_token_flag(args: &[String]) -> Option<PathBuf> {
    let i = args.iter().position(|a| a == "--admin-token-file")?;
    args.get(i + 1).map(PathBuf::from)
}

/// A fresh token in the form `versed` accepts (`vt_<8 hex>_<64 hex>`), from the kernel's
/// random source: what an operator makes for `admin_token_file`.
pub fn random_token() -> String {
    let mut bytes = [0u8; 36];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("vt_{}_{}", &hex[..8], &hex[8..])
}

impl Versed {
    /// Starts `ip netns exec <netns> versed --state-dir <state_dir> --listen 127.0.0.1:<port>
    /// --host <host>` and waits (20 s at most) until `/healthz` answers 200.
    ///
    /// `config`, if given, is the text of a settings file (`versed --config`); the flags above
    /// override it.
    pub fn start(
        netns: &str,
        state_dir: &Path,
        host: &str,
        port: u16,
        config: Option<&str>,
    ) -> Versed {
        Versed::start_with_args(netns, state_dir, host, port, config, &[])
    }

    /// Like [`Versed::start`], with `extra_args` appended to the command line (for example
    /// `--store etcd://198.18.0.254:2379 --underlay ul0`); they survive restarts.
    pub fn start_with_args(
        netns: &str,
        state_dir: &Path,
        host: &str,
        port: u16,
        config: Option<&str>,
        extra_args: &[&str],
    ) -> Versed {
        let config = config.map(|text| {
            let path = state_dir.join("versed.toml");
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        });
        let mut v = Versed {
            netns: netns.to_owned(),
            bin: binary("versed"),
            state_dir: state_dir.to_owned(),
            host: host.to_owned(),
            port,
            log_path: state_dir.join("versed.log"),
            config,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        v.spawn();
        v
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
        self.wait_ready();
    }

    /// Starts the daemon with `once` appended to its arguments for this start only.
    fn spawn_with(&mut self, once: &[&str]) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let err = log.try_clone().expect("dup log fd");
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.bin)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--listen", &listen, "--host", &self.host]);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(&self.extra_args).args(once);
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // `ip netns exec` execs the daemon in place, so the death signal set here reaches it:
        // if the test process dies before its guards run, the daemon dies too instead of
        // holding the namespace. (It fires when the spawning thread exits, so daemons are
        // started from the test's own thread, which outlives its `Versed`.)
        die_with_parent(&mut cmd);
        let child =
            cmd.spawn().unwrap_or_else(|e| panic!("failed to start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Waits (20 s at most) until the daemon answers, panicking with its log if it exits.
    fn wait_ready(&mut self) {
        let api = self.api();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("versed exited during start-up ({status}); log:\n{}", self.log());
            }
            if let Ok(r) = api.request("GET", "/healthz", None, Duration::from_secs(2)) {
                // A daemon serving TLS answers this plain request with 400 `tls_required`,
                // which proves it is up just as well.
                if r.status == 200 || (r.status == 400 && r.body.contains("\"tls_required\"")) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "versed did not answer /healthz with 200 within 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The API of this daemon, as its admin: the token of `--admin-token-file` if it was
    /// started with one, else the one it wrote to `<state-dir>/admin.token` (none if neither
    /// exists: then requests carry no token).
    pub fn api(&self) -> Api {
        let file = admin_token_flag(&self.extra_args)
            .unwrap_or_else(|| self.state_dir.join("admin.token"));
        let token = fs::read_to_string(file).ok().map(|t| t.trim().to_owned());
        Api::new(&self.netns, self.port, token)
    }

    /// The local unix socket of this daemon (root only; no token needed).
    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("api.sock")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(no log at {}: {e})", self.log_path.display()))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the daemon was started and not stopped, crashed or reaped since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends SIGTERM and waits (10 s at most) for the daemon to exit; returns its status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("versed is not running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (we hold
        // its `Child`), so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut status = None;
        let exited = wait_until(Duration::from_secs(10), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("versed did not exit within 10 s of SIGTERM; log:\n{}", self.log());
        }
        status.expect("exited")
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("versed is not running");
        child.kill().unwrap_or_else(|e| panic!("kill versed: {e}"));
        let _ = child.wait();
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same state directory and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the daemon again after [`Versed::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "versed is already running");
        self.spawn();
    }

    /// Like [`Versed::start_again`], with `args` added for this start only.
    pub fn start_again_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "versed is already running");
        self.spawn_with(args);
        self.wait_ready();
    }

    /// Starts the daemon again after [`Versed::stop`], expecting it to refuse to start: waits
    /// (20 s at most) for it to exit, and returns its exit status and what it logged on this
    /// start. Panics if it serves its API instead.
    pub fn start_again_expecting_exit(&mut self) -> (std::process::ExitStatus, String) {
        assert!(self.child.is_none(), "versed is already running");
        let logged = self.log().len();
        self.spawn_with(&[]);
        let mut status = None;
        let exited = wait_until(Duration::from_secs(20), || {
            status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        });
        if !exited {
            panic!("versed did not exit within 20 s; log:\n{}", self.log());
        }
        self.child = None;
        let log = self.log();
        (status.expect("exited"), log.get(logged..).unwrap_or_default().to_owned())
    }
}

impl Drop for Versed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("VERSE_TEST_SHOW_LOG").is_some() {
            eprintln!(
                "---- versed log ({}) ----\n{}---- end of versed log ----",
                self.host,
                self.log()
            );
        }
    }
}

/// One Verse host: a network namespace running `versed` with its own state directory and bpffs.
///
/// Field order is drop order: the daemon dies first, then the bpffs is unmounted, the namespace
/// deleted and the state directory removed.
pub struct Host {
    pub versed: Versed,
    pub api: Api,
    bpffs: Bpffs,
    netns: Netns,
    state: TempDir,
    name: String,
}

impl Host {
    /// A fresh host namespace with a daemon, ready to answer its API.
    pub fn start() -> Host {
        Host::start_with_config(None)
    }

    /// Like [`Host::start`], with a settings file for the daemon (TOML text, see `versed
    /// --print-default-config`).
    pub fn start_with_config(config: Option<&str>) -> Host {
        let netns = Netns::new("h");
        let name = format!("{}-host", netns.name());
        Host::start_in(netns, &name, config, &[])
    }

    /// A daemon named `name` in a namespace the caller has prepared (for example with an
    /// underlay interface already in it), started with `extra_args` (see
    /// [`Versed::start_with_args`]). The host owns the namespace from now on.
    pub fn start_in(netns: Netns, name: &str, config: Option<&str>, extra_args: &[&str]) -> Host {
        let state = TempDir::new("s");
        // `bpf_dir` defaults to `<state_dir>/bpf` in the daemon's configuration.
        let bpffs = Bpffs::mount(&state.path().join("bpf"));
        let versed = Versed::start_with_args(
            netns.name(),
            state.path(),
            name,
            unique_port(),
            config,
            extra_args,
        );
        let api = versed.api();
        Host { versed, api, bpffs, netns, state, name: name.to_owned() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn netns(&self) -> &Netns {
        &self.netns
    }
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
    pub fn bpf_dir(&self) -> &Path {
        self.bpffs.path()
    }

    /// Makes a workload namespace and plugs it as an endpoint (`POST /v1/endpoints`, which must
    /// answer 201). `groups` empty means "none given", so the endpoint gets `default` (S3).
    pub fn endpoint(&self, universe: &str, ip: &str, groups: &[&str]) -> Workload {
        self.api.create_endpoint(None, universe, ip, groups)
    }

    /// Like [`Host::endpoint`], dual stack: `ip` and its IPv6 counterpart ([`Family::text`]),
    /// in a universe made by [`Api::create_dual_universe`].
    pub fn dual_endpoint(&self, universe: &str, ip: &str, groups: &[&str]) -> Workload {
        self.api.create_dual_endpoint(None, universe, ip, groups)
    }

    /// This host's drop counters, every reason present: `verse_drops_total` of its `/metrics`
    /// while its daemon runs, else the pinned drop map the daemon's `/metrics` reads (the
    /// dataplane keeps counting while no daemon runs, and the counts outlive it).
    pub fn drop_counts(&self) -> BTreeMap<String, u64> {
        if self.versed.is_running() {
            drop_counts(&self.api)
        } else {
            pinned_drop_counts(self.bpf_dir())
        }
    }

    /// This host's drop counter for `reason` (see [`Host::drop_counts`]); panics on a reason
    /// the dataplane does not have, so a misspelt reason cannot make a test pass.
    pub fn drops(&self, reason: &str) -> u64 {
        counter(&self.drop_counts(), reason)
    }
}

/// A workload namespace plugged into Verse as one endpoint. Dropping it deletes the namespace
/// (and with it the veth pair).
#[derive(Debug)]
pub struct Workload {
    pub id: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if it has one.
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub mac: String,
    pub interface: String,
    /// The endpoint as `POST /v1/endpoints` returned it.
    pub json: Value,
    pub ns: Netns,
}

impl Workload {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}
