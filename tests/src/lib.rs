//! Harness for Verse's network-namespace integration tests.
//!
//! Contract: every resource a test makes — network namespaces, the bpffs mount of a daemon, its
//! state directory, the daemon itself, the threads of traffic servers — is owned by a guard whose
//! `Drop` removes it, also while the test unwinds from a failed assertion. Names carry a per-run
//! prefix (`vt` + the process id + a counter) so parallel tests and parallel runs never collide.
//! Waiting is always a bounded poll ([`wait_until`]), never a bare sleep used as synchronisation.
//!
//! A test builds a [`Host`] (a network namespace running `versed`, reached through [`Api`]),
//! configures Verse only through the REST API (as the host's admin: [`Api`] sends the token
//! `versed` wrote to its state directory at first start, or the one the harness gave it), plugs [`Workload`]s (one namespace per endpoint)
//! and then asserts what a user sees: a packet that arrives or not ([`tcp_connect`], [`ping`],
//! [`udp_roundtrip`], [`TcpConn`]), an API status and error code ([`Response`]), a drop counter
//! that moved ([`drops`]).
//!
//! Sockets are opened inside a namespace by a short-lived thread that joins it with `setns(2)`
//! ([`Netns::enter`]); a socket stays in the namespace it was created in, so the rest of the test
//! uses it from any thread.
//!
//! Several hosts sharing one etcd over an IP underlay: see [`fleet`]. Packets built from literal
//! bytes: see [`frames`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane_common::DropReason;
pub use serde_json::{json, Value};

pub mod fleet;
pub mod frames;
pub use fleet::{
    bulk_send, underlay_ip, vxlan_seen, BulkSink, Etcd, Fleet, Simulation, VxlanGbp, VxlanSeen,
};

// ---------------------------------------------------------------------------------------------
// Names and polling
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// The prefix of every name this process makes: `vt` + the process id in base 36.
pub fn run_prefix() -> String {
    format!("vt{}", base36(u64::from(std::process::id())))
}

/// A name unique to this run and this call: `vt<pid36>-<n36><tag>`. Interface and namespace
/// names must fit `IFNAMSIZ` (15 bytes), so tags are short. The first call also sweeps what
/// runs that died without cleaning up left behind (see [`sweep_stale`]).
pub fn unique_name(tag: &str) -> String {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}-{}{}", run_prefix(), base36(u64::from(n)), tag);
    assert!(name.len() <= 15, "name {name} is longer than 15 bytes: shorten the tag {tag:?}");
    name
}

/// The process id encoded in a name made by [`unique_name`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("vt")?.split_once('-')?.0;
    u32::from_str_radix(digits, 36).ok()
}

/// Removes the namespaces, bpffs mounts and state directories of test runs whose process is
/// gone (killed before its guards could run), so a reused pid cannot collide with them.
/// Daemons of such runs died with them (`PR_SET_PDEATHSIG`, see [`Versed`]).
pub fn sweep_stale() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = run_quiet("ip", &["netns", "del", &name]);
            }
        }
    }
    let tmp = std::env::temp_dir();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_prefix("verse-tests-") else {
                continue;
            };
            if !dead(name) {
                continue;
            }
            let dir = e.path();
            let prefix = dir.to_string_lossy().into_owned();
            for mnt in mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
            {
                let _ = run_quiet("umount", &[mnt]);
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion; panics with its command line and output if it fails.
pub fn run_ok(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to start {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_quiet(cmd: &str, args: &[&str]) -> Option<Output> {
    Command::new(cmd).args(args).stdin(Stdio::null()).output().ok()
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread that has joined the network namespace `/run/netns/<name>`.
///
/// Only that thread changes namespace; sockets it creates stay in the namespace wherever they
/// are used afterwards. A panic inside `f` is propagated to the caller.
pub fn enter_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `file` is an open namespace file that outlives the call; setns(2) with
            // CLONE_NEWNET only changes the network namespace of this thread, which ends when
            // the closure returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}, CLONE_NEWNET): {}", io::Error::last_os_error());
            f()
        });
        handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// An `ip netns` namespace, deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Makes the child started by `cmd` receive SIGKILL when the thread that spawns it exits, so a
/// daemon never outlives a test process killed before its guards could run.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent, as a pre_exec hook requires.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether the test runs as root. Tests that need bpf, netns or mount assert it first, so
/// without root they fail with a message saying so (they never pass by skipping).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique_name(tag);
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run_ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// The ifindex of `iface` in this namespace (read through iproute2: /sys shows the
    /// namespace of whoever mounted it).
    pub fn ifindex(&self, iface: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", iface]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex for {iface} in {}: {text}", self.name))
    }

    /// `ip netns exec <ns> cmd args...`; the caller judges the outcome.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to start ip netns exec {} {cmd}: {e}", self.name))
    }

    /// Runs `f` inside this namespace (see [`enter_netns`]).
    pub fn enter<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        enter_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(out) = run_quiet("ip", &["netns", "del", &self.name]) {
            if !out.status.success() {
                eprintln!(
                    "cleanup: ip netns del {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// A directory under the system temp dir, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("verse-tests-{}", unique_name(tag)));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: rm -r {}: {e}", self.path.display());
        }
    }
}

