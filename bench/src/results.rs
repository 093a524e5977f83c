//! Benchmark records and `target/bench/results.json` (the README, "Performance"): one record per
//! measurement with `name`, `value` and `unit` (one unit per record), and, where it is compared
//! with something measured in the same run, the `baseline` name, the `ratio` value / baseline
//! (both in the record's unit) and `better`: whether a `higher` or a `lower` ratio is better.
use std::fs;

use anyhow::{Context, Result};
use serde::{Serialize, Serializer};

/// The unit of a record's value; it fixes which way a ratio of two such values is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per packet (time: lower is better).
    NsPerPacket,
    /// Gbit/s received (throughput: higher is better).
    Gbps,
    /// Millions of packets per second (packet rate: higher is better).
    Mpps,
    /// Milliseconds (time: lower is better).
    Ms,
    /// Microseconds (time: lower is better).
    Us,
    /// Percent of one CPU per Gbit/s (cost: lower is better).
    CpuPctPerGbps,
    /// Kibibytes of memory or of data received (cost: lower is better).
    KiB,
    /// Events per second a service had to send (cost: lower is better).
    EventsPerS,
    /// Acknowledged edits per second (throughput: higher is better).
    EditsPerSecond,
    /// A count of events, e.g. failures (lower is better).
    Count,
    /// A dimensionless factor, e.g. how much a gap grew. Never compared with a baseline: a ratio
    /// of factors has no direction of its own.
    Factor,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::NsPerPacket => "ns/packet",
            Unit::Gbps => "Gbit/s",
            Unit::Mpps => "Mpps",
            Unit::Ms => "ms",
            Unit::Us => "µs",
            Unit::CpuPctPerGbps => "%CPU/(Gbit/s)",
            Unit::KiB => "KiB",
            Unit::EventsPerS => "events/s",
            Unit::EditsPerSecond => "edits/s",
            Unit::Count => "count",
            Unit::Factor => "x",
        }
    }

    /// Which way a ratio of two values in this unit is better.
    fn better(self) -> Option<Better> {
        match self {
            Unit::Gbps | Unit::Mpps | Unit::EditsPerSecond => Some(Better::Higher),
            Unit::NsPerPacket
            | Unit::Ms
            | Unit::Us
            | Unit::CpuPctPerGbps
            | Unit::KiB
            | Unit::EventsPerS
            | Unit::Count => Some(Better::Lower),
            Unit::Factor => None,
        }
    }
}

impl Serialize for Unit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Which way a record's ratio is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub name: String,
    pub value: f64,
    pub unit: Unit,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// `value` / the baseline's value, both in `unit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Whether a higher or a lower `ratio` is better (set with it, from the unit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub better: Option<Better>,
    /// The goal this figure is held to (e.g. `>= 1.10x` of the ratio, `< 100 ms` of the value),
    /// and whether this run met it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// Smallest and largest of the repeated measurements whose median is `value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The exact configuration of the run.
    pub config: serde_json::Value,
}

impl BenchRecord {
    /// A record of `value` in `unit`; with `baseline`, the name of the record it is compared
    /// with and the ratio `value` / that record's value (which must be in the same unit).
    ///
    /// Panics if a ratio is given for a unit without a direction ([`Unit::Factor`]): that is a
    /// mistake in the benchmark's code, not in its measurements.
    pub fn new(
        name: &str,
        value: f64,
        unit: Unit,
        baseline: Option<(&str, f64)>,
        config: serde_json::Value,
    ) -> BenchRecord {
        let better = baseline.map(|_| {
            unit.better().unwrap_or_else(|| {
                panic!("{name}: a ratio of values in `{}` has no direction", unit.as_str())
            })
        });
        BenchRecord {
            name: name.to_owned(),
            value,
            unit,
            baseline: baseline.map(|(b, _)| b.to_owned()),
            ratio: baseline.map(|(_, r)| r),
            better,
            target: None,
            target_met: None,
            min: None,
            max: None,
            config,
        }
    }

