//! Renderings of a [`GateOutcome`]: a plain table, JSON, JUnit XML, GitHub Actions
//! annotations and a Markdown summary for pull requests.

use serde::Serialize;

use super::{format_value, Bound, Check, GateOutcome, Verdict};

/// Version of the JSON rendering; bumped when a field changes meaning or disappears.
pub const SCHEMA: &str = "shrink.gate/1";

fn limit_text(check: &Check, ascii: bool) -> String {
    let op = match (check.bound, ascii) {
        (Bound::Max, true) => "<=",
        (Bound::Min, true) => ">=",
        (Bound::Max, false) => "≤",
        (Bound::Min, false) => "≥",
    };
    format!("{op} {}", format_value(&check.name, check.limit))
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
    }
}

/// A fixed-width table with one row per check, for a terminal.
pub fn table(outcome: &GateOutcome) -> String {
    let header = ["CHECK", "MEASURED", "LIMIT", "VERDICT", "DETAIL"];
    let rows: Vec<[String; 5]> = outcome
        .checks
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                format_value(&c.name, c.measured),
                limit_text(c, true),
                verdict_text(c.verdict).to_string(),
                // A row is one line: a newline in a detail would break the columns.
                c.detail.replace(['\r', '\n'], " "),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    out
}

#[derive(Serialize)]
struct JsonOutcome<'a> {
    schema: &'static str,
    passed: bool,
    model: &'a str,
    baseline_model: Option<&'a str>,
    warnings: &'a [String],
    checks: &'a [Check],
}

/// The outcome as pretty JSON (schema `shrink.gate/1`); non-finite numbers become `null`.
pub fn json(outcome: &GateOutcome) -> String {
    let view = JsonOutcome {
        schema: SCHEMA,
        passed: outcome.passed(),
        model: &outcome.model,
        baseline_model: outcome.baseline_model.as_deref(),
        warnings: &outcome.warnings,
        checks: &outcome.checks,
    };
    serde_json::to_string_pretty(&view).expect("gate outcome serialises") + "\n"
}

/// Escapes text for XML 1.0 content and attribute values. Characters XML 1.0 cannot carry at
/// all (most C0 controls) are replaced by U+FFFD; newlines and tabs in attributes become
/// character references, since attribute normalisation would otherwise turn them into spaces.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one test suite `shrink.gate`, one test case per check, `<failure>` for failures.
pub fn junit(outcome: &GateOutcome) -> String {
    let tests = outcome.checks.len();
    let failures = outcome.failures().count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"shrink\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\">\n"
    ));
    out.push_str(&format!(
        "  <testsuite name=\"shrink.gate\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\">\n"
    ));
    if !outcome.warnings.is_empty() {
        out.push_str("    <properties>\n");
        for w in &outcome.warnings {
            out.push_str(&format!(
                "      <property name=\"warning\" value=\"{}\"/>\n",
                xml_escape(w)
            ));
        }
        out.push_str("    </properties>\n");
    }
    for c in &outcome.checks {
        let name = xml_escape(&c.name);
        let classname = xml_escape(&format!("shrink.gate.{}", outcome.model));
        let summary = format!(
            "{}: measured {}, limit {}",
            c.name,
            format_value(&c.name, c.measured),
            limit_text(c, false)
        );
        match c.verdict {
            Verdict::Pass => out.push_str(&format!(
                "    <testcase classname=\"{classname}\" name=\"{name}\" time=\"0\">\n      <system-out>{}</system-out>\n    </testcase>\n",
                xml_escape(&format!("{summary}; {}", c.detail))
            )),
            Verdict::Fail => out.push_str(&format!(
                "    <testcase classname=\"{classname}\" name=\"{name}\" time=\"0\">\n      <failure message=\"{}\" type=\"budget\">{}</failure>\n    </testcase>\n",
                xml_escape(&summary),
                xml_escape(&c.detail)
            )),
        }
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// Escapes the message of a GitHub Actions workflow command.
fn gha_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// GitHub Actions workflow commands: `::error` for each failed check, `::notice` for each pass,
/// `::warning` for each warning.
pub fn github_annotations(outcome: &GateOutcome) -> String {
    let mut out = String::new();
    for w in &outcome.warnings {
        out.push_str(&format!("::warning title=shrink gate::{}\n", gha_data(w)));
    }
    for c in &outcome.checks {
        let level = match c.verdict {
            Verdict::Pass => "notice",
            Verdict::Fail => "error",
        };
        let msg = format!(
            "{} {} for model {}: measured {}, limit {}; {}",
            c.name,
            match c.verdict {
                Verdict::Pass => "passed",
                Verdict::Fail => "failed",
            },
            outcome.model,
            format_value(&c.name, c.measured),
            limit_text(c, false),
            c.detail
        );
        out.push_str(&format!(
            "::{level} title=shrink gate::{}\n",
            gha_data(&msg)
        ));
    }
    out
}

/// Escapes a Markdown table cell: pipes would split the cell, newlines would end the row.
fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\r', '\n'], " ")
}