/// A bpffs mounted in the root mount namespace, unmounted (and its mountpoint removed) on drop.
///
/// It must be mounted here, not by the daemon: `ip netns exec` gives the daemon a private mount
/// namespace, and a bpffs mounted inside it would vanish, with the pinned maps and links, when
/// the daemon exits. Mounted out here it survives a daemon restart, as a host's `/sys/fs/bpf`
/// does.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn mount(path: &Path) -> Bpffs {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let p = path.to_str().expect("utf-8 path");
        run_ok("mount", &["-t", "bpf", "bpf", p]);
        Bpffs { path: path.to_owned() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy().into_owned();
        match run_quiet("umount", &[&p]) {
            Some(out) if out.status.success() => {
                let _ = fs::remove_dir(&self.path);
            }
            Some(out) => eprintln!("cleanup: umount {p}: {}", String::from_utf8_lossy(&out.stderr)),
            None => eprintln!("cleanup: umount {p}: could not run umount"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

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
        "{} not found: build it with `cargo build -p controller --bins` (cargo xtask test does) \
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
        Api { netns: self.netns.clone(), port: self.port, token }
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

/// A TCP port for a listener of this test process (distinct within the run).
///
/// Below Linux's ephemeral range (32768-60999 by default): a client polling a port that nobody
/// listens on yet can be given that very port as its own source and connect to itself (TCP
/// simultaneous open), and the daemon that then binds it fails with "Address already in use".
pub fn unique_port() -> u16 {
    // Every daemon listens on the loopback of its own namespace, so ports cannot collide across
    // tests; keeping them distinct anyway makes logs unambiguous.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    10000 + ((std::process::id() % 500) * 40 + n % 40) as u16
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

// ---------------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------------

/// An HTTP answer of the API.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The body as JSON; panics (naming the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("response (status {}) is not JSON: {e}: {}", self.status, self.body)
        })
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
    /// The `Verse-Revision` header, parsed.
    pub fn revision(&self) -> Option<u64> {
        self.header("verse-revision").and_then(|v| v.trim().parse().ok())
    }
    /// `error.code` of an error answer.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {}", self.body))
            .to_owned()
    }
    /// `error.message` of an error answer.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.message in {}", self.body))
            .to_owned()
    }
}

/// A client of one daemon's API, speaking HTTP/1.1 from inside the daemon's namespace (the API
/// listens on that namespace's loopback), with a bearer token (the admin's unless
/// [`Api::with_token`] says otherwise).
#[derive(Clone, Debug)]
pub struct Api {
    netns: String,
    port: u16,
    token: Option<String>,
}

impl Api {
    /// The base URL as seen from inside the host namespace (for the CLI, run with `ip netns
    /// exec`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The token this client sends (`VERSE_TOKEN` for the CLI).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The same API as another principal (`None`: no credentials at all).
    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api { token: token.map(str::to_owned), ..self.clone() }
    }

    /// One request; `timeout` bounds connecting and each read. API edits wait (10 s at most)
    /// for the dataplane, so callers allow more than that.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> io::Result<Response> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        http_request_as(&self.netns, addr, method, path, body, self.token.as_deref(), timeout)
    }

    /// One request as a well-behaved client makes it: a `429` (the daemon's rate limit, which
    /// tests that create thousands of objects can reach) is sent again after its
    /// `Retry-After`. Use [`Api::request`] to see every answer as it is.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self
                .request(method, path, body, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            if r.status != 429 || Instant::now() >= deadline {
                return r;
            }
            let wait: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1);
            std::thread::sleep(Duration::from_secs(wait.clamp(1, 10)));
        }
    }
    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(body))
    }
    pub fn patch(&self, path: &str, body: &Value) -> Response {
        self.call("PATCH", path, Some(body))
    }
    pub fn delete(&self, path: &str) -> Response {
        self.call("DELETE", path, None)
    }

    fn created(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body);
        assert_eq!(r.status, 201, "POST {path} {body}: {}", r.body);
        r.json()
    }

    /// `POST /v1/universes {name, cidr}`, asserting 201; returns the universe.
    pub fn create_universe(&self, name: &str, cidr: &str) -> Value {
        self.created("/v1/universes", &json!({"name": name, "cidr": cidr}))
    }
    /// `POST /v1/security-groups`, asserting 201; returns the group.
    pub fn create_group(&self, universe: &str, name: &str) -> Value {
        self.created("/v1/security-groups", &json!({"universe": universe, "name": name}))
    }
    /// `POST /v1/security-groups/{group}/rules`, asserting 201; returns the rule.
    pub fn add_rule(&self, group: &str, rule: &Value) -> Value {
        self.created(&format!("/v1/security-groups/{group}/rules"), rule)
    }
    /// `DELETE /v1/security-groups/{group}/rules/{rule}`, asserting 204.
    pub fn delete_rule(&self, group: &str, rule: &str) {
        let r = self.delete(&format!("/v1/security-groups/{group}/rules/{rule}"));
        assert_eq!(r.status, 204, "DELETE rule {rule} of {group}: {}", r.body);
    }
    /// The group as it is defined: `GET /v1/security-groups/{id}` without the hit counters it
    /// adds (`hits` of each rule, `hits_from`), which traffic moves. Asserts 200.
    pub fn group(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/security-groups/{id}"));
        assert_eq!(r.status, 200, "GET group {id}: {}", r.body);
        let mut g = r.json();
        if let Some(o) = g.as_object_mut() {
            o.remove("hits_from");
        }
        for dir in ["ingress", "egress"] {
            for rule in g[dir].as_array_mut().into_iter().flatten() {
                if let Some(o) = rule.as_object_mut() {
                    o.remove("hits");
                }
            }
        }
        g
    }
    /// Removes every egress rule of a group, leaving it with no rules at all in that direction.
    pub fn clear_egress(&self, group: &str) {
        let g = self.group(group);
        for rule in g["egress"].as_array().expect("egress is an array") {
            self.delete_rule(group, rule["id"].as_str().expect("rule id"));
        }
    }
    /// The `default` group of a universe (S3).
    pub fn default_group(&self, universe: &str) -> Value {
        let r = self.get(&format!("/v1/security-groups?universe={universe}"));
        assert_eq!(r.status, 200, "GET security-groups of {universe}: {}", r.body);
        r.json()
            .as_array()
            .expect("a collection is a JSON array")
            .iter()
            .find(|g| g["name"] == "default" && g["universe"] == universe)
            .cloned()
            .unwrap_or_else(|| panic!("universe {universe} has no default group: {}", r.body))
    }
    /// `PATCH /v1/endpoints/{id} {security_groups}`, asserting 200.
    pub fn set_groups(&self, endpoint: &str, groups: &[&str]) -> Value {
        let r =
            self.patch(&format!("/v1/endpoints/{endpoint}"), &json!({"security_groups": groups}));
        assert_eq!(r.status, 200, "PATCH endpoint {endpoint} {groups:?}: {}", r.body);
        r.json()
    }
    /// Makes a workload namespace and plugs it as an endpoint through this API (`POST
    /// /v1/endpoints`, which must answer 201), placed on `host` (`None`: the host serving the
    /// request). `groups` empty means "none given", so the endpoint gets `default` (S3).
    pub fn create_endpoint(
        &self,
        host: Option<&str>,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> Workload {
        self.create_endpoint_at(host, universe, ip, groups).0
    }

    /// Like [`Api::create_endpoint`], also returning the revision the creation produced
    /// (`Verse-Revision`).
    pub fn create_endpoint_at(
        &self,
        host: Option<&str>,
        universe: &str,
        ip: &str,
        groups: &[&str],
    ) -> (Workload, u64) {
        let ns = Netns::new("w");
        let mut body = json!({"universe": universe, "netns": ns.name(), "ip": ip});
        if let Some(host) = host {
            body["host"] = json!(host);
        }
        if !groups.is_empty() {
            body["security_groups"] = json!(groups);
        }
        let r = self.post("/v1/endpoints", &body);
        assert_eq!(r.status, 201, "POST /v1/endpoints {body}: {}", r.body);
        let ep = r.json();
        let s = |k: &str| {
            ep[k].as_str().unwrap_or_else(|| panic!("endpoint.{k} missing in {ep}")).to_owned()
        };
        let revision = r.revision().unwrap_or_else(|| panic!("no Verse-Revision: {:?}", r.headers));
        let workload = Workload {
            id: s("id"),
            ip: s("ip").parse().unwrap_or_else(|e| panic!("endpoint.ip in {ep}: {e}")),
            mac: s("mac"),
            interface: s("interface"),
            json: ep,
            ns,
        };
        (workload, revision)
    }
    /// `GET /v1/hosts`, asserting 200: `[{name, underlay_ip, revision, healthy}]`.
    pub fn hosts(&self) -> Vec<Value> {
        let r = self.get("/v1/hosts");
        assert_eq!(r.status, 200, "GET /v1/hosts: {}", r.body);
        r.json().as_array().cloned().unwrap_or_else(|| panic!("hosts is not an array: {}", r.body))
    }
    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        r.body
    }
}