    /// The same record with the smallest and largest of the runs whose median it holds.
    pub fn with_spread(mut self, runs: &[f64]) -> BenchRecord {
        self.min = runs.iter().copied().reduce(f64::min);
        self.max = runs.iter().copied().reduce(f64::max);
        self
    }

    /// The same record with its target and whether it was met.
    pub fn with_target(mut self, target: &str, met: bool) -> BenchRecord {
        self.target = Some(target.to_owned());
        self.target_met = Some(met);
        self
    }
}

/// The repeated samples of a record, where its configuration lists them (`samples`,
/// `samples_<unit>`, `runs_<unit>`, possibly per path: `{"verse": [...], ...}`), in the record's
/// unit, so that every table shows median [min, max].
fn samples(r: &BenchRecord) -> Option<Vec<f64>> {
    let obj = r.config.as_object()?;
    let (key, v) = obj.iter().find(|(k, _)| {
        k.as_str() == "samples" || k.starts_with("samples_") || k.starts_with("runs_")
    })?;
    // A ratio record (`a_vs_b`) holds the value of `a`.
    let subject = r.name.split("_vs_").next().unwrap_or(&r.name);
    let list = match v {
        serde_json::Value::Array(xs) => xs,
        serde_json::Value::Object(paths) => {
            paths.iter().find(|(p, _)| subject.ends_with(p.as_str()))?.1.as_array()?
        }
        _ => return None,
    };
    let scale = match (key.rsplit('_').next(), r.unit) {
        (Some("s"), Unit::Ms) => 1e3,
        _ => 1.0,
    };
    let xs: Vec<f64> = list.iter().filter_map(|x| x.as_f64()).map(|x| x * scale).collect();
    (!xs.is_empty()).then_some(xs)
}

/// Fills `min` and `max` from the samples in the configuration where a tier did not.
pub fn fill_spread(records: &mut [BenchRecord]) {
    for r in records.iter_mut().filter(|r| r.min.is_none()) {
        if let Some(xs) = samples(r) {
            r.min = xs.iter().copied().reduce(f64::min);
            r.max = xs.iter().copied().reduce(f64::max);
        }
    }
}

pub fn write(records: &[BenchRecord]) -> Result<()> {
    let dir = crate::out_dir();
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("results.json");
    let doc = serde_json::json!({ "records": records });
    fs::write(&path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The table as markdown, ready for the README: median [min, max] of the repeated runs, and for
/// a ratio which way is better.
pub fn table(records: &[BenchRecord]) -> String {
    let mut out = String::from(
        "| measurement | value: median [min, max] | baseline | ratio | better | target |\n",
    );
    out.push_str("|---|---:|---|---:|---|---|\n");
    for r in records {
        let ratio = r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default();
        let better = r.better.map(Better::as_str).unwrap_or_default();
        let target = match (&r.target, r.target_met) {
            (Some(t), Some(true)) => format!("{t} (met)"),
            (Some(t), _) => format!("{t} (**missed**)"),
            (None, _) => String::new(),
        };
        let spread = match (r.min, r.max) {
            (Some(lo), Some(hi)) => format!(" [{lo:.2}, {hi:.2}]"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "| {} | {:.2}{} {} | {} | {} | {} | {} |\n",
            r.name,
            r.value,
            spread,
            r.unit.as_str(),
            r.baseline.as_deref().unwrap_or(""),
            ratio,
            better,
            target
        ));
    }
    out
}

pub fn print_table(records: &[BenchRecord]) {
    print!("{}", table(records));
}

/// `target/bench/report.md`: the table, the plots, and where the configurations are.
pub fn write_report(records: &[BenchRecord], plots: &[String]) -> Result<()> {
    let path = crate::out_dir().join("report.md");
    let mut doc = String::from("# Verse benchmarks\n\n");
    doc.push_str(&format!(
        "Kernel {}; every ratio is the record's value over its baseline's, both in the record's \
         unit and measured in the same run; `better` says whether a higher or a lower ratio is \
         better. Configurations in `results.json`.\n\n",
        kernel_release()
    ));
    doc.push_str(&table(records));
    for p in plots {
        doc.push_str(&format!("\n![{p}]({p})\n"));
    }
    fs::write(&path, doc).with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
