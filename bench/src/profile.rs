//! Where the control tier's time goes: the hosts' per-phase histograms of the edit path
//! (`verse_edit_phase_seconds{phase}` in each host's `/metrics`, see `controller/src/phases.rs`)
//! and the CPU time of each process of the run (`/proc/<pid>/stat`), both as the difference
//! between two samples taken around a measurement.
use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One phase's histogram: sum in seconds, count, cumulative count by upper bound.
type Histogram = (f64, f64, Vec<(f64, f64)>);

/// One host's histograms, by phase.
#[derive(Clone, Debug, Default)]
pub struct Phases(BTreeMap<String, Histogram>);

const FAMILY: &str = "verse_edit_phase_seconds";

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

impl Phases {
    /// Reads the phase histograms out of a `/metrics` text.
    pub fn parse(text: &str) -> Phases {
        let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(FAMILY) else { continue };
            let Some((series, value)) = rest.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let Some((kind, labels)) = series.split_once('{') else { continue };
            let Some(phase) = label(labels, "phase") else { continue };
            let entry = out.entry(phase.to_owned()).or_default();
            match kind {
                "_sum" => entry.0 = value,
                "_count" => entry.1 = value,
                "_bucket" => {
                    let le = match label(labels, "le") {
                        Some("+Inf") => f64::INFINITY,
                        Some(le) => le.parse().unwrap_or(f64::INFINITY),
                        None => continue,
                    };
                    entry.2.push((le, value));
                }
                _ => {}
            }
        }
        for entry in out.values_mut() {
            entry.2.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Phases(out)
    }

    /// What happened between `before` and `self`, summed with `into` (several hosts).
    pub fn add_delta(&self, before: &Phases, into: &mut Phases) {
        for (phase, (sum, count, buckets)) in &self.0 {
            let (bsum, bcount, bbuckets) = before.0.get(phase).cloned().unwrap_or_default();
            let entry = into.0.entry(phase.clone()).or_default();
            entry.0 += sum - bsum;
            entry.1 += count - bcount;
            if entry.2.is_empty() {
                entry.2 = buckets.iter().map(|(le, _)| (*le, 0.0)).collect();
            }
            for (i, (le, n)) in buckets.iter().enumerate() {
                let b = bbuckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, n)| *n);
                if let Some(slot) = entry.2.get_mut(i) {
                    slot.1 += n - b;
                }
            }
        }
    }

    /// The upper bound of the bucket holding quantile `q` of `phase`, in ms.
    fn quantile_ms(buckets: &[(f64, f64)], count: f64, q: f64) -> f64 {
        let want = (count * q).ceil().max(1.0);
        buckets.iter().find(|(_, n)| *n >= want).map_or(f64::NAN, |(le, _)| le * 1e3)
    }

    /// By phase: count, mean, and the p50 and p99 (bucket upper bounds), in ms; phases that did
    /// not occur are left out.
    pub fn summary(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (phase, (sum, count, buckets)) in &self.0 {
            if *count < 1.0 {
                continue;
            }
            out.insert(
                phase.clone(),
                json!({
                    "count": count,
                    "mean_ms": (sum / count * 1e3 * 100.0).round() / 100.0,
                    "p50_ms_at_most": Phases::quantile_ms(buckets, *count, 0.5),
                    "p99_ms_at_most": Phases::quantile_ms(buckets, *count, 0.99),
                }),
            );
        }
        Value::Object(out)
    }

    /// One line: phase mean/p99 in ms, in the order of the edit path.
    pub fn line(&self) -> String {
        const ORDER: [&str; 15] = [
            "request",
            "edit_lock",
            "idempotency_lookup",
            "validate",
            "commit",
            "conflict_wait",
            "hold",
            "hold_wait",
            "watch_echo",
            "realize_local",
            "realize_fleet",
            "audit",
            "reconcile",
            "compile",
            "report",
        ];
        let mut parts = Vec::new();
        for phase in ORDER {
            if let Some((sum, count, buckets)) = self.0.get(phase) {
                if *count >= 1.0 {
                    parts.push(format!(
                        "{phase} {:.2}/{:.0} ms (x{count:.0})",
                        sum / count * 1e3,
                        Phases::quantile_ms(buckets, *count, 0.99)
                    ));
                }
            }
        }
        format!("mean/p99<= {}", parts.join(", "))
    }
}

