//! Hand-written SVG charts for the report: line charts (training curves), bar charts
//! (histograms, per-class accuracy, stacked kept/dropped), horizontal bar charts
//! (ablation deltas, ensemble weights) and heat maps (confusion), each with axes, ticks,
//! labels and a legend. Plain strings, no dependency: the charts are few and simple,
//! and the page must make no request, so nothing is loaded from anywhere.

use std::fmt::Write;

/// Colours of series, in order (Observable's categorical palette: distinct for the
/// common colour-blindness types).
pub const PALETTE: [&str; 8] = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5"];
pub const GREY: &str = "#9498a0";

const W: f64 = 640.0;
const H: f64 = 260.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 46.0;

/// Text made safe inside XML/HTML (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// A number as a tick label: few digits, no trailing zeros.
pub fn num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    let s = if a >= 1e5 || a < 1e-3 {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if s.contains('.') && !s.contains('e') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// "Nice" ticks covering [lo, hi] (Heckbert's labelling): 1, 2 or 5 times a power of ten.
pub fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return vec![0.0];
    }
    let (lo, hi) = if hi - lo < 1e-12 { (lo - 0.5f64.max(lo.abs() * 0.1), hi + 0.5f64.max(hi.abs() * 0.1)) } else { (lo, hi) };
    let raw = (hi - lo) / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let mut t = Vec::new();
    let mut v = start;
    while v <= hi + step * 0.5 && t.len() < 50 {
        t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    t
}

/// A y axis: linear or log10, mapping data values to pixels.
#[derive(Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    px_lo: f64,
    px_hi: f64,
}

impl Scale {
    fn at(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log { (v.max(self.lo).log10(), self.lo.log10(), self.hi.log10()) } else { (v, self.lo, self.hi) };
        let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        self.px_lo + t * (self.px_hi - self.px_lo)
    }
}

fn y_scale(values: impl Iterator<Item = f64>, log: bool, zero: bool) -> (Scale, Vec<f64>) {
    let vals: Vec<f64> = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).collect();
    let (mut lo, mut hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    if vals.is_empty() {
        (lo, hi) = if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        return (Scale { lo, hi, log: true, px_lo: H - BOTTOM, px_hi: TOP }, t);
    }
    if zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    let t = ticks(lo, hi, 5);
    let (lo, hi) = (t.first().copied().unwrap_or(lo).min(lo), t.last().copied().unwrap_or(hi).max(hi));
    (Scale { lo, hi, log: false, px_lo: H - BOTTOM, px_hi: TOP }, t)
}

fn open(s: &mut String, title: &str, height: f64) {
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = esc(title)
    );
    let _ = write!(s, r#"<text x="{LEFT}" y="14" class="ct">{}</text>"#, esc(title));
}

