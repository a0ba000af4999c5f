//! Inline SVG charts of the in-memory history: branches by state over the last hour,
//! and the mean cold-start and resume times per sampling interval. Plain strings,
//! drawn on the server, coloured by CSS classes so both themes apply.

use std::fmt::Write;

use crate::history::Sample;

/// The states in the order they are stacked and listed.
pub const STATES: [&str; 5] = ["provisioning", "starting", "ready", "suspended", "expiring"];

const W: f64 = 720.0;
const H: f64 = 180.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 10.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 10.0;
/// The x axis covers the history kept, between these bounds (seconds): a young
/// process is not drawn as a sliver at the right edge of an empty hour.
const MIN_SPAN: u64 = 600;
const MAX_SPAN: u64 = 3600;

/// How far back the x axis reaches.
fn span(samples: &[Sample], now: u64) -> u64 {
    let oldest = samples.first().map_or(now, |s| s.at);
    now.saturating_sub(oldest).clamp(MIN_SPAN, MAX_SPAN)
}

/// Branches by state: one line per state over the last hour, ending at `now`.
pub fn states(samples: &[Sample], now: u64) -> String {
    let max = samples
        .iter()
        .flat_map(|s| s.states.values().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let y_max = nice_ceiling(max as f64);
    let span = span(samples, now);
    let mut svg = frame("Branches by state", y_max, "", span);
    for state in STATES {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| (s.at, s.states.get(state).copied().unwrap_or(0) as f64))
            .map(|(at, v)| (x_of(at, now, span), y_of(v, y_max)))
            .collect();
        if points.iter().all(|&(_, y)| y == y_of(0.0, y_max)) {
            continue; // a state nobody was in stays off the chart (and its legend)
        }
        let _ = write!(
            svg,
            r#"<polyline class="line s-{state}" fill="none" points="{}"><title>{state}</title></polyline>"#,
            polyline(&points)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Mean cold-start and resume times (milliseconds) of each interval that had any.
pub fn timings(samples: &[Sample], now: u64) -> String {
    let max = samples
        .iter()
        .flat_map(|s| [s.cold_starts, s.resumes])
        .filter(|i| i.count > 0)
        .map(|i| i.mean_ms)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let y_max = nice_ceiling(max);
    let span = span(samples, now);
    let mut svg = frame("Cold-start and resume times (ms)", y_max, " ms", span);
    for (class, pick) in [
        ("cold", (|s: &Sample| s.cold_starts) as fn(&Sample) -> _),
        ("resume", |s: &Sample| s.resumes),
    ] {
        for s in samples {
            let i = pick(s);
            if i.count == 0 {
                continue;
            }
            let (x, y) = (x_of(s.at, now, span), y_of(i.mean_ms, y_max));
            let _ = write!(
                svg,
                r#"<circle class="dot {class}" cx="{x:.1}" cy="{y:.1}" r="4"><title>{} {}: {:.0} ms mean</title></circle>"#,
                i.count,
                if class == "cold" {
                    "cold start(s)"
                } else {
                    "resume(s)"
                },
                i.mean_ms
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The SVG element, its axes and their labels.
fn frame(label: &str, y_max: f64, unit: &str, span: u64) -> String {
    let mut svg =
        format!(r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{label}">"#);
    for frac in [0.0, 0.5, 1.0] {
        let y = y_of(y_max * frac, y_max);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{:.1}" y="{:.1}" text-anchor="end">{}{unit}</text>"#,
            W - RIGHT,
            LEFT - 4.0,
            y + 4.0,
            fmt_num(y_max * frac)
        );
    }
    for (frac, anchor) in [(1.0, "start"), (0.5, "middle"), (0.0, "end")] {
        let x = LEFT + (W - LEFT - RIGHT) * (1.0 - frac);
        let mins = (span as f64 * frac / 60.0).round();
        let text = if frac == 0.0 {
            "now".to_owned()
        } else {
            format!("-{mins} min")
        };
        let _ = write!(
            svg,
            r#"<text class="axis" x="{x:.1}" y="{:.1}" text-anchor="{anchor}">{text}</text>"#,
            H - 6.0
        );
    }
    svg
}

fn x_of(at: u64, now: u64, span: u64) -> f64 {
    let ago = now.saturating_sub(at) as f64;
    LEFT + (W - LEFT - RIGHT) * (1.0 - (ago / span as f64).min(1.0))
}

fn y_of(v: f64, y_max: f64) -> f64 {
    TOP + (H - TOP - BOTTOM) * (1.0 - v / y_max)
}

fn polyline(points: &[(f64, f64)]) -> String {
    points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The smallest of 1, 2, 5 × 10^n at or above `v`, so axis labels are round.
fn nice_ceiling(v: f64) -> f64 {
    let mut step = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if m * step >= v {
                return m * step;
            }
        }
        step *= 10.0;
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::history::Interval;

    fn sample(at: u64, ready: u64, cold_ms: Option<f64>) -> Sample {
        Sample {
            at,
            states: BTreeMap::from([("ready".to_owned(), ready)]),
            cold_starts: cold_ms.map_or(Interval::default(), |mean_ms| Interval {
                count: 1,
                mean_ms,
            }),
            resumes: Interval::default(),
        }
    }

    #[test]
    fn a_line_per_state_that_had_branches() {
        let svg = states(&[sample(3000, 0, None), sample(3600, 3, None)], 3600);
        assert!(svg.contains("s-ready"));
        assert!(!svg.contains("s-suspended"));
        // The newest point sits at the right edge, at the top (3 of 5 is below it).
        assert!(svg.contains(&format!("{:.1},", W - RIGHT)));
        // Ten minutes of axis for a history younger than that.
        assert!(svg.contains(">-10 min<"), "{svg}");
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn timings_draw_only_intervals_with_events() {
        let svg = timings(&[sample(10, 1, None), sample(20, 1, Some(180.0))], 20);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("180 ms mean"));
        assert!(svg.contains(">200 ms<"), "axis rounds up to 200: {svg}");
    }

    #[test]
    fn round_axis_maxima() {
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
    }
}
