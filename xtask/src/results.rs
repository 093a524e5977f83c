//! Benchmark records and `target/bench/results.json` (format: shared/product.md, "Benchmarks"):
//! one record per measurement with `name`, `value`, `unit`, and, where it is compared with
//! something measured in the same run, the `baseline` name and the `ratio` value / baseline.
use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    pub name: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The goal this figure is held to (e.g. `>= 1.10x` of the ratio, `< 100 ms` of the value),
    /// and whether this run met it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// The exact configuration of the run.
    pub config: serde_json::Value,
}

impl BenchRecord {
    pub fn new(
        name: &str,
        value: f64,
        unit: &str,
        baseline: Option<(&str, f64)>,
        config: serde_json::Value,
    ) -> BenchRecord {
        BenchRecord {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: baseline.map(|(b, _)| b.to_owned()),
            ratio: baseline.map(|(_, r)| r),
            target: None,
            target_met: None,
            config,
        }
    }

    /// The same record with its target and whether it was met.
    pub fn with_target(mut self, target: &str, met: bool) -> BenchRecord {
        self.target = Some(target.to_owned());
        self.target_met = Some(met);
        self
    }
}

pub fn write(records: &[BenchRecord]) -> Result<()> {
    let dir = crate::root().join("target/bench");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("results.json");
    let doc = serde_json::json!({ "records": records });
    fs::write(&path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The table as markdown, ready for the README.
pub fn print_table(records: &[BenchRecord]) {
    println!("| measurement | value | baseline | ratio | target |");
    println!("|---|---:|---|---:|---|");
    for r in records {
        let ratio = r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default();
        let target = match (&r.target, r.target_met) {
            (Some(t), Some(true)) => format!("{t} (met)"),
            (Some(t), _) => format!("{t} (**missed**)"),
            (None, _) => String::new(),
        };
        println!(
            "| {} | {:.2} {} | {} | {} | {} |",
            r.name,
            r.value,
            r.unit,
            r.baseline.as_deref().unwrap_or(""),
            ratio,
            target
        );
    }
}