/// The API of one host made reachable from another host's namespace: a TCP relay listening on
/// the loopback of `from` that connects each client to `api` inside its own namespace (every
/// daemon listens on its namespace's loopback only). Stops accepting on drop.
pub struct ApiRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiRelay {
    pub fn start(from: &Netns, api: &Api) -> ApiRelay {
        let port = unique_port();
        let listener = from
            .enter(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .unwrap_or_else(|e| panic!("relay listener in {}: {e}", from.name()));
        listener.set_nonblocking(true).expect("non-blocking relay listener");
        let (netns, target) =
            (api.netns.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, api.port)));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(_) => return,
                };
                let Ok(upstream) = enter_netns(&netns, || TcpStream::connect(target)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                let (mut c1, mut u1) = (client, upstream);
                std::thread::spawn(move || {
                    let _ = io::copy(&mut c1, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        ApiRelay { port, stop, thread: Some(thread) }
    }

    /// The relayed API's URL, as seen from inside the namespace the relay listens in.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request to `addr` from inside the namespace `netns` (`Connection: close`);
/// `timeout` bounds connecting and each read and write.
pub fn http_request(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> io::Result<Response> {
    http_request_as(netns, addr, method, path, body, None, timeout)
}

/// [`http_request`] with `Authorization: Bearer <token>` when a token is given.
pub fn http_request_as(
    netns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = enter_netns(netns, || TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    req.push_str(&payload);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses one HTTP/1.1 response (the whole connection's bytes, `Connection: close`).
pub fn parse_http_response(raw: &[u8]) -> io::Result<Response> {
    let end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of HTTP head"))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|e| bad(format!("HTTP head not UTF-8: {e}")))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = decode_chunked(&body)?;
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().map_err(|e| bad(format!("content-length {len:?}: {e}")))?;
        if body.len() < len {
            return Err(bad(format!("body shorter ({}) than content-length {len}", body.len())));
        }
        body.truncate(len);
    }
    let body = String::from_utf8(body).map_err(|e| bad(format!("body not UTF-8: {e}")))?;
    Ok(Response { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol =
            data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("chunk size line"))?;
        let size_text =
            std::str::from_utf8(&data[..eol]).map_err(|_| bad("chunk size not UTF-8"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|e| bad(format!("chunk size {size_text:?}: {e}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The `verse_drops_total` counter of `reason` in the `/metrics` of the daemon behind `api`;
/// panics on a reason the daemon does not report, so a misspelt reason cannot make a test pass.
/// [`Host::drops`] also works while the daemon is stopped.
pub fn drops(api: &Api, reason: &str) -> u64 {
    counter(&drop_counts(api), reason)
}

/// Every `verse_drops_total` counter in the `/metrics` of the daemon behind `api`, by reason.
pub fn drop_counts(api: &Api) -> BTreeMap<String, u64> {
    let text = api.metrics();
    let counts = drop_counts_in(&text);
    assert!(!counts.is_empty(), "no verse_drops_total in /metrics:\n{text}");
    counts
}

/// The `verse_drops_total` samples of a `/metrics` text, summed by their `reason` label.
pub fn drop_counts_in(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((labels, value)) =
            line.strip_prefix("verse_drops_total{").and_then(|rest| rest.split_once('}'))
        else {
            continue;
        };
        let reason = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("reason=\""))
            .and_then(|v| v.strip_suffix('"'));
        let value = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(reason), Some(value)) = (reason, value) {
            *counts.entry(reason.to_owned()).or_insert(0) += value as u64;
        }
    }
    counts
}

/// The sum of the samples of metric `family` in a `/metrics` text that carry the label `label`
/// (written `name="value"`).
pub fn metric_sum(text: &str, family: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = rest.strip_prefix('{')?.split_once('}')?;
            if !labels.split(',').any(|kv| kv.trim() == label) {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .map(|v| v as u64)
        .sum()
}

/// The drop counters of the dataplane whose maps are pinned under `bpf_dir`, by reason label
/// (packets at either hook), read from its `VERSE_DROPS` map (a per-CPU array of
/// `DropCount {packets, bytes}` indexed by `drop_slot(reason, hook)`) with `bpftool`.
pub fn pinned_drop_counts(bpf_dir: &Path) -> BTreeMap<String, u64> {
    let map = bpf_dir.join(dataplane_common::map_names::DROPS);
    let out = run_ok("bpftool", &["-j", "map", "dump", "pinned", &map.to_string_lossy()]);
    let entries: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool map dump {}: {e}", map.display()));
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap_or_else(|| panic!("bpftool printed {v} for bytes"))
            .iter()
            .map(|b| {
                let b = b.as_str().and_then(|b| b.strip_prefix("0x"));
                b.and_then(|b| u8::from_str_radix(b, 16).ok())
                    .unwrap_or_else(|| panic!("bpftool printed {v} for bytes"))
            })
            .collect()
    };
    let mut counts: BTreeMap<String, u64> =
        DropReason::ALL.iter().map(|r| (r.label().to_owned(), 0)).collect();
    for entry in entries.as_array().unwrap_or_else(|| panic!("bpftool printed {entries}")) {
        let key: [u8; 4] = bytes(&entry["key"]).try_into().expect("a 4-byte key");
        let slot = u32::from_le_bytes(key);
        let Some(reason) = DropReason::from_code(slot / dataplane_common::Hook::COUNT) else {
            continue;
        };
        for cpu in entry["values"].as_array().expect("per-CPU values") {
            let value = bytes(&cpu["value"]);
            let packets: [u8; 8] = value[..8].try_into().expect("a 16-byte DropCount");
            *counts.get_mut(reason.label()).expect("every reason") += u64::from_le_bytes(packets);
        }
    }
    counts
}

/// The counter of `reason` in the drop map pinned under `bpf_dir` (see [`pinned_drop_counts`]).
pub fn pinned_drops(bpf_dir: &Path, reason: DropReason) -> u64 {
    counter(&pinned_drop_counts(bpf_dir), reason.label())
}

fn counter(counts: &BTreeMap<String, u64>, reason: &str) -> u64 {
    *counts
        .get(reason)
        .unwrap_or_else(|| panic!("no drop reason {reason:?}; the reasons are {:?}", counts.keys()))
}

/// How long a drop may take to show in the counters after the probe that caused it returned.
const COUNTED: Duration = Duration::from_secs(2);

/// Asserts that `probe` is stopped by the dataplane of `host` *for `reason`*: the probe (which
/// returns whether it got through) must fail, and `host`'s `reason` counter must move.
///
/// A probe proves nothing unless it would succeed if the packet arrived: aim it at a listening
/// TCP or UDP socket (or a workload, which answers echo requests), and show elsewhere in the
/// test that the same listener answers a peer that is allowed. The counter then says why the
/// packet did not arrive, so a drop for another reason (or no drop at all: nobody listening)
/// fails; the message lists the counters that did move.
#[track_caller]
pub fn assert_dropped(host: &Host, reason: &str, what: &str, probe: impl FnOnce() -> bool) {
    let before = host.drop_counts();
    let was = counter(&before, reason);
    assert!(!probe(), "{what}: got through, but host {} must drop it ({reason})", host.name());
    let mut after = before.clone();
    let counted = wait_until(COUNTED, || {
        after = host.drop_counts();
        counter(&after, reason) > was
    });
    let moved: BTreeMap<&String, String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| (k, format!("{} -> {v}", before.get(k).copied().unwrap_or(0))))
        .collect();
    assert!(
        counted,
        "{what}: did not get through, but host {} did not count it as {reason} (still {was}); \
         the counters that moved: {moved:?}",
        host.name()
    );
}

// ---------------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------------

/// Whether a TCP connection from `ns` to `ip:port` is established within `timeout`.
pub fn tcp_connect(ns: &Netns, ip: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((ip, port));
    ns.enter(|| TcpStream::connect_timeout(&addr, timeout)).is_ok()
}

/// Whether `ping -c1` from `ns` to `ip` gets an echo reply within `wait_s` seconds.
pub fn ping_wait(ns: &Netns, ip: Ipv4Addr, wait_s: u32) -> bool {
    ns.exec("ping", &["-c1", "-q", "-n", "-W", &wait_s.to_string(), &ip.to_string()])
        .status
        .success()
}

/// Whether one ICMP echo from `ns` to `ip` is answered within 2 s.
pub fn ping(ns: &Netns, ip: Ipv4Addr) -> bool {
    ping_wait(ns, ip, 2)
}

/// How a UDP exchange ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpOutcome {
    /// The answer's payload.
    Reply(String),
    /// An ICMP port unreachable came back (`ECONNREFUSED` on the connected socket).
    Refused,
    /// Nothing came back in time.
    Timeout,
    /// Some other error.
    Error(String),
}

/// Sends `msg` from `ns` (optionally from `src`) to `ip:port` over UDP and waits for one answer.
pub fn udp_exchange(
    ns: &Netns,
    src: Option<Ipv4Addr>,
    ip: Ipv4Addr,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> UdpOutcome {
    let bind = SocketAddr::from((src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
    let sock = match ns.enter(|| UdpSocket::bind(bind)) {
        Ok(s) => s,
        Err(e) => return UdpOutcome::Error(format!("bind {bind}: {e}")),
    };
    let run = || -> io::Result<String> {
        sock.connect(SocketAddr::from((ip, port)))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(msg.as_bytes())?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    match run() {
        Ok(s) => UdpOutcome::Reply(s),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => UdpOutcome::Refused,
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            UdpOutcome::Timeout
        }
        Err(e) => UdpOutcome::Error(e.to_string()),
    }
}

/// The answer of a [`UdpServer`] to `msg` sent from `ns`, or `None` if none came in `timeout`.
pub fn udp_roundtrip(
    ns: &Netns,
    ip: Ipv4Addr,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    match udp_exchange(ns, None, ip, port, msg, timeout) {
        UdpOutcome::Reply(s) => Some(s),
        _ => None,
    }
}

/// Stops and joins a server thread on drop.
#[derive(Debug)]
struct Stopper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server in a namespace that answers every line `msg\n` with `<banner>:msg\n`, on every
/// connection, until dropped.
#[derive(Debug)]
pub struct TcpServer {
    pub port: u16,
    accepted: Arc<AtomicU32>,
    _stopper: Stopper,
}

impl TcpServer {
    pub fn start(ns: &Netns, port: u16, banner: &str) -> TcpServer {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let listener = ns
            .enter(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind TCP {addr} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let banner = banner.to_owned();
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let stop = stop.clone();
                            let banner = banner.clone();
                            conns.push(std::thread::spawn(move || {
                                serve_lines(stream, &banner, &stop)
                            }));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        TcpServer { port, accepted, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// Connections accepted so far. The accept loop polls (every 10 ms), so a connection a
    /// client has just opened may be counted a moment later: poll with [`wait_until`].
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Starts a [`TcpServer`] whose banner is the namespace's name.
pub fn tcp_listen(ns: &Netns, port: u16) -> TcpServer {
    TcpServer::start(ns, port, ns.name())
}

fn serve_lines(mut stream: TcpStream, banner: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let mut answer = format!("{banner}:").into_bytes();
                    answer.extend_from_slice(&line);
                    if stream.write_all(&answer).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server in a namespace that answers every datagram `msg` with `<banner>:msg` and
/// records the source of each, until dropped.
#[derive(Debug)]
pub struct UdpServer {
    pub port: u16,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    _stopper: Stopper,
}

/// Starts a [`UdpServer`].
pub fn udp_echo(ns: &Netns, port: u16, banner: &str) -> UdpServer {
    UdpServer::start(ns, port, banner)
}

impl UdpServer {
    pub fn start(ns: &Netns, port: u16, banner: &str) -> UdpServer {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let sock = ns
            .enter(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind UDP {addr} in {}: {e}", ns.name()));
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("UDP read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let sources = Arc::new(Mutex::new(Vec::new()));
        let banner = banner.to_owned();
        let thread = {
            let stop = stop.clone();
            let sources = sources.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        sources.lock().expect("sources lock").push(from);
                        let mut answer = format!("{banner}:").into_bytes();
                        answer.extend_from_slice(&buf[..n]);
                        let _ = sock.send_to(&answer, from);
                    }
                }
            })
        };
        UdpServer { port, sources, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// Sources of the datagrams received so far.
    pub fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().expect("sources lock").clone()
    }
}

/// A long-lived TCP connection from a namespace to a [`TcpServer`], exchanging lines on demand.
#[derive(Debug)]
pub struct TcpConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    pub fn open(ns: &Netns, ip: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<TcpConn> {
        let addr = SocketAddr::from((ip, port));
        let stream = ns.enter(|| TcpStream::connect_timeout(&addr, timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(TcpConn { stream, reader })
    }

    /// The connection's local (source) port.
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends `msg` as one line and returns the server's answer line (without the newline).
    pub fn exchange(&mut self, msg: &str, timeout: Duration) -> io::Result<String> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(line.trim_end_matches('\n').to_owned())
    }
}

/// One line exchanged over a fresh TCP connection: the server's answer, or `None`.
pub fn tcp_roundtrip(
    ns: &Netns,
    ip: Ipv4Addr,
    port: u16,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    let mut conn = TcpConn::open(ns, ip, port, timeout).ok()?;
    conn.exchange(msg, timeout).ok()
}

/// A raw IPv4 socket of protocol `proto` in `ns`, for protocols other than TCP, UDP and ICMP
/// (S7 "other protocols"). The kernel writes the IP header of what is sent; what is received
/// starts with the IP header.
pub struct RawIpSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawIpSocket {
    pub fn open(ns: &Netns, proto: u8) -> io::Result<RawIpSocket> {
        use std::os::fd::FromRawFd;
        let fd = ns.enter(|| {
            // SAFETY: socket(2) takes no pointers; the result is checked below.
            unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto))
            }
        });
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        Ok(RawIpSocket { fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) } })
    }

    pub fn send_to(&self, dst: Ipv4Addr, payload: &[u8]) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            // Ignored for raw IPv4 sockets (net/ipv4/raw.c, raw_sendmsg).
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: `payload` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next packet within `timeout`: its source and its payload (after the IP header).
    pub fn recv(&self, timeout: Duration) -> io::Result<(Ipv4Addr, Vec<u8>)> {
        let packet = self.recv_packet(timeout)?;
        let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl {
            return Err(bad(format!("raw packet of {} bytes with IHL {ihl}", packet.len())));
        }
        let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        Ok((src, packet[ihl..].to_vec()))
    }

    /// The next packet within `timeout`, IP header included.
    pub fn recv_packet(&self, timeout: Duration) -> io::Result<Vec<u8>> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros().max(1)),
        };
        // SAFETY: `tv` is a valid timeval for the length given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 2048];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf[..n as usize].to_vec())
    }
}

/// The packets of one IP protocol that arrive in a namespace, whatever socket they are for, as
/// a raw socket sees them: the receiver's view, for probes whose answer could not come back even
/// if the probe arrived (a forged source address or MAC).
pub struct Tap {
    sock: RawIpSocket,
}

impl Tap {
    /// Starts seeing packets of protocol `proto` (6 TCP, 17 UDP, 1 ICMP) arriving in `ns`.
    pub fn open(ns: &Netns, proto: u8) -> Tap {
        let sock = RawIpSocket::open(ns, proto)
            .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
        Tap { sock }
    }

    /// Whether a packet from `src` arrives within `timeout` (packets from others are skipped).
    pub fn saw_from(&self, src: Ipv4Addr, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.sock.recv(left) {
                Ok((from, _)) if from == src => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

/// A server answering every packet of IP protocol `proto` with `<banner>:payload`, until dropped.
pub struct RawIpServer {
    _stopper: Stopper,
}

impl RawIpServer {
    pub fn start(ns: &Netns, proto: u8, banner: &str) -> RawIpServer {
        let sock = RawIpSocket::open(ns, proto)
            .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let banner = banner.to_owned();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((src, payload)) = sock.recv(Duration::from_millis(100)) {
                        let mut answer = format!("{banner}:").into_bytes();
                        answer.extend_from_slice(&payload);
                        let _ = sock.send_to(src, &answer);
                    }
                }
            })
        };
        RawIpServer { _stopper: Stopper { stop, thread: Some(thread) } }
    }
}

/// Sends `msg` as IP protocol `proto` from `ns` to `ip` and returns the first answer from `ip`.
pub fn raw_ip_roundtrip(
    ns: &Netns,
    ip: Ipv4Addr,
    proto: u8,
    msg: &str,
    timeout: Duration,
) -> Option<String> {
    let sock = RawIpSocket::open(ns, proto)
        .unwrap_or_else(|e| panic!("raw socket {proto} in {}: {e}", ns.name()));
    sock.send_to(ip, msg.as_bytes()).ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match sock.recv(left) {
            Ok((src, payload)) if src == ip => {
                return Some(String::from_utf8_lossy(&payload).into_owned())
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Sends one raw Ethernet frame (`frame` starts with the destination MAC) out of `iface` in `ns`
/// through an `AF_PACKET` socket, as a workload that forges packets would.
pub fn send_frame(ns: &Netns, iface: &str, frame: &[u8]) -> io::Result<()> {
    let iface = std::ffi::CString::new(iface).map_err(|e| bad(format!("interface name: {e}")))?;
    ns.enter(|| {
        // SAFETY: `iface` is a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that is filled in below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex =
            i32::try_from(ifindex).map_err(|e| bad(format!("ifindex {ifindex}: {e}")))?;
        addr.sll_halen = 6;
        let dst =
            frame.get(..6).ok_or_else(|| bad("a frame starts with a 6-byte destination MAC"))?;
        addr.sll_addr[..6].copy_from_slice(dst);
        // SAFETY: `frame` and `addr` are valid for the lengths given for the whole call.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Sends `flows` distinct UDP flows from `ns` to `dst`, `per_flow` datagrams each (every flow
/// of a batch once, then again), as fast as `sendmmsg(2)` goes, from one thread pinned to each
/// CPU: a flood of new flows. Flow `i` goes from port `first_sport + i / 60000` to port
/// `1 + i % 60000`. Returns the datagrams the kernel accepted (a full queue refuses some).
pub fn udp_flood(ns: &Netns, dst: Ipv4Addr, first_sport: u16, flows: u32, per_flow: u32) -> u64 {
    const PER_SPORT: u32 = 60_000;
    const BATCH: u32 = 256;
    let sports = flows.div_ceil(PER_SPORT);
    // SAFETY: sysconf has no preconditions.
    let cpus =
        usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
    let sockets: Vec<(u16, UdpSocket)> = (0..sports)
        .map(|k| {
            let sport = first_sport + u16::try_from(k).expect("few source ports");
            let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, sport));
            let sock = ns
                .enter(|| UdpSocket::bind(bind))
                .unwrap_or_else(|e| panic!("bind UDP {bind} in {}: {e}", ns.name()));
            (sport, sock)
        })
        .collect();
    let sent = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for cpu in 0..cpus {
            let (sockets, sent) = (&sockets, &sent);
            scope.spawn(move || {
                // SAFETY: an all-zero cpu_set_t is empty; CPU_SET writes within it; pid 0 is
                // the calling thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                for (k, (_, sock)) in sockets.iter().enumerate() {
                    let in_this = (flows - k as u32 * PER_SPORT).min(PER_SPORT);
                    // This thread's share of the destination ports of this socket.
                    let share: Vec<u16> = (0..in_this)
                        .filter(|i| *i as usize % cpus == cpu)
                        .map(|i| u16::try_from(1 + i).expect("ports"))
                        .collect();
                    for batch in share.chunks(BATCH as usize) {
                        for _ in 0..per_flow {
                            sent.fetch_add(send_batch(sock, dst, batch), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    sent.load(Ordering::Relaxed)
}

/// One `sendmmsg(2)` of a one-byte datagram to each port of `ports` at `dst`; returns how many
/// the kernel took.
fn send_batch(sock: &UdpSocket, dst: Ipv4Addr, ports: &[u16]) -> u64 {
    let mut payload = [b'f'];
    let mut addrs: Vec<libc::sockaddr_in> = ports
        .iter()
        .map(|p| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: p.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: 1 };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|a| {
            // SAFETY: an all-zero mmsghdr is a valid value of this plain C struct.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0usize;
    while done < msgs.len() {
        // SAFETY: every header points at a live address and the one-byte iovec, valid for the
        // call; `done < len`.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr().add(done),
                (msgs.len() - done) as u32,
                0,
            )
        };
        if n <= 0 {
            // A refused datagram (ENOBUFS, or an ICMP error reported back): skip it.
            done += 1;
        } else {
            done += n as usize;
        }
    }
    msgs.len() as u64
}

/// The keys of the conntrack table pinned under a daemon's bpffs (`VERSE_CT`), read with
/// `bpftool`: so a test can check what a host still tracks, whatever the daemon does.
pub fn conntrack_keys(bpf_dir: &Path) -> Vec<dataplane_common::CtKey> {
    let pin = bpf_dir.join(dataplane_common::map_names::CONNTRACK);
    let out = run_ok("bpftool", &["-j", "map", "dump", "pinned", &pin.to_string_lossy()]);
    let dump: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    dump.as_array()
        .expect("a map dump is an array")
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .expect("raw key bytes")
                .iter()
                .map(|b| {
                    let t = b.as_str().expect("a hex byte");
                    u8::from_str_radix(t.trim_start_matches("0x"), 16).expect("hex")
                })
                .collect();
            assert_eq!(bytes.len(), std::mem::size_of::<dataplane_common::CtKey>());
            let u16_at = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
            dataplane_common::CtKey {
                vni: u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                src: [bytes[4], bytes[5], bytes[6], bytes[7]],
                dst: [bytes[8], bytes[9], bytes[10], bytes[11]],
                sport: u16_at(12),
                dport: u16_at(14),
                proto: bytes[16],
                _pad: [0; 3],
            }
        })
        .collect()
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn mac_bytes(text: &str) -> [u8; 6] {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    parts.try_into().unwrap_or_else(|_| panic!("MAC {text:?} is not 6 bytes"))
}

// ---------------------------------------------------------------------------------------------
// Attack tooling: crafted connections, captures, and the victim's sockets as judges
// ---------------------------------------------------------------------------------------------

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}

/// `setsockopt(fd, level, name, &value)` for an integer option.
fn set_int_option(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the length given, for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt(fd, level, name)` for an integer option.
fn int_option(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid and writable for the whole call.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A TCP connection from `ns`, from the given local address and port (`SO_REUSEADDR`, so a
/// port in TIME_WAIT can be taken again), to `dst`, established within `timeout`. A test uses it
/// to open a connection on exactly the ports of a flow it attacks.
pub fn tcp_connect_from(
    ns: &Netns,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    timeout: Duration,
) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    ns.enter(|| {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let local = sockaddr_in(src.0, src.1);
        // SAFETY: `local` is a valid sockaddr_in for the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const local).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr_in(dst.0, dst.1);
        // SAFETY: as for bind.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const remote).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd for the whole call.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connection not established"));
        }
        let err = int_option(&fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    })
}

/// The path MTU of a connected socket (`getsockopt(IP_MTU)`): what the kernel learnt from ICMP
/// "fragmentation needed" messages it accepted.
pub fn ip_mtu(sock: &impl AsRawFd) -> io::Result<u32> {
    int_option(sock, libc::IPPROTO_IP, libc::IP_MTU).map(|v| v as u32)
}

/// A connected UDP socket that reports ICMP errors about its datagrams (`IP_RECVERR`: port
/// unreachable as `ECONNREFUSED`, time exceeded as `EHOSTUNREACH`, parameter problem as
/// `EPROTO`, fragmentation needed as `EMSGSIZE`): the victim's view of an ICMP attack.
pub struct UdpProbe {
    sock: UdpSocket,
}

impl UdpProbe {
    /// Opens the socket in `ns`, connects it to `ip:port` and sends one datagram (`flow`).
    pub fn open(ns: &Netns, ip: Ipv4Addr, port: u16) -> io::Result<UdpProbe> {
        let sock = ns.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
        set_int_option(&sock, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
        sock.connect((ip, port))?;
        sock.send(b"flow")?;
        Ok(UdpProbe { sock })
    }

    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The error (errno) the socket reports within `timeout`, `None` if it reports none. A
    /// datagram received instead fails the test: probes talk to silent peers.
    pub fn error(&self, timeout: Duration) -> Option<i32> {
        self.sock.set_read_timeout(Some(timeout)).expect("UDP read timeout");
        let mut buf = [0u8; 2048];
        match self.sock.recv(&mut buf) {
            Ok(n) => panic!("the probe's peer answered {n} bytes; it must stay silent"),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                None
            }
            Err(e) => e.raw_os_error(),
        }
    }
}

/// One ICMP message a namespace received, as an [`IcmpListener`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub ty: u8,
    pub code: u8,
    /// The IPv4 datagram's length, bytes.
    pub len: usize,
}

/// Records every ICMP message delivered to a namespace (a raw ICMP socket receives a copy of
/// each), until dropped.
pub struct IcmpListener {
    seen: Arc<Mutex<Vec<IcmpSeen>>>,
    _stopper: Stopper,
}

impl IcmpListener {
    pub fn start(ns: &Netns) -> IcmpListener {
        let sock = RawIpSocket::open(ns, 1)
            .unwrap_or_else(|e| panic!("raw ICMP socket in {}: {e}", ns.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(p) = sock.recv_packet(Duration::from_millis(100)) else { continue };
                    let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
                    if ihl < 20 || p.len() < ihl + 2 {
                        continue;
                    }
                    seen.lock().expect("seen lock").push(IcmpSeen {
                        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                        ty: p[ihl],
                        code: p[ihl + 1],
                        len: p.len(),
                    });
                }
            })
        };
        IcmpListener { seen, _stopper: Stopper { stop, thread: Some(thread) } }
    }

    /// What arrived from `src` so far.
    pub fn from(&self, src: Ipv4Addr) -> Vec<IcmpSeen> {
        self.seen.lock().expect("seen lock").iter().filter(|m| m.src == src).cloned().collect()
    }
}

/// Every frame an interface sends or receives (`AF_PACKET`, `ETH_P_ALL`), from the moment it
/// is opened: a test reads sequence numbers or identities off the wire, as an attacker who can
/// watch that wire would.
pub struct PacketCapture {
    fd: std::os::fd::OwnedFd,
}

impl PacketCapture {
    pub fn open(ns: &Netns, iface: &str) -> io::Result<PacketCapture> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let name = std::ffi::CString::new(iface).map_err(|e| bad(format!("interface: {e}")))?;
        let all = (libc::ETH_P_ALL as u16).to_be();
        ns.enter(|| {
            // SAFETY: `name` is NUL-terminated and outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: socket(2) takes no pointers; the result is checked below.
            let fd = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all))
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all-zero is valid and filled in below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = i32::try_from(ifindex).map_err(|e| bad(format!("{e}")))?;
            // SAFETY: `addr` is a valid sockaddr_ll for the length given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(PacketCapture { fd })
        })
    }

    /// The next frame within `timeout`, or `None`.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros().max(1)),
        };
        // SAFETY: `tv` is a valid timeval for the length given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    /// The first frame (from now on, in order) for which `pred` holds, within `timeout`.
    pub fn find(&self, timeout: Duration, mut pred: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let frame = self.next(left)?;
            if pred(&frame) {
                return Some(frame);
            }
        }
    }
}

/// A TCP segment as [`tcp_segment`] reads it off an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    pub payload_len: usize,
}

/// The TCP segment in an Ethernet/IPv4 frame, if it is one.
pub fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let t = ip.get(ihl..total)?;
    if t.len() < 20 {
        return None;
    }
    let doff = usize::from(t[12] >> 4) * 4;
    Some(TcpSegment {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload_len: t.len().saturating_sub(doff),
    })
}

/// Short timeouts for probes that are expected to fail, long ones for those that must succeed.
pub const DENIED: Duration = Duration::from_millis(1000);
pub const ALLOWED: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_responses() {
        let raw = b"HTTP/1.1 201 Created\r\nVerse-Revision: 7\r\ncontent-length: 2\r\n\r\n{}";
        let r = parse_http_response(raw).unwrap();
        assert_eq!((r.status, r.revision(), r.body.as_str()), (201, Some(7), "{}"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(raw).unwrap().body, "abcde");
    }

    #[test]
    fn sums_drop_counters_by_reason() {
        let text = "# HELP verse_drops_total x\nverse_drops_total{reason=\"policy_ingress\"} 3\n\
                    verse_drops_total{reason=\"spoofed_ip\"} 1\nverse_drops_total{host=\"a\",reason=\"policy_ingress\"} 2\n";
        let counts = drop_counts_in(text);
        assert_eq!(counts.get("policy_ingress"), Some(&5));
        assert_eq!(counts.get("spoofed_ip"), Some(&1));
        assert_eq!(counts.get("no_route"), None);
        assert_eq!(counter(&counts, "policy_ingress"), 5);
        assert!(std::panic::catch_unwind(|| counter(&counts, "policy_ingres")).is_err());
    }

    #[test]
    fn names_fit_ifnamsiz_and_name_their_owner() {
        for _ in 0..100 {
            let name = unique_name("abcd");
            assert!(name.len() <= 15, "{name}");
            assert_eq!(owner_pid(&name), Some(std::process::id()), "{name}");
        }
        assert_eq!(owner_pid("vtzz-1h"), Some(35 * 36 + 35));
        assert_eq!(owner_pid("other"), None);
    }

    /// The harness itself, over a plain veth pair with no Verse at all: if this fails, the
    /// namespace tests' failures say nothing about Verse.
    #[test]
    fn traffic_helpers_work_over_a_plain_veth() {
        let a = Netns::new("ta");
        let b = Netns::new("tb");
        let va = unique_name("va");
        let vb = unique_name("vb");
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                &vb,
                "netns",
                b.name(),
            ],
        );
        a.ip(&["addr", "add", "198.18.7.1/24", "dev", &va]);
        b.ip(&["addr", "add", "198.18.7.2/24", "dev", &vb]);
        a.ip(&["link", "set", &va, "up"]);
        b.ip(&["link", "set", &vb, "up"]);
        let ip_b: Ipv4Addr = "198.18.7.2".parse().unwrap();
        let _tcp = TcpServer::start(&b, 7000, "b");
        let udp = UdpServer::start(&b, 7001, "b");
        assert!(wait_until(Duration::from_secs(5), || ping(&a, ip_b)));
        assert!(tcp_connect(&a, ip_b, 7000, ALLOWED));
        assert!(!tcp_connect(&a, ip_b, 7999, ALLOWED), "nothing listens on 7999");
        assert_eq!(tcp_roundtrip(&a, ip_b, 7000, "x", ALLOWED).as_deref(), Some("b:x"));
        assert_eq!(udp_roundtrip(&a, ip_b, 7001, "y", ALLOWED).as_deref(), Some("b:y"));
        assert_eq!(udp.sources().len(), 1);
        assert_eq!(udp_exchange(&a, None, ip_b, 7999, "z", ALLOWED), UdpOutcome::Refused);
        assert!(!ping(&a, "198.18.7.3".parse().unwrap()));
        let mut conn = TcpConn::open(&a, ip_b, 7000, ALLOWED).unwrap();
        for i in 0..3 {
            assert_eq!(conn.exchange(&i.to_string(), ALLOWED).unwrap(), format!("b:{i}"));
        }
        let _raw = RawIpServer::start(&b, 253, "b");
        assert_eq!(raw_ip_roundtrip(&a, ip_b, 253, "r", ALLOWED).as_deref(), Some("b:r"));
        assert_eq!(
            raw_ip_roundtrip(&a, ip_b, 254, "r", DENIED),
            None,
            "nobody answers protocol 254"
        );
        b.ip(&["link", "set", &vb, "down"]);
        assert_eq!(udp_exchange(&a, None, ip_b, 7001, "w", DENIED), UdpOutcome::Timeout);
    }

    #[test]
    fn bpffs_guard_mounts_and_unmounts() {
        let dir = TempDir::new("bt");
        let mnt = dir.path().join("bpf");
        {
            let _fs = Bpffs::mount(&mnt);
            let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
            assert!(
                mounts.lines().any(|l| l.contains(mnt.to_str().unwrap()) && l.contains(" bpf ")),
                "{mounts}"
            );
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(mnt.to_str().unwrap()), "unmounted on drop");
    }

    #[test]
    fn api_client_speaks_http_inside_a_namespace() {
        let ns = Netns::new("tapi");
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:7070")).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.ends_with(b"}") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            let body = "{\"ok\":true}";
            write!(
                s,
                "HTTP/1.1 201 Created\r\nverse-revision: 3\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            req
        });
        let api = Api { netns: ns.name().to_owned(), port: 7070, token: Some("vt_x".into()) };
        let r = api.post("/v1/universes", &json!({"name": "u"}));
        assert_eq!((r.status, r.revision(), r.json()), (201, Some(3), json!({"ok": true})));
        let req = server.join().unwrap();
        assert!(
            req.starts_with("POST /v1/universes HTTP/1.1\r\n") && req.ends_with("{\"name\":\"u\"}"),
            "{req}"
        );
        assert!(req.contains("\r\nAuthorization: Bearer vt_x\r\n"), "{req}");
    }
}
