//! Bench reports as Markdown tables and a self-contained HTML page.

use super::report::{BenchReport, ModelReport};

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

fn kib(b: u64) -> String {
    if b >= 1 << 20 {
        mib(b)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

fn settings_line(r: &BenchReport) -> String {
    let s = &r.settings;
    format!(
        "backend {} ({}), target {}, {} thread(s), batch {}, {} warm-up + {} timed iterations, {} ({} cores)",
        s.backend, s.provider, s.target, s.threads, s.batch_size, s.warmup, s.iterations, s.cpu_model, s.cpu_cores
    )
}

/// A Markdown summary: one row per model, ratios against the first.
pub fn markdown(r: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!("**shrink bench** — {}\n\n", settings_line(r)));
    out.push_str("| model | size | weights | p50 ms | p95 ms | p99 ms | mean ± sd ms | throughput/s | top-1 | top-5 | agreement | peak RSS | p50 ratio | size ratio |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in &r.models {
        let l = &m.latency_ms;
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} ± {:.3} | {:.1} | {} | {} | {} | {} | {:.2}x | {:.2}x |\n",
            m.name,
            kib(m.size_bytes),
            kib(m.weight_bytes),
            l.p50,
            l.p95,
            l.p99,
            l.mean,
            l.stdev,
            m.throughput_per_s,
            pct(m.accuracy.as_ref().map(|a| a.top1)),
            pct(m.accuracy.as_ref().map(|a| a.top5)),
            pct(m.agreement.as_ref().map(|a| a.top1_agreement)),
            m.peak_rss_bytes.map(mib).unwrap_or_else(|| "–".into()),
            m.ratios.latency_p50,
            m.ratios.size,
        ));
    }
    out
}

/// Warnings the reader should see next to the numbers.
pub fn warnings(r: &BenchReport) -> Vec<String> {
    let mut w = Vec::new();
    for m in &r.models {
        if m.latency_ms.cv > 0.10 {
            w.push(format!(
                "{}: latency varies a lot (coefficient of variation {:.0}%); the machine is noisy, so compare medians and raise --iterations",
                m.name,
                m.latency_ms.cv * 100.0
            ));
        }
    }
    w
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG histogram of one model's latency samples.
fn histogram_svg(m: &ModelReport) -> String {
    let s = &m.latency_ms.samples;
    let (w, h, bins) = (520.0, 160.0, 40usize);
    if s.is_empty() {
        return String::new();
    }
    let (lo, hi) = (
        m.latency_ms.min,
        m.latency_ms.max.max(m.latency_ms.min + 1e-9),
    );
    let mut counts = vec![0usize; bins];
    for &v in s {
        let i = (((v - lo) / (hi - lo)) * bins as f64) as usize;
        counts[i.min(bins - 1)] += 1;
    }
    let max = *counts.iter().max().unwrap_or(&1) as f64;
    let bw = w / bins as f64;
    let mut bars = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let bh = (c as f64 / max) * (h - 30.0);
        bars.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a7bd0\"><title>{} samples</title></rect>",
            i as f64 * bw,
            h - 20.0 - bh,
            bw - 1.0,
            bh,
            c
        ));
    }
    let x_of = |v: f64| (v - lo) / (hi - lo) * w;
    let mut marks = String::new();
    for (label, v) in [
        ("p50", m.latency_ms.p50),
        ("p95", m.latency_ms.p95),
        ("p99", m.latency_ms.p99),
    ] {
        marks.push_str(&format!(
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"{y}\" stroke=\"#c0392b\" stroke-dasharray=\"3,2\"/><text x=\"{x:.1}\" y=\"10\" font-size=\"10\">{label}</text>",
            x = x_of(v),
            y = h - 20.0
        ));
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"latency distribution of {name}\">{bars}{marks}<text x=\"0\" y=\"{ty}\" font-size=\"11\">{lo:.3} ms</text><text x=\"{w}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{hi:.3} ms</text></svg>",
        name = escape(&m.name),
        ty = h - 5.0
    )
}

/// A self-contained HTML page (no external assets): settings, table and a chart per model.
pub fn html(r: &BenchReport) -> String {
    let mut rows = String::new();
    for m in &r.models {
        let l = &m.latency_ms;
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{:.2}x</td><td>{:.2}x</td></tr>",
            escape(&m.name),
            kib(m.size_bytes),
            l.p50,
            l.p95,
            l.p99,
            m.throughput_per_s,
            pct(m.accuracy.as_ref().map(|a| a.top1)),
            m.peak_rss_bytes.map(mib).unwrap_or_else(|| "–".into()),
            m.ratios.latency_p50,
            m.ratios.size
        ));
    }
    let mut charts = String::new();
    for m in &r.models {
        charts.push_str(&format!("<h3>{}</h3>{}", escape(&m.name), histogram_svg(m)));
    }
    let warn: String = warnings(r)
        .iter()
        .map(|w| format!("<p class=\"warn\">{}</p>", escape(w)))
        .collect();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>shrink bench</title><style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}.warn{{color:#a04000}}</style></head><body><h1>shrink bench</h1><p>{}</p>{}<table><tr><th>model</th><th>size</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>throughput/s</th><th>top-1</th><th>peak RSS</th><th>p50 ratio</th><th>size ratio</th></tr>{}</table><h2>Latency distribution</h2>{}</body></html>\n",
        escape(&settings_line(r)),
        warn,
        rows,
        charts
    )
}
