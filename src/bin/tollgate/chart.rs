//! `--chart`: each limit's use over time against its maximum, as SVG text.

use std::fmt::Write as _;

/// Most points a series keeps: past it, neighbours merge (keeping the
/// higher use), so memory stays bounded however long the log.
const MAX_POINTS: usize = 512;

/// Most panels drawn: the limits that came closest to their maximum.
const MAX_PANELS: usize = 12;

/// One limit's use over time.
#[derive(Debug, Clone)]
pub struct Series {
    /// `scope meter (window)`.
    pub label: String,
    /// Money scale of the meter, for money.
    pub scale: Option<u32>,
    /// `(Unix ms, use)`, in time order of the log.
    pub points: Vec<(i64, u64)>,
    /// The maximum last seen.
    pub max: Option<u64>,
    /// The highest use seen.
    pub peak: u64,
}

impl Series {
    /// An empty series.
    pub fn new(label: String, scale: Option<u32>) -> Self {
        Self {
            label,
            scale,
            points: Vec::new(),
            max: None,
            peak: 0,
        }
    }

    /// Add a point.
    pub fn push(&mut self, ts: i64, used: u64, max: Option<u64>) {
        self.max = max;
        self.peak = self.peak.max(used);
        self.points.push((ts, used));
        if self.points.len() >= MAX_POINTS * 2 {
            let merged: Vec<(i64, u64)> = self
                .points
                .chunks(2)
                .map(|c| (c[c.len() - 1].0, c.iter().map(|p| p.1).max().unwrap_or(0)))
                .collect();
            self.points = merged;
        }
    }

    /// How close it came to its maximum, in 0..=1 (0 when unlimited).
    fn fill(&self) -> f64 {
        match self.max {
            Some(0) => 1.0,
            Some(m) => self.peak as f64 / m as f64,
            None => 0.0,
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn amount(v: u64, scale: Option<u32>) -> String {
    match scale {
        Some(s) => rust_decimal::Decimal::from_i128_with_scale(i128::from(v), s)
            .normalize()
            .to_string(),
        None => v.to_string(),
    }
}

/// The chart of `series` over `[from, to]` (Unix ms): one panel per limit,
/// the limits nearest their maximum first, each with its use as a line and
/// its maximum as a dashed red line.
pub fn svg(series: &[Series], from: i64, to: i64) -> String {
    let mut order: Vec<&Series> = series.iter().collect();
    order.sort_by(|a, b| b.fill().total_cmp(&a.fill()).then(a.label.cmp(&b.label)));
    order.truncate(MAX_PANELS);
    let (w, ph, pad) = (800.0_f64, 160.0_f64, 40.0_f64);
    let height = pad + order.len() as f64 * (ph + pad);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let span = (to - from).max(1) as f64;
    for (i, s) in order.iter().enumerate() {
        let top = pad + i as f64 * (ph + pad);
        let (left, right) = (60.0, w - 20.0);
        let ceiling = s.max.unwrap_or(0).max(s.peak).max(1) as f64;
        let x = |t: i64| left + (t - from) as f64 / span * (right - left);
        let y = |v: u64| top + ph - v as f64 / ceiling * ph;
        let max_text = s.max.map_or("unlimited".to_owned(), |m| amount(m, s.scale));
        let _ = writeln!(
            out,
            r#"<text x="{left}" y="{}">{} — peak {} of {}</text>"#,
            top - 6.0,
            esc(&s.label),
            amount(s.peak, s.scale),
            esc(&max_text)
        );
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{top}" width="{}" height="{ph}" fill="none" stroke="#ccc"/>"##,
            right - left
        );
        if let Some(m) = s.max {
            let my = y(m);
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{my:.1}" x2="{right}" y2="{my:.1}" stroke="#c00" stroke-dasharray="4 3"/>"##
            );
        }
        let mut d = String::new();
        for (j, &(t, v)) in s.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                x(t),
                y(v)
            );
        }
        let _ = writeln!(
            out,
            r##"<path d="{d}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>"##
        );
    }
    out.push_str("</svg>\n");
    out
}