/// A Markdown summary for a pull-request comment or a GitHub step summary.
pub fn markdown(outcome: &GateOutcome) -> String {
    let failures = outcome.failures().count();
    let mut out = if outcome.passed() {
        format!(
            "### ✅ shrink gate passed ({} checks)\n\n",
            outcome.checks.len()
        )
    } else {
        format!(
            "### ❌ shrink gate failed ({failures} of {} checks)\n\n",
            outcome.checks.len()
        )
    };
    match &outcome.baseline_model {
        Some(b) => out.push_str(&format!(
            "Model `{}` against baseline `{}`.\n\n",
            md_cell(&outcome.model),
            md_cell(b)
        )),
        None => out.push_str(&format!("Model `{}`.\n\n", md_cell(&outcome.model))),
    }
    out.push_str("| | Check | Measured | Limit | Detail |\n|---|---|---:|---:|---|\n");
    for c in &outcome.checks {
        let mark = match c.verdict {
            Verdict::Pass => "✅",
            Verdict::Fail => "❌",
        };
        out.push_str(&format!(
            "| {mark} | `{}` | {} | {} | {} |\n",
            md_cell(&c.name),
            md_cell(&format_value(&c.name, c.measured)),
            md_cell(&limit_text(c, false)),
            md_cell(&c.detail)
        ));
    }
    for w in &outcome.warnings {
        out.push_str(&format!("\n> ⚠️ {}\n", md_cell(w)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{Bound, Check, GateOutcome, Verdict};

    fn check(name: &str, measured: f64, limit: f64, verdict: Verdict, detail: &str) -> Check {
        Check {
            name: name.into(),
            measured,
            limit,
            bound: Bound::Max,
            verdict,
            detail: detail.into(),
            significance: None,
        }
    }

    fn outcome() -> GateOutcome {
        GateOutcome {
            model: "net<int8>".into(),
            baseline_model: Some("net".into()),
            warnings: vec!["threads differ: 4 vs 8".into()],
            checks: vec![
                check(
                    "size_bytes",
                    1000.0,
                    2000.0,
                    Verdict::Pass,
                    "within the limit",
                ),
                check(
                    "latency_regression_pct",
                    30.0,
                    10.0,
                    Verdict::Fail,
                    "ratio 1.300 > 1.100 & \"significant\" <p=1e-9>\nsecond | line",
                ),
            ],
        }
    }

    #[test]
    fn table_has_a_row_per_check_aligned() {
        let t = table(&outcome());
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("CHECK"));
        assert!(lines[1].starts_with("size_bytes") && lines[1].contains("PASS"));
        assert!(lines[2].starts_with("latency_regression_pct") && lines[2].contains("FAIL"));
        let col = |l: &str| l.find("<=").unwrap();
        assert_eq!(col(lines[1]), col(lines[2]), "{t}");
    }

    #[test]
    fn json_round_trips_and_states_passed() {
        let v: serde_json::Value = serde_json::from_str(&json(&outcome())).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["passed"], false);
        assert_eq!(v["checks"][1]["name"], "latency_regression_pct");
        assert_eq!(v["checks"][1]["verdict"], "fail");
        assert_eq!(v["checks"][0]["bound"], "max");
        assert_eq!(v["warnings"][0], "threads differ: 4 vs 8");
    }

    #[test]
    fn xml_escaping() {
        assert_eq!(
            xml_escape("a<b>&\"c\" 'd'"),
            "a&lt;b&gt;&amp;&quot;c&quot; &apos;d&apos;"
        );
        assert_eq!(xml_escape("x\ny\u{1}z"), "x&#10;y\u{FFFD}z");
        assert_eq!(xml_escape("µs ✅"), "µs ✅");
    }

    #[test]
    fn junit_structure() {
        let x = junit(&outcome());
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"));
        assert_eq!(x.matches("<testsuite ").count(), 1);
        assert!(x.contains("<testsuite name=\"shrink.gate\" tests=\"2\" failures=\"1\""));
        assert_eq!(x.matches("<testcase ").count(), 2);
        assert_eq!(x.matches("<failure ").count(), 1);
        assert!(
            x.contains("classname=\"shrink.gate.net&lt;int8&gt;\""),
            "{x}"
        );
        // The raw detail must not leak unescaped markup.
        assert!(!x.contains("<p=1e-9>"), "{x}");
        assert!(x.contains("&lt;p=1e-9&gt;"), "{x}");
        assert!(x.contains("&quot;significant&quot;"), "{x}");
        assert!(x.contains("<property name=\"warning\""), "{x}");
        assert!(x.trim_end().ends_with("</testsuites>"));
    }

    #[test]
    fn github_annotations_error_for_failures_notice_for_passes() {
        let a = github_annotations(&outcome());
        let lines: Vec<_> = a.lines().collect();
        assert_eq!(lines.len(), 3, "{a}");
        assert!(lines[0].starts_with("::warning title=shrink gate::"));
        assert!(lines[1].starts_with("::notice title=shrink gate::size_bytes passed"));
        assert!(lines[2].starts_with("::error title=shrink gate::latency_regression_pct failed"));
        // A newline inside a message must not end the workflow command.
        assert!(lines[2].contains("%0Asecond"), "{a}");
    }

    #[test]
    fn markdown_table_with_marks() {
        let m = markdown(&outcome());
        assert!(
            m.starts_with("### ❌ shrink gate failed (1 of 2 checks)"),
            "{m}"
        );
        let rows: Vec<_> = m.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 3, "{m}");
        assert!(rows[1].starts_with("| ✅ | `size_bytes` |"));
        assert!(rows[2].starts_with("| ❌ | `latency_regression_pct` |"));
        assert!(rows[2].contains("second \\| line"), "{m}");
        // Every row has the same number of unescaped cell separators.
        let seps = |r: &str| r.replace("\\|", "").matches('|').count();
        assert!(rows.iter().all(|r| seps(r) == 6), "{m}");
        assert!(m.contains("⚠️ threads differ"));
    }
}
