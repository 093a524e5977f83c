//! What a test asserts besides traffic: drop counters (from `/metrics` or the pinned drop map),
//! metric sums, the conntrack keys a host holds, and [`assert_dropped`].

use std::collections::BTreeMap;

use std::path::Path;
use std::time::Duration;

use dataplane_common::DropReason;
use serde_json::Value;

use crate::*;

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

pub(crate) fn counter(counts: &BTreeMap<String, u64>, reason: &str) -> u64 {
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

/// The keys of the map `map` (a name of `dataplane_common::map_names`) pinned under a daemon's
/// bpffs, as bytes, read with `bpftool`: what the kernel holds, whatever the daemon says.
pub fn pinned_keys(bpf_dir: &Path, map: &str) -> Vec<Vec<u8>> {
    let pin = bpf_dir.join(map);
    let out = run_ok("bpftool", &["-j", "map", "dump", "pinned", &pin.to_string_lossy()]);
    let dump: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    dump.as_array()
        .expect("a map dump is an array")
        .iter()
        .map(|e| {
            e["key"]
                .as_array()
                .expect("raw key bytes")
                .iter()
                .map(|b| {
                    let t = b.as_str().expect("a hex byte");
                    u8::from_str_radix(t.trim_start_matches("0x"), 16).expect("hex")
                })
                .collect()
        })
        .collect()
}

/// The keys of the conntrack table pinned under a daemon's bpffs (`VERSE_CT`), read with
/// `bpftool`: so a test can check what a host still tracks, whatever the daemon does.
pub fn conntrack_keys(bpf_dir: &Path) -> Vec<dataplane_common::CtKey> {
    pinned_keys(bpf_dir, dataplane_common::map_names::CONNTRACK)
        .into_iter()
        .map(|bytes| {
            assert_eq!(bytes.len(), std::mem::size_of::<dataplane_common::CtKey>());
            let u16_at = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
            dataplane_common::CtKey {
                src: [bytes[0], bytes[1], bytes[2], bytes[3]],
                dst: [bytes[4], bytes[5], bytes[6], bytes[7]],
                sport: u16_at(8),
                dport: u16_at(10),
                vni_proto: u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
            }
        })
        .collect()
}

/// The keys of the IPv6 conntrack table pinned under a daemon's bpffs (`VERSE_CT6`), as
/// [`conntrack_keys`] reads the IPv4 one.
pub fn conntrack6_keys(bpf_dir: &Path) -> Vec<dataplane_common::Ct6Key> {
    pinned_keys(bpf_dir, dataplane_common::map_names::CONNTRACK6)
        .into_iter()
        .map(|bytes| {
            assert_eq!(bytes.len(), std::mem::size_of::<dataplane_common::Ct6Key>());
            let at = |i: usize| -> [u8; 16] { bytes[i..i + 16].try_into().expect("16 bytes") };
            let u16_at = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
            dataplane_common::Ct6Key {
                src: at(0),
                dst: at(16),
                vni: u32::from_ne_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]),
                sport: u16_at(36),
                dport: u16_at(38),
                proto: bytes[40],
                _pad: [0; 7],
            }
        })
        .collect()
}

/// Whether no entry of the conntrack table of `ip`'s family pinned under `bpf_dir` has `ip` as
/// an address: what a host still tracks of an endpoint, whatever the daemon says.
pub fn untracked(bpf_dir: &Path, ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => {
            let ip = ip.octets();
            conntrack_keys(bpf_dir).iter().all(|k| k.src != ip && k.dst != ip)
        }
        std::net::IpAddr::V6(ip) => {
            let ip = ip.octets();
            conntrack6_keys(bpf_dir).iter().all(|k| k.src != ip && k.dst != ip)
        }
    }
}

/// The value of the sample of `/metrics` text named exactly `name` (no labels), if any.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let value = l.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse::<f64>().ok().map(|v| v as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reads_an_unlabelled_sample_by_its_exact_name() {
        let text = "# HELP verse_map_entries x\nverse_map_entries 12\nverse_map_entries_x 3\n\
                    verse_store_watch_events_total 7\n";
        assert_eq!(metric_value(text, "verse_map_entries"), Some(12));
        assert_eq!(metric_value(text, "verse_store_watch_events_total"), Some(7));
        assert_eq!(metric_value(text, "verse_universes"), None);
    }
}
