//! Results: medians, ratios to native, and the table / JSON / CSV / SVG outputs.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

/// A result row (one number per target and repetition).
#[derive(Clone, Debug)]
pub(crate) struct RowInfo {
    /// Row name (profile, `profile:job` or workload).
    pub name: String,
    /// Unit of the values.
    pub unit: &'static str,
    /// "page-cache", "device" or "workload".
    pub kind: &'static str,
    /// True for rates, false for durations.
    pub higher_is_better: bool,
}

/// One measurement (or failure) of one row on one target.
#[derive(Clone, Debug)]
pub(crate) struct Measurement {
    /// Row name.
    pub row: String,
    /// Target name.
    pub target: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// The value, or the error that prevented it.
    pub value: Result<f64, String>,
}

/// Summary of one row on one target.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cell {
    /// Successful values.
    pub values: Vec<f64>,
    /// Median of `values`.
    pub median: Option<f64>,
    /// Performance relative to native (1.0 = as fast as native, 0.5 = half as fast).
    pub ratio: Option<f64>,
    /// Errors seen.
    pub errors: Vec<String>,
}

/// Everything a run produced.
pub(crate) struct Report {
    /// Rows in order.
    pub rows: Vec<RowInfo>,
    /// Target names and descriptions, native first.
    pub targets: Vec<(String, String)>,
    /// All measurements.
    pub measurements: Vec<Measurement>,
    /// Run configuration and machine description.
    pub config: Value,
}

/// The median (mean of the two middle values for even counts).
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

impl Report {
    /// Cells per row, per target (same order as `targets`).
    pub fn summarize(&self) -> Vec<Vec<Cell>> {
        self.rows
            .iter()
            .map(|row| {
                let mut cells: Vec<Cell> = self
                    .targets
                    .iter()
                    .map(|(t, _)| {
                        let mut cell = Cell::default();
                        for m in self.measurements.iter().filter(|m| m.row == row.name && &m.target == t) {
                            match &m.value {
                                Ok(v) => cell.values.push(*v),
                                Err(e) => cell.errors.push(e.clone()),
                            }
                        }
                        cell.median = median(&cell.values);
                        cell
                    })
                    .collect();
                let native = cells.first().and_then(|c| c.median);
                for cell in &mut cells {
                    cell.ratio = match (native, cell.median) {
                        (Some(n), Some(m)) if n > 0.0 && m > 0.0 => {
                            Some(if row.higher_is_better { m / n } else { n / m })
                        }
                        _ => None,
                    };
                }
                cells
            })
            .collect()
    }

    /// A Markdown table: median per target and, for non-native targets, the ratio to native.
    pub fn table(&self) -> String {
        let cells = self.summarize();
        let mut out = String::from("| row | unit | kind |");
        for (t, _) in &self.targets {
            let _ = write!(out, " {t} |");
        }
        out.push_str("\n|---|---|---|");
        for _ in &self.targets {
            out.push_str("---:|");
        }
        out.push('\n');
        for (row, cells) in self.rows.iter().zip(&cells) {
            let _ = write!(out, "| {} | {} | {} |", row.name, row.unit, row.kind);
            for (i, cell) in cells.iter().enumerate() {
                let text = match (cell.median, cell.ratio) {
                    (None, _) if !cell.errors.is_empty() => "error".to_owned(),
                    (None, _) => "-".to_owned(),
                    (Some(m), Some(r)) if i > 0 => format!("{} ({r:.2}x)", fmt_num(m)),
                    (Some(m), _) => fmt_num(m),
                };
                let flag = if cell.errors.is_empty() || cell.median.is_none() { "" } else { "*" };
                let _ = write!(out, " {text}{flag} |");
            }
            out.push('\n');
        }
        out
    }

    /// Distinct errors, one line each, for printing after the table.
    pub fn error_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        for m in &self.measurements {
            if let Err(e) = &m.value {
                let line = format!("{} on {}: {e}", m.row, m.target);
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
        }
        lines
    }

