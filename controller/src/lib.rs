//! Verse's controller: the `versed` daemon and the `verse` CLI share this library.
//!
//! One module per concept of the product:
//! - [`model`]: universes, security groups, rules, endpoints; every edit as a pure function.
//! - [`table`]: the persistent, journaled maps the desired state is made of.
//! - [`index`]: indices of the desired state, and the incremental S12 fit check.
//! - [`compile`]: desired state -> the entries of the dataplane's maps (pure).
//! - [`verdict`]: a reference model of the dataplane's verdict on a packet (pure), against
//!   which the kernel programs are tested.
//! - [`store`]: where the desired state lives (embedded file store).
//! - [`dataplane`]: loading, pinning and attaching the eBPF programs; reading and writing maps.
//! - [`events`]: the dataplane's verdict events as the API streams them; [`hits`]: per-rule
//!   hit counters.
//! - [`conntrack`]: the controller's side of connection tracking: budget counters shared with
//!   the kernel, garbage collection of the table.
//! - [`netlink`]: endpoint plumbing (veth pairs, namespaces, addresses, routes).
//! - [`reconcile`]: makes the dataplane and the interfaces match the desired state.
//! - [`sim`]: simulated hosts (the real control plane over in-memory maps), for scale tests.
//! - [`api`]: the REST API, described by [`openapi`]; [`client`]: the CLI's side of it;
//!   [`relay`]: one view of the fleet from any host.
//! - [`auth`]: principals, tokens and who may do what (S15); [`audit`]: the audit trail.
//! - [`server`]: the API's listeners, TLS and connection limits; [`limits`]: its per-request
//!   limits (body size and time, rates); [`tls`]: certificates and what a client trusts.
//! - [`trace`]: `verse trace`, a packet's verdict step by step from what a host realized.
//! - [`ui`]: the web page at `/ui`; [`events`]: verdict events; [`flowlogs`]: flow logs.
//! - [`config`]: the daemon's settings.
pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod compile;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod events;
pub mod flowlogs;
pub mod frames;
pub mod hits;
pub mod index;
pub mod limits;
pub mod mapping;
pub mod model;
pub mod netlink;
pub mod openapi;
pub mod phases;
pub mod reconcile;
pub mod relay;
pub mod server;
pub mod sim;
pub mod store;
pub mod table;
#[cfg(test)]
mod testkit;
pub mod tls;
pub mod trace;
pub mod ui;
pub mod verdict;
