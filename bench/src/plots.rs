//! PNG plots of the benchmark curves (plotters), next to `results.json`: what grows with the
//! number of rules and what does not.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::results::BenchRecord;

/// Debian's `fonts-dejavu-core` (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line of a plot: a label and the (rule count, value) points found among the records.
struct Series {
    label: &'static str,
    points: Vec<(f64, f64)>,
}

fn value(records: &[BenchRecord], name: &str) -> Option<f64> {
    records.iter().find(|r| r.name == name).map(|r| r.value)
}

fn series(records: &[BenchRecord], label: &'static str, names: &[(f64, String)]) -> Series {
    let points = names.iter().filter_map(|(x, n)| value(records, n).map(|v| (*x, v))).collect();
    Series { label, points }
}

/// Draws every plot for which the records hold data; returns the file names written.
pub fn draw(records: &[BenchRecord], dir: &Path) -> Result<Vec<String>> {
    let font = std::fs::read(FONT).with_context(|| format!("read {FONT}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let mut written = Vec::new();

    let rules = |prefix: &str, suffix: &str, ns: &[u64]| -> Vec<(f64, String)> {
        ns.iter().map(|n| (*n as f64, format!("{prefix}{n}{suffix}"))).collect()
    };
    // Micro tier: new flows against rules (1 .. 100k; IPv6 at 10 and 100k) and against
    // distinct CIDR prefixes (1 .. 100k), with the levels that do not depend on them.
    let level = |label, name: &str| Series {
        label,
        points: value(records, name).map(|v| vec![(1.0, v), (100_000.0, v)]).unwrap_or_default(),
    };
    let named = |label, prefix: &str, suffix: &str, xs: &[(f64, &str)]| {
        let names: Vec<(f64, String)> =
            xs.iter().map(|(x, n)| (*x, format!("{prefix}{n}{suffix}"))).collect();
        series(records, label, &names)
    };
    let micro = [
        named(
            "new flow vs rules",
            "micro_new_flow_",
            "_rules",
            &[(1.0, "1"), (10.0, "10"), (100.0, "100"), (1e3, "1k"), (1e4, "10k"), (1e5, "100k")],
        ),
        named(
            "new flow vs CIDR prefixes",
            "micro_new_flow_",
            "_cidrs",
            &[(1.0, "1"), (1e3, "1k"), (1e5, "100k")],
        ),
        named(
            "new flow vs rules, IPv6",
            "micro_new_flow_",
            "_rules_ipv6",
            &[(10.0, "10"), (1e5, "100k")],
        ),
        level("established flow", "micro_established"),
        level("established flow, IPv6", "micro_established_ipv6"),
        level("parse only (probe)", "micro_parse_only"),
        level("empty program (floor)", "micro_empty_program"),
    ];
    if plot(
        dir,
        "micro_rules.png",
        "from_endpoint: ns per packet vs rules / CIDR prefixes",
        "rules or CIDR prefixes",
        "ns/packet",
        &micro,
    )? {
        written.push("micro_rules.png".to_owned());
    }

    let n = [10, 1000, 10_000];
    let rate = [
        series(records, "Verse (from_underlay)", &rules("rate_verse_", "_rules", &n)),
        series(records, "nftables set", &rules("rate_nft_set_", "", &n)),
        series(records, "iptables-nft chain", &rules("rate_iptables_nft_", "", &n)),
        series(records, "iptables-legacy chain", &rules("rate_iptables_legacy_", "", &n)),
    ];
    if plot(dir, "rate_rules.png", "Denied traffic dropped: Mpps vs rules", "rules", "Mpps", &rate)?
    {
        written.push("rate_rules.png".to_owned());
    }

    let n = [1000, 10_000, 100_000];
    let control = [
        series(records, "Verse compile + map writes", &rules("control_verse_", "", &n)),
        series(records, "nft -f", &rules("control_nft_", "", &n)),
        series(records, "iptables-nft-restore", &rules("control_iptables_nft_", "", &n)),
        series(records, "iptables-legacy-restore", &rules("control_iptables_legacy_", "", &n)),
    ];
    if plot(dir, "control_rules.png", "Loading rules: ms vs rules", "rules", "ms", &control)? {
        written.push("control_rules.png".to_owned());
    }
    Ok(written)
}

/// One log-log plot; false (and no file) when no series has two points.
fn plot(
    dir: &Path,
    file: &str,
    title: &str,
    x_desc: &str,
    unit: &str,
    lines: &[Series],
) -> Result<bool> {
    let lines: Vec<&Series> = lines.iter().filter(|s| s.points.len() >= 2).collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let all = || lines.iter().flat_map(|s| s.points.iter());
    let (x0, x1) =
        (all().map(|p| p.0).fold(f64::MAX, f64::min), all().map(|p| p.0).fold(0.0, f64::max));
    let (y0, y1) =
        (all().map(|p| p.1).fold(f64::MAX, f64::min), all().map(|p| p.1).fold(0.0, f64::max));
    let path = dir.join(file);
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{file}: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.8..x1 * 1.25).log_scale(), (y0 * 0.5..y1 * 2.0).log_scale())
        .map_err(|e| anyhow!("{file}: {e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(unit)
        .draw()
        .map_err(|e| anyhow!("{file}: {e}"))?;
    for (i, s) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{file}: {e}"))?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow!("{file}: {e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{file}: {e}"))?;
    root.present().map_err(|e| anyhow!("{file}: {e}"))?;
    Ok(true)
}