    /// Writes `results.json`, `results.csv` and `chart.svg` into `dir`.
    pub fn write_all(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("results.json"), serde_json::to_string_pretty(&self.to_json())? + "\n")?;
        fs::write(dir.join("results.csv"), self.to_csv())?;
        fs::write(dir.join("chart.svg"), self.to_svg())?;
        fs::write(dir.join("table.md"), self.table())?;
        Ok(())
    }

    /// The JSON document: configuration, summary per row and target, and raw measurements.
    pub fn to_json(&self) -> Value {
        let cells = self.summarize();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .zip(&cells)
            .map(|(row, cells)| {
                let results: serde_json::Map<String, Value> = self
                    .targets
                    .iter()
                    .zip(cells)
                    .map(|((t, _), c)| {
                        (
                            t.clone(),
                            json!({
                                "median": c.median,
                                "ratio_to_native": c.ratio,
                                "values": c.values,
                                "errors": c.errors,
                            }),
                        )
                    })
                    .collect();
                json!({
                    "name": row.name,
                    "unit": row.unit,
                    "kind": row.kind,
                    "higher_is_better": row.higher_is_better,
                    "results": results,
                })
            })
            .collect();
        let measurements: Vec<Value> = self
            .measurements
            .iter()
            .map(|m| match &m.value {
                Ok(v) => json!({"row": m.row, "target": m.target, "rep": m.rep, "value": v}),
                Err(e) => json!({"row": m.row, "target": m.target, "rep": m.rep, "error": e}),
            })
            .collect();
        let targets: Vec<Value> = self.targets.iter().map(|(n, d)| json!({"name": n, "description": d})).collect();
        json!({
            "config": self.config,
            "targets": targets,
            "ratio_definition": "performance relative to native: median/native for rates, native/median for durations; 1.0 = native speed",
            "rows": rows,
            "measurements": measurements,
        })
    }

    /// CSV with one line per row and target.
    pub fn to_csv(&self) -> String {
        let cells = self.summarize();
        let mut out = String::from("row,unit,kind,target,median,min,max,n,ratio_to_native,errors\n");
        for (row, cells) in self.rows.iter().zip(&cells) {
            for ((t, _), c) in self.targets.iter().zip(cells) {
                let min = c.values.iter().copied().reduce(f64::min);
                let max = c.values.iter().copied().reduce(f64::max);
                let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&row.name),
                    row.unit,
                    row.kind,
                    csv_field(t),
                    opt(c.median),
                    opt(min),
                    opt(max),
                    c.values.len(),
                    opt(c.ratio),
                    c.errors.len()
                );
            }
        }
        out
    }

    /// A horizontal grouped bar chart of ratio-to-native, one group per row, one bar per
    /// non-native target, with a line at 1.0 (native).
    pub fn to_svg(&self) -> String {
        const PALETTE: [&str; 8] =
            ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];
        let cells = self.summarize();
        let others: Vec<usize> = (1..self.targets.len()).collect();
        let bar_h = 10.0;
        let group_h = (others.len().max(1) as f64) * bar_h + 8.0;
        let (left, right, top) = (190.0, 70.0, 60.0 + 16.0 * others.len().div_ceil(4) as f64);
        let width = 900.0;
        let plot_w = width - left - right;
        let height = top + group_h * self.rows.len() as f64 + 40.0;
        let max_ratio = cells.iter().flatten().filter_map(|c| c.ratio).fold(1.0_f64, f64::max);
        let xmax = (max_ratio.min(4.0) * 1.1 * 4.0).ceil() / 4.0;
        let x = |r: f64| left + plot_w * (r.min(xmax) / xmax);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" font-size="14" font-weight="bold">ringfs benchmark: performance relative to native (median; 1.0 = native)</text>"#,
            left - 150.0
        );
        for (k, &t) in others.iter().enumerate() {
            let lx = left + (k % 4) as f64 * 170.0;
            let ly = 34.0 + (k / 4) as f64 * 16.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="{}" width="12" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                ly - 9.0,
                PALETTE[k % PALETTE.len()],
                lx + 16.0,
                ly,
                xml_escape(&self.targets[t].0)
            );
        }
        // Grid.
        let mut tick = 0.0;
        while tick <= xmax + 1e-9 {
            let gx = x(tick);
            let style = if (tick - 1.0_f64).abs() < 1e-9 {
                r##"stroke="#333" stroke-dasharray="4 2""##
            } else {
                r##"stroke="#ddd""##
            };
            let _ = writeln!(
                s,
                r#"<line x1="{gx}" y1="{}" x2="{gx}" y2="{}" {style}/><text x="{gx}" y="{}" text-anchor="middle">{tick:.2}</text>"#,
                top - 4.0,
                height - 30.0,
                height - 18.0
            );
            tick += if xmax > 2.0 { 0.5 } else { 0.25 };
        }
        for (i, (row, cells)) in self.rows.iter().zip(&cells).enumerate() {
            let gy = top + i as f64 * group_h;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{} ({})</text>"#,
                left - 6.0,
                gy + group_h / 2.0 + 3.0,
                xml_escape(&row.name),
                xml_escape(row.kind)
            );
            for (k, &t) in others.iter().enumerate() {
                let by = gy + 4.0 + k as f64 * bar_h;
                let color = PALETTE[k % PALETTE.len()];
                match cells[t].ratio {
                    Some(r) => {
                        let w = (x(r) - left).max(0.5);
                        let label = if r > xmax { format!("{r:.2}x >") } else { format!("{r:.2}x") };
                        let _ = writeln!(
                            s,
                            r#"<rect x="{left}" y="{by}" width="{w:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="8">{label}</text>"#,
                            bar_h - 1.0,
                            left + w + 3.0,
                            by + bar_h - 2.0
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            r#"<text x="{}" y="{:.1}" font-size="8" fill="{color}">{}</text>"#,
                            left + 3.0,
                            by + bar_h - 2.0,
                            if cells[t].errors.is_empty() { "no data" } else { "error" }
                        );
                    }
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let m =
            |row: &str, target: &str, rep, value| Measurement { row: row.into(), target: target.into(), rep, value };
        Report {
            rows: vec![
                RowInfo { name: "seq".into(), unit: "MiB/s", kind: "page-cache", higher_is_better: true },
                RowInfo { name: "untar".into(), unit: "s", kind: "workload", higher_is_better: false },
            ],
            targets: vec![("native".into(), "n".into()), ("a,b".into(), "x".into())],
            measurements: vec![
                m("seq", "native", 1, Ok(100.0)),
                m("seq", "native", 2, Ok(300.0)),
                m("seq", "native", 3, Ok(200.0)),
                m("seq", "a,b", 1, Ok(50.0)),
                m("untar", "native", 1, Ok(2.0)),
                m("untar", "a,b", 1, Ok(4.0)),
                m("untar", "a,b", 2, Err("boom".into())),
            ],
            config: json!({}),
        }
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        let cells = sample().summarize();
        assert_eq!(cells[0][0].median, Some(200.0));
        assert_eq!(cells[0][1].ratio, Some(0.25));
        assert_eq!(cells[1][1].ratio, Some(0.5));
        assert_eq!(cells[1][1].errors.len(), 1);
    }

    #[test]
    fn outputs_are_well_formed() {
        let r = sample();
        let csv = r.to_csv();
        assert!(csv.starts_with("row,unit,kind,target,median"));
        assert!(csv.contains("\"a,b\""));
        assert!(r.to_svg().starts_with("<svg"));
        let v: Value = serde_json::from_str(&r.to_json().to_string()).unwrap();
        assert_eq!(v["rows"][0]["results"]["native"]["median"], 200.0);
        assert!(r.table().contains("(0.25x)"));
        assert_eq!(r.error_lines().len(), 1);
    }
}