/// CPU time (user + system, in clock ticks) of this process and of every process descended
/// from it, by command name, with the machine's busy ticks (all processes, every engineer's).
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    by_comm: BTreeMap<String, u64>,
    machine_busy: u64,
    at: Option<std::time::Instant>,
}

fn stat(pid: u32) -> Option<(String, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may hold spaces: split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After comm: state(0) ppid(1) ... utime(11) stime(12).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, ppid, utime + stime))
}

impl Cpu {
    pub fn sample() -> Cpu {
        let me = std::process::id();
        let mut procs = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((comm, ppid, ticks)) = stat(pid) {
                    procs.push((pid, comm, ppid, ticks));
                }
            }
        }
        let parent: BTreeMap<u32, u32> = procs.iter().map(|(p, _, pp, _)| (*p, *pp)).collect();
        let ours = |mut pid: u32| {
            for _ in 0..16 {
                if pid == me {
                    return true;
                }
                match parent.get(&pid) {
                    Some(&pp) if pp > 1 => pid = pp,
                    _ => return false,
                }
            }
            false
        };
        let mut by_comm = BTreeMap::new();
        for (pid, comm, _, ticks) in &procs {
            if ours(*pid) {
                let name = if *pid == me { "bench (clients)".to_owned() } else { comm.clone() };
                *by_comm.entry(name).or_insert(0) += ticks;
            }
        }
        let machine_busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.to_owned();
                let v: Vec<u64> =
                    line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal: busy = all but idle, iowait.
                let busy = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4);
                Some(busy.map(|(_, n)| n).sum())
            })
            .unwrap_or(0);
        Cpu { by_comm, machine_busy, at: Some(std::time::Instant::now()) }
    }

    /// Cores used by each group between `before` and `self` (ticks are 1/100 s), and the
    /// machine's busy cores (everyone's).
    pub fn cores_since(&self, before: &Cpu) -> Value {
        let secs = match (self.at, before.at) {
            (Some(a), Some(b)) => a.duration_since(b).as_secs_f64().max(1e-3),
            _ => return Value::Null,
        };
        let tick = 100.0;
        let mut out = serde_json::Map::new();
        let mut ours = 0.0;
        for (comm, ticks) in &self.by_comm {
            // A process that exited meanwhile drops out; one that started counts from zero.
            let b = before.by_comm.get(comm).copied().unwrap_or(0);
            let cores = ticks.saturating_sub(b) as f64 / tick / secs;
            ours += cores;
            out.insert(comm.clone(), json!((cores * 100.0).round() / 100.0));
        }
        let machine = self.machine_busy.saturating_sub(before.machine_busy) as f64 / tick / secs;
        out.insert("all of this run".into(), json!((ours * 100.0).round() / 100.0));
        out.insert("machine (every engineer)".into(), json!((machine * 100.0).round() / 100.0));
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_and_subtract() {
        let before = "verse_edit_phase_seconds_sum{phase=\"commit\"} 1.0\n\
                      verse_edit_phase_seconds_count{phase=\"commit\"} 10\n\
                      verse_edit_phase_seconds_bucket{le=\"0.01\",phase=\"commit\"} 5\n\
                      verse_edit_phase_seconds_bucket{le=\"0.1\",phase=\"commit\"} 10\n\
                      verse_edit_phase_seconds_bucket{le=\"+Inf\",phase=\"commit\"} 10\n";
        let after = "verse_edit_phase_seconds_sum{phase=\"commit\"} 1.5\n\
                     verse_edit_phase_seconds_count{phase=\"commit\"} 20\n\
                     verse_edit_phase_seconds_bucket{le=\"0.01\",phase=\"commit\"} 14\n\
                     verse_edit_phase_seconds_bucket{le=\"0.1\",phase=\"commit\"} 20\n\
                     verse_edit_phase_seconds_bucket{le=\"+Inf\",phase=\"commit\"} 20\n";
        let mut d = Phases::default();
        Phases::parse(after).add_delta(&Phases::parse(before), &mut d);
        let s = d.summary();
        assert_eq!(s["commit"]["count"], json!(10.0));
        assert_eq!(s["commit"]["mean_ms"], json!(50.0));
        assert_eq!(s["commit"]["p50_ms_at_most"], json!(10.0));
        assert_eq!(s["commit"]["p99_ms_at_most"], json!(100.0));
    }
}
