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

/// Stores this run's ratios: each row it measured replaces the stored one, the rows it did not
/// measure (other tiers, parts or scenarios) are kept, so that a run of one tier adds its rows
/// without dropping the others'.
pub fn save(records: &[BenchRecord]) -> Result<()> {
    let before = match fs::read_to_string(path()) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path().display())),
    };
    let ratios = merged(before.as_deref(), records)?;
    let doc = serde_json::json!({ "tolerance": TOLERANCE, "ratios": ratios });
    fs::write(path(), serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {}", path().display()))?;
    eprintln!("wrote {}", path().display());
    Ok(())
}

/// The stored ratios (`before`, a baseline file's text, if there is one) with this run's in
/// place of theirs.
fn merged(before: Option<&str>, records: &[BenchRecord]) -> Result<BTreeMap<String, f64>> {
    let mut ratios = before.map(stored).transpose()?.unwrap_or_default();
    ratios.extend(records.iter().filter_map(|r| r.ratio.map(|x| (r.name.clone(), x))));
    Ok(ratios)
}

/// The ratios of a baseline file's text.
fn stored(text: &str) -> Result<BTreeMap<String, f64>> {
    let doc: serde_json::Value = serde_json::from_str(text).context("bench/baseline.json")?;
    let base = doc["ratios"].as_object().context("bench/baseline.json: `ratios`")?;
    base.iter()
        .map(|(name, v)| {
            let x = v.as_f64().with_context(|| format!("bench/baseline.json: {name} is no number"));
            Ok((name.clone(), x?))
        })
        .collect()
}

pub fn check(records: &[BenchRecord]) -> Result<()> {
    let text = fs::read_to_string(path()).with_context(|| format!("read {}", path().display()))?;
    let base = stored(&text)?;
    let mut worse = Vec::new();
    let mut compared = 0;
    for r in records {
        let (Some(now), Some(&then)) = (r.ratio, base.get(&r.name)) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Unit;

    #[test]
    fn a_run_of_some_rows_replaces_those_and_keeps_the_others() {
        let before = r#"{"tolerance": 0.15, "ratios": {"micro_established": 2.6, "tcp_verse_one_host": 1.1}}"#;
        let run = [
            BenchRecord::new(
                "micro_established",
                80.0,
                Unit::NsPerPacket,
                Some(("floor", 3.0)),
                serde_json::json!({}),
            ),
            BenchRecord::new(
                "micro_established_ipv6",
                90.0,
                Unit::NsPerPacket,
                Some(("floor", 3.4)),
                serde_json::json!({}),
            ),
            BenchRecord::new("floor", 26.0, Unit::NsPerPacket, None, serde_json::json!({})),
        ];
        let got = merged(Some(before), &run).unwrap();
        let want: BTreeMap<String, f64> = [
            ("micro_established".to_owned(), 3.0),
            ("micro_established_ipv6".to_owned(), 3.4),
            ("tcp_verse_one_host".to_owned(), 1.1),
        ]
        .into();
        assert_eq!(got, want);
        assert_eq!(merged(None, &run).unwrap().len(), 2, "no file: this run's rows");
        assert!(merged(Some(r#"{"ratios": {"x": "y"}}"#), &run).is_err(), "a broken file is said");
    }
}
