//! Harness for Verse's network-namespace integration tests.
//!
//! Contract: every resource a test makes — network namespaces, the bpffs mount of a daemon, its
//! state directory, the daemon itself, the threads of traffic servers — is owned by a guard whose
//! `Drop` removes it, also while the test unwinds from a failed assertion. Names carry a per-run
//! prefix (`vt` + the process id + a counter) so parallel tests and parallel runs never collide.
//! Waiting is always a bounded poll ([`wait_until`]), never a bare sleep used as synchronisation.
//!
//! A test builds a [`Host`] (a network namespace running `versed`, reached through [`Api`]),
//! configures Verse only through the REST API, with the product's own client ([`Api::client`])
//! as the host's admin ([`Api`] sends the token `versed` wrote to its state directory at first
//! start, or the one the harness gave it), plugs [`Workload`]s (one namespace per endpoint) and
//! then asserts what a user sees: a packet that arrives or not ([`tcp_connect`], [`ping`],
//! [`udp_roundtrip`], [`TcpConn`]), an API status and error code ([`Response`]), a drop counter
//! that moved ([`drops`]).
//!
//! Sockets are opened inside a namespace by a short-lived thread that joins it with `setns(2)`
//! ([`Netns::enter`]); a socket stays in the namespace it was created in, so the rest of the test
//! uses it from any thread.
//!
//! The modules, one concept each (everything public is also re-exported here, so a test can
//! `use tests::*`):
//! - [`names`]: per-run names and ports, the sweep of what killed runs left, bounded polling;
//! - [`netns`]: the guards of what a test makes (namespace, temporary directory, bpffs);
//! - [`daemon`]: `versed` ([`Versed`], [`Host`]), the `verse` CLI, [`Workload`]s;
//! - [`api`]: the REST API as a test speaks it ([`Api`]: the product's client for what a user
//!   does, raw HTTP for what it cannot send; [`ApiRelay`]);
//! - [`assert`]: drop counters, metrics, pinned maps, [`assert_dropped`];
//! - [`traffic`]: probes and servers over ordinary sockets;
//! - [`raw`]: raw sockets, forged frames, captures, the victim's sockets as judges;
//! - [`frames`]: packets built from literal bytes;
//! - [`encap`]: the encapsulation fixtures the encapsulation test and the benchmark share;
//! - [`fleet`]: several hosts sharing one etcd over an IP underlay, the etcd launcher, and the
//!   fixture of the tests that break etcd under edits ([`RuleBurst`]).

pub use serde_json::{json, Value};

pub mod api;
pub mod assert;
pub mod daemon;
pub mod encap;
pub mod fleet;
pub mod frames;
pub mod names;
pub mod netns;
pub mod raw;
pub mod traffic;

pub use api::*;
pub use assert::*;
pub use daemon::*;
pub use fleet::{
    bulk_send, encapsulated, send_encapsulated, underlay_ip, vxlan_seen, Acked, BulkSink, Etcd,
    EtcdCerts, Fleet, RuleBurst, RuleEditor, Simulation, VxlanGbp, VxlanSeen,
};
pub use frames::mac_bytes;
pub use names::*;
pub use netns::*;
pub use raw::*;
pub use traffic::*;
