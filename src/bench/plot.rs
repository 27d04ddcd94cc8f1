//! PNG plots of a report (plotters, bitmap backend): the latency percentile
//! curve, and throughput with latency over time. The font is compiled in,
//! so plotting needs no system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use super::report::Report;

const SIZE_PX: (u32, u32) = (960, 540);
/// The tail the percentile axis shows: 99.999 %.
const MAX_NINES: f64 = 5.0;

type PlotResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // Only fails on bytes that are not a font; these are DejaVu Sans.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Writes both plots into `dir`; returns their paths.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    register_font();
    std::fs::create_dir_all(dir)?;
    let curve = dir.join("latency-percentiles.png");
    let timeline = dir.join("timeline.png");
    percentiles(report, &curve)
        .map_err(|e| anyhow::anyhow!("plotting {}: {e}", curve.display()))?;
    over_time(report, &timeline)
        .map_err(|e| anyhow::anyhow!("plotting {}: {e}", timeline.display()))?;
    Ok((curve, timeline))
}

/// Percentile p as "nines": 90 % → 1, 99 % → 2, 99.9 % → 3.
fn nines(percentile: f64) -> f64 {
    (-(1.0 - percentile / 100.0).log10()).min(MAX_NINES)
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    format!("{}%", (p * 1000.0).round() / 1000.0)
}

/// A latency axis range (ms, log scale) that holds every value.
fn latency_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi == 0.0 {
        return 0.01..1.0;
    }
    (lo / 2.0).max(0.001)..hi * 2.0
}

fn percentiles(report: &Report, path: &Path) -> PlotResult<()> {
    let root = BitMapBackend::new(path, SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let points: Vec<(f64, f64)> = report
        .curve
        .iter()
        .filter(|(p, ms)| *p < 100.0 && *ms > 0.0)
        .map(|(p, ms)| (nines(*p), *ms))
        .collect();
    let title = format!(
        "Latency by percentile ({}, {:.0} orders/s achieved)",
        report.mode, report.achieved_rate
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0f64..MAX_NINES,
            latency_range(points.iter().map(|p| p.1)).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log)")
        .x_labels(6)
        .x_label_formatter(&nines_label)
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))?;
    root.present()?;
    Ok(())
}

fn over_time(report: &Report, path: &Path) -> PlotResult<()> {
    let root = BitMapBackend::new(path, SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE_PX.1 / 2);
    let seconds = report.timeline.len().max(1) as f64;
    let peak = report
        .timeline
        .iter()
        .map(|s| s.completed)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut rate = ChartBuilder::on(&top)
        .caption("Orders finished per second", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..peak * 1.1)?;
    rate.configure_mesh().y_desc("orders/s").draw()?;
    rate.draw_series(LineSeries::new(
        report
            .timeline
            .iter()
            .map(|s| (s.t_s as f64, s.completed as f64)),
        GREEN.stroke_width(2),
    ))?;

    let values = report.timeline.iter().flat_map(|s| [s.p50_ms, s.p99_ms]);
    let mut latency = ChartBuilder::on(&bottom)
        .caption(
            "Latency of the orders finished in each second",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, latency_range(values).log_scale())?;
    latency
        .configure_mesh()
        .x_desc("seconds since start (warm-up included)")
        .y_desc("ms (log)")
        .draw()?;
    for (name, color, pick) in [
        (
            "p50",
            BLUE,
            (|s: &super::report::Second| s.p50_ms) as fn(&_) -> f64,
        ),
        ("p99", RED, |s| s.p99_ms),
    ] {
        latency
            .draw_series(LineSeries::new(
                report
                    .timeline
                    .iter()
                    .filter(|s| s.completed > 0)
                    .map(|s| (s.t_s as f64, pick(s))),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    latency
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The percentile axis maps 90/99/99.9 % to 1/2/3 nines and back.
    #[test]
    fn nines_axis() {
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
        assert_eq!(nines_label(&3.0), "99.9%");
        assert_eq!(nines_label(&0.0), "0%");
    }
}