fn y_axis(s: &mut String, sc: &Scale, ticks: &[f64], label: &str, x_right: f64, fmt: &dyn Fn(f64) -> String) {
    for &t in ticks {
        let y = sc.at(t);
        let _ = write!(
            s,
            r#"<line x1="{LEFT}" x2="{x_right}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{}" y="{:.1}" class="tk" text-anchor="end">{}</text>"#,
            LEFT - 5.0,
            y + 3.5,
            esc(&fmt(t))
        );
    }
    let _ = write!(s, r#"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" class="ax"/>"#, H - BOTTOM);
    let cy = (TOP + H - BOTTOM) / 2.0;
    let _ = write!(s, r#"<text transform="translate(14 {cy:.1}) rotate(-90)" class="al" text-anchor="middle">{}</text>"#, esc(label));
}

fn x_label(s: &mut String, label: &str) {
    let _ = write!(s, r#"<line x1="{LEFT}" x2="{}" y1="{}" y2="{}" class="ax"/>"#, W - RIGHT, H - BOTTOM, H - BOTTOM);
    let _ = write!(s, r#"<text x="{:.1}" y="{}" class="al" text-anchor="middle">{}</text>"#, (LEFT + W - RIGHT) / 2.0, H - 8.0, esc(label));
}

fn legend(s: &mut String, items: &[(String, &str)]) {
    // One row under the title, left-aligned with the plot.
    let mut x = LEFT;
    for (name, colour) in items {
        let _ =
            write!(s, r#"<rect x="{x:.1}" y="21" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="30" class="tk">{}</text>"#, x + 14.0, esc(name));
        x += 6.5 * name.chars().count() as f64 + 30.0;
    }
}

/// One line of a line chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines over a numeric x axis (epochs), with dots at the points.
pub fn line_chart(title: &str, x_name: &str, y_name: &str, series: &[Series], y_log: bool, y_fmt: &dyn Fn(f64) -> String) -> String {
    let mut s = String::new();
    open(&mut s, title, H);
    let xs = series.iter().flat_map(|x| x.points.iter().map(|p| p.0));
    let (xlo, xhi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (xlo, xhi) = if xlo.is_finite() { (xlo, xhi) } else { (0.0, 1.0) };
    let xsc = Scale { lo: xlo, hi: if xhi > xlo { xhi } else { xlo + 1.0 }, log: false, px_lo: LEFT + 8.0, px_hi: W - RIGHT - 8.0 };
    let (ysc, yt) = y_scale(series.iter().flat_map(|x| x.points.iter().map(|p| p.1)), y_log, false);
    y_axis(&mut s, &ysc, &yt, y_name, W - RIGHT, y_fmt);
    x_label(&mut s, x_name);
    let xt: Vec<f64> = ticks(xsc.lo, xsc.hi, 8).into_iter().filter(|t| *t >= xsc.lo - 1e-9 && *t <= xsc.hi + 1e-9 && t.fract() == 0.0).collect();
    for t in xt {
        x_tick(&mut s, xsc.at(t), &num(t));
    }
    for (i, se) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = se.points.iter().filter(|p| p.1.is_finite() && (!y_log || p.1 > 0.0)).map(|p| (xsc.at(p.0), ysc.at(p.1))).collect();
        let d: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, d.join(" "));
        if pts.len() <= 60 {
            for ((x, y), p) in pts.iter().zip(se.points.iter().filter(|p| p.1.is_finite() && (!y_log || p.1 > 0.0))) {
                let _ = write!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{colour}"><title>{} {}: {}</title></circle>"#,
                    esc(&se.name),
                    num(p.0),
                    esc(&y_fmt(p.1))
                );
            }
        }
    }
    if series.len() > 1 {
        legend(&mut s, &series.iter().enumerate().map(|(i, x)| (x.name.clone(), PALETTE[i % PALETTE.len()])).collect::<Vec<_>>());
    }
    s.push_str("</svg>");
    s
}

/// One bar of a vertical bar chart: stacked segments (value, colour), bottom first.
pub struct Bar {
    pub label: String,
    pub segments: Vec<(f64, &'static str)>,
    /// Tooltip.
    pub note: String,
}

/// Vertical (stacked) bars. With many bars the labels give way to rank ticks.
pub fn bar_chart(
    title: &str,
    x_name: &str,
    y_name: &str,
    bars: &[Bar],
    y_log: bool,
    legend_items: &[(String, &'static str)],
    y_fmt: &dyn Fn(f64) -> String,
) -> String {
    let mut s = String::new();
    open(&mut s, title, H);
    let totals = bars.iter().map(|b| b.segments.iter().map(|x| x.0.max(0.0)).sum::<f64>());
    let (ysc, yt) = y_scale(totals.chain(std::iter::once(if y_log { 1.0 } else { 0.0 })), y_log, true);
    y_axis(&mut s, &ysc, &yt, y_name, W - RIGHT, y_fmt);
    x_label(&mut s, x_name);
    let n = bars.len().max(1);
    let span = W - RIGHT - LEFT - 4.0;
    let slot = span / n as f64;
    let gap = if slot > 4.0 { slot * 0.15 } else { 0.0 };
    let labelled = n <= 24;
    for (i, b) in bars.iter().enumerate() {
        let x = LEFT + 2.0 + i as f64 * slot;
        let mut acc = 0.0;
        let _ = write!(s, "<g><title>{}</title>", esc(&if b.note.is_empty() { b.label.clone() } else { format!("{}: {}", b.label, b.note) }));
        for &(v, colour) in &b.segments {
            let v = v.max(0.0);
            if v <= 0.0 {
                continue;
            }
            let base = if y_log && acc <= 0.0 { ysc.lo } else { acc };
            let (y0, y1) = (ysc.at(base), ysc.at(acc + v));
            acc += v;
            let _ = write!(
                s,
                r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{colour}"/>"#,
                x + gap / 2.0,
                y1,
                (slot - gap).max(0.5),
                (y0 - y1).max(0.0)
            );
        }
        s.push_str("</g>");
        let cx = x + slot / 2.0;
        if labelled {
            let short: String = b.label.chars().take(14).collect();
            let _ = write!(s, r#"<text transform="translate({cx:.1} {}) rotate(-30)" class="tk" text-anchor="end">{}</text>"#, H - BOTTOM + 12.0, esc(&short));
        }
    }
    if !labelled {
        // Rank ticks: 1 and a few round positions.
        for t in ticks(1.0, n as f64, 8).into_iter().filter(|t| *t >= 1.0 && *t <= n as f64) {
            x_tick(&mut s, LEFT + 2.0 + (t - 0.5) * slot, &num(t));
        }
    }
    if !legend_items.is_empty() {
        legend(&mut s, legend_items);
    }
    s.push_str("</svg>");
    s
}

/// Horizontal bars, one labelled row each, around a zero line (values may be negative:
/// the ablation's change against its first row).
pub fn hbar_chart(title: &str, value_name: &str, rows: &[(String, f64, &'static str)], v_fmt: &dyn Fn(f64) -> String) -> String {
    let row_h = 22.0;
    let label_w = 250.0;
    let height = TOP + rows.len() as f64 * row_h + 40.0;
    let mut s = String::new();
    open(&mut s, title, height);
    let vals = rows.iter().map(|r| r.1).filter(|v| v.is_finite());
    let (lo, hi) = vals.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let t = ticks(lo, if hi > lo { hi } else { lo + 1.0 }, 6);
    let (lo, hi) = (t.first().copied().unwrap_or(lo).min(lo), t.last().copied().unwrap_or(hi).max(hi));
    let x0 = label_w + 8.0;
    let x1 = W - RIGHT - 40.0;
    let at = |v: f64| x0 + if hi > lo { (v - lo) / (hi - lo) } else { 0.5 } * (x1 - x0);
    let bottom = TOP + rows.len() as f64 * row_h;
    for &tv in &t {
        let x = at(tv);
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{bottom}" class="grid"/><text x="{x:.1}" y="{}" class="tk" text-anchor="middle">{}</text>"#,
            bottom + 14.0,
            esc(&v_fmt(tv))
        );
    }
    let zx = at(0.0);
    for (i, (label, v, colour)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        let short: String = label.chars().take(40).collect();
        let _ = write!(s, r#"<text x="{label_w}" y="{:.1}" class="tk" text-anchor="end">{}</text>"#, y + row_h * 0.65, esc(&short));
        if v.is_finite() {
            let (a, b) = if *v >= 0.0 { (zx, at(*v)) } else { (at(*v), zx) };
            let _ = write!(
                s,
                r#"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {}</title></rect><text x="{:.1}" y="{:.1}" class="tk">{}</text>"#,
                y + 4.0,
                (b - a).max(0.5),
                row_h - 8.0,
                esc(label),
                esc(&v_fmt(*v)),
                b.max(zx) + 4.0,
                y + row_h * 0.65,
                esc(&v_fmt(*v))
            );
        }
    }
    let _ = write!(s, r#"<line x1="{zx:.1}" x2="{zx:.1}" y1="{TOP}" y2="{bottom}" class="ax"/>"#);
    let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" class="al" text-anchor="middle">{}</text>"#, (x0 + x1) / 2.0, bottom + 32.0, esc(value_name));
    s.push_str("</svg>");
    s
}

/// A heat map of a square matrix (row = true class, column = predicted), cells shaded by
/// value / max of the off-diagonal (the diagonal would otherwise drown every confusion).
pub fn heatmap(title: &str, labels: &[String], m: &[Vec<f64>]) -> String {
    let n = labels.len().max(1);
    let cell = (360.0 / n as f64).clamp(6.0, 24.0);
    let label_w = 110.0;
    let size = cell * n as f64;
    let width = label_w + size + 20.0;
    let height = TOP + size + label_w;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{t}"><title>{t}</title><text x="4" y="16" class="ct">{t}</text>"#,
        t = esc(title)
    );
    let max_off = m.iter().enumerate().flat_map(|(i, r)| r.iter().enumerate().filter(move |(j, _)| *j != i).map(|(_, v)| *v)).fold(0.0f64, f64::max);
    for (i, row) in m.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let shade = if i == j {
                0.0
            } else if max_off > 0.0 {
                v / max_off
            } else {
                0.0
            };
            let fill = if i == j { if v > 0.0 { "#dfe7f7".to_string() } else { "#f4f4f4".to_string() } } else { format!("rgba(214,39,40,{shade:.3})") };
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{cell:.1}" height="{cell:.1}" fill="{fill}" stroke="#fff" stroke-width="0.5"><title>true {} → predicted {}: {}</title></rect>"##,
                label_w + j as f64 * cell,
                TOP + i as f64 * cell,
                esc(labels.get(i).map(String::as_str).unwrap_or("?")),
                esc(labels.get(j).map(String::as_str).unwrap_or("?")),
                num(v)
            );
        }
    }
    let fs = (cell * 0.8).min(11.0);
    for (i, l) in labels.iter().enumerate() {
        let short: String = l.chars().take(16).collect();
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" class="tk" font-size="{fs:.1}" text-anchor="end">{}</text>"#,
            label_w - 3.0,
            TOP + (i as f64 + 0.75) * cell,
            esc(&short)
        );
        let _ = write!(
            s,
            r#"<text transform="translate({:.1} {:.1}) rotate(-60)" class="tk" font-size="{fs:.1}" text-anchor="end">{}</text>"#,
            label_w + (i as f64 + 0.6) * cell,
            TOP + size + 4.0,
            esc(&short)
        );
    }
    let _ = write!(s, r#"<text transform="translate(10 {:.1}) rotate(-90)" class="al" text-anchor="middle">true class</text>"#, TOP + size / 2.0);
    let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" class="al" text-anchor="middle">predicted class</text>"#, label_w + size / 2.0, height - 4.0);
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let t = ticks(3.0, 97.0, 5);
        assert!(t[0] <= 3.0 && *t.last().unwrap() >= 97.0 && t.len() <= 8);
        assert!(!ticks(5.0, 5.0, 5).is_empty());
        assert_eq!(ticks(f64::NAN, 1.0, 5), vec![0.0]);
    }

    #[test]
    fn charts_escape_names_and_survive_empty_or_odd_data() {
        let c = line_chart("a<b", "epoch", "loss", &[Series { name: "x\"y".into(), points: vec![(1.0, f64::NAN), (2.0, 0.5)] }], false, &|v| num(v));
        assert!(c.contains("a&lt;b") && !c.contains("a<b") && c.ends_with("</svg>"));
        let e = line_chart("empty", "x", "y", &[], true, &|v| num(v));
        assert!(e.ends_with("</svg>") && !e.contains("NaN"));
        let b = bar_chart("b", "rank", "n", &[], true, &[], &|v| num(v));
        assert!(b.ends_with("</svg>") && !b.contains("NaN"));
        let h = hbar_chart("h", "d", &[("r".into(), -1.5, PALETTE[0]), ("s".into(), f64::NAN, PALETTE[1])], &|v| num(v));
        assert!(!h.contains("NaN") && !h.contains("inf"));
    }

    #[test]
    fn numbers_print_short() {
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(120.0), "120");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(0.0001), "1.0e-4");
    }
}

/// A tick on the x axis at pixel `x`, with its label under it.
fn x_tick(s: &mut String, x: f64, label: &str) {
    let _ = write!(
        s,
        r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" class="ax"/><text x="{x:.1}" y="{}" class="tk" text-anchor="middle">{label}</text>"#,
        H - BOTTOM,
        H - BOTTOM + 4.0,
        H - BOTTOM + 16.0
    );
}
