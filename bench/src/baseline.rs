//! The regression gate: `cargo xtask bench --check` compares this run's ratios with the stored
//! baseline (`bench/baseline.json`) and fails if one worsens by more than 15%;
//! `--save-baseline` stores this run's ratios as the new baseline.
//!
//! Ratios, not absolute values, because the machine is shared: a ratio compares two things
//! measured in the same run, so the noise of the day mostly cancels.
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::results::{BenchRecord, Better};

/// How much worse a ratio may get before the gate fails.
const TOLERANCE: f64 = 0.15;

fn path() -> PathBuf {
    crate::root().join("bench/baseline.json")
}

pub fn save(records: &[BenchRecord]) -> Result<()> {
    let ratios: BTreeMap<&str, f64> =
        records.iter().filter_map(|r| r.ratio.map(|x| (r.name.as_str(), x))).collect();
    let doc = serde_json::json!({ "tolerance": TOLERANCE, "ratios": ratios });
    fs::write(path(), serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {}", path().display()))?;
    eprintln!("wrote {}", path().display());
    Ok(())
}

pub fn check(records: &[BenchRecord]) -> Result<()> {
    let text = fs::read_to_string(path()).with_context(|| format!("read {}", path().display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).context("bench-baseline.json")?;
    let base = doc["ratios"].as_object().context("bench-baseline.json: `ratios`")?;
    let mut worse = Vec::new();
    let mut compared = 0;
    for r in records {
        let (Some(now), Some(then)) = (r.ratio, base.get(&r.name).and_then(|v| v.as_f64())) else {
            continue;
        };
        compared += 1;
        // How much worse, in the direction the record states.
        let change = match r.better {
            Some(Better::Higher) => then / now - 1.0,
            Some(Better::Lower) | None => now / then - 1.0,
        };
        if change > TOLERANCE {
            worse.push(format!(
                "{}: {now:.3}x, baseline {then:.3}x ({:+.0}%)",
                r.name,
                change * 100.0
            ));
        }
    }
    println!("bench --check: {compared} ratios compared with {}", path().display());
    if !worse.is_empty() {
        bail!(
            "{} ratio(s) worsened by more than {:.0}%:\n  {}",
            worse.len(),
            TOLERANCE * 100.0,
            worse.join("\n  ")
        );
    }
    println!("bench --check: no ratio worsened by more than {:.0}%", TOLERANCE * 100.0);
    Ok(())
}
