//! `flava report RUN_DIR`: one self-contained HTML page of a run (no network at view time):
//! its configuration, curves per loss and task, learning rate, gradient norm and throughput,
//! the evaluation table beside chance levels, the zero-shot confusion matrix, retrieval examples
//! (query image and its top captions), MIM targets with dVAE reconstructions, and BEiT mask
//! previews. Figures are inline SVG and PNG data URIs.
//!
//! The page is built from the run directory's files: `config.toml` (or `dvae_config.json`),
//! `metrics.jsonl`, `eval.json`, and `report_data.json` (the examples, which need the model: the
//! end of `flava pretrain` writes it). `flava pretrain` and `flava finetune` write
//! `report.html` when they finish; `flava report` rebuilds it from the files.

pub mod charts;
pub mod examples;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::eval::EvalReport;

/// The report's file name in the run directory.
pub const REPORT_FILE: &str = "report.html";
/// The examples' file name in the run directory.
pub const DATA_FILE: &str = "report_data.json";

/// Figures that need the model, computed at the end of a run (`report_data.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    /// The zero-shot confusion matrix.
    pub confusion: Option<Confusion>,
    /// Retrieval queries with their top captions.
    pub retrieval: Vec<RetrievalShown>,
    /// Held-out images with their MIM targets, reconstructions and masks.
    pub mim: Vec<MimShown>,
    /// What could not be shown, and why.
    pub notes: Vec<String>,
}

/// `counts[label][predicted]` over `classes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    /// Class names (the most frequent ones when there are many).
    pub classes: Vec<String>,
    /// Images per (true class, predicted class).
    pub counts: Vec<Vec<u32>>,
    /// Classes left out of the matrix (there were more than [`MAX_CONFUSION_CLASSES`]).
    pub omitted: usize,
}

/// Most classes drawn in the confusion matrix (the most frequent true classes).
pub const MAX_CONFUSION_CLASSES: usize = 40;

/// A retrieval query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalShown {
    /// The image, a PNG data URI.
    pub image: String,
    /// Top captions, best first: text, cosine, whether it is the image's own.
    pub top: Vec<(String, f32, bool)>,
}

/// One held-out image through the masked-image-modelling pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MimShown {
    /// The codebook's input, a PNG data URI.
    pub image: String,
    /// The visual tokens (MIM targets) as a colour per code, a PNG data URI.
    pub tokens: String,
    /// Distinct codes in the image.
    pub distinct_codes: usize,
    /// The dVAE decoder's reconstruction from the tokens, when the decoder is at hand.
    pub reconstruction: Option<String>,
    /// The image with its BEiT mask (masked patches darkened), a PNG data URI.
    pub masked: String,
    /// Masked patches of all.
    pub masked_patches: (usize, usize),
}

/// A PNG data URI of an image.
pub fn png_data_uri(img: &image::RgbImage) -> anyhow::Result<String> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png.into_inner())
    ))
}

/// An `<img>` of a PNG data URI; anything else in `report_data.json` (hand-edited, damaged) is
/// shown as a marked gap, never pasted into the page.
fn img(src: &str, alt: &str) -> String {
    let valid = src.strip_prefix("data:image/png;base64,").is_some_and(|b| {
        !b.is_empty()
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
    });
    if valid {
        format!("<img class=\"px\" src=\"{src}\" alt=\"{alt}\">")
    } else {
        format!("<span class=\"bad\">{alt}: not a PNG data URI</span>")
    }
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Series of a run's `metrics.jsonl`: `(step, value)` per name. Per-step lines give each
/// numeric field (the total `loss` as `loss (TASK)` when the line names its task); `{"step",
/// "val": {…}}` lines give `val FIELD`. Unreadable lines are skipped.
pub fn read_series(metrics: &Path) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return series;
    };
    for line in text.lines() {
        let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(serde_json::Value::Object(val)) = v.get("val") {
            for (k, x) in val {
                if let Some(x) = x.as_f64() {
                    series.entry(format!("val {k}")).or_default().push((step, x));
                }
            }
            continue;
        }
        let task = v.get("task").and_then(|t| t.as_str());
        for (k, x) in &v {
            let Some(x) = x.as_f64() else { continue };
            if k == "step" {
                continue;
            }
            let name = match (k.as_str(), task) {
                ("loss", Some(t)) => format!("loss ({t})"),
                _ => k.clone(),
            };
            series.entry(name).or_default().push((step, x));
        }
    }
    series
}

/// Series drawn under "schedule and throughput" rather than among the losses.
const SCHEDULE: [&str; 5] = ["lr", "grad_norm", "samples_per_s", "step_time_s", "skipped"];

fn chart_grid(out: &mut String, charts: &[(String, String)]) {
    out.push_str("<div class=\"grid\">");
    for (title, svg) in charts {
        let _ = write!(
            out,
            "<figure class=\"fig\" data-title=\"{}\">{svg}</figure>",
            esc(title)
        );
    }
    out.push_str("</div>");
}

fn pct(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

/// The evaluation table: pretraining's `eval.json` with chance levels, or any other run's
/// numeric fields.
fn eval_table(eval: &serde_json::Value) -> String {
    let mut s = String::from("<table class=\"eval\"><tr><th>metric</th><th>value</th><th>chance</th></tr>");
    if let Ok(r) = serde_json::from_value::<EvalReport>(eval.clone()) {
        if r.zero_shot.is_some() || r.retrieval.is_some() || r.mlm_accuracy.is_some() {
            for (name, v, c) in crate::eval::report_rows(&r) {
                let above = c.is_some_and(|c| v > c);
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                    esc(&name),
                    if above { "above" } else { "" },
                    pct(v),
                    c.map_or("-".into(), pct)
                );
            }
            s.push_str("</table>");
            return s;
        }
    }
    // A task run: its numbers as they are (the metric named by `metric` first).
    if let Some(obj) = eval.as_object() {
        for (k, v) in obj {
            let shown = match v {
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::String(t) => t.clone(),
                _ => continue,
            };
            let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>-</td></tr>", esc(k), esc(&shown));
        }
    }
    s.push_str("</table>");
    s
}

/// Builds the page of the run in `run` from its files.
pub fn render(run: &Path) -> anyhow::Result<String> {
    if !run.is_dir() {
        anyhow::bail!("{}: no such run directory", run.display());
    }
    let config = ["config.toml", "dvae_config.json"]
        .iter()
        .map(|f| run.join(f))
        .find(|p| p.is_file());
    let metrics = run.join("metrics.jsonl");
    if config.is_none() && !metrics.is_file() {
        anyhow::bail!(
            "{} is not a run directory (no config.toml, dvae_config.json or metrics.jsonl)",
            run.display()
        );
    }
    let name = run
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| run.display().to_string());
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>flava run {n}</title>\
         <style>{STYLE}</style></head><body><h1>flava run <code>{n}</code></h1>",
        n = esc(&name)
    );
    let mut toc = Vec::new();
    let mut body = String::new();

    // Curves.
    let series = read_series(&metrics);
    if !series.is_empty() {
        let steps = series.values().flat_map(|v| v.iter().map(|p| p.0)).fold(0f64, f64::max);
        let mut losses = Vec::new();
        let mut schedule = Vec::new();
        let mut val = Vec::new();
        for (k, pts) in &series {
            let svg = charts::line_chart(k, "", pts, (400, 250))?;
            if SCHEDULE.contains(&k.as_str()) {
                schedule.push((k.clone(), svg));
            } else if k.starts_with("val ") {
                val.push((k.clone(), svg));
            } else {
                losses.push((k.clone(), svg));
            }
        }
        toc.push(("curves", "Training curves"));
        let _ = write!(
            body,
            "<section id=\"curves\"><h2>Training curves</h2><p>{} series over {} steps (light: each step; dark: moving average).</p><h3>Losses, per loss and per task</h3>",
            series.len(),
            steps
        );
        chart_grid(&mut body, &losses);
        if !val.is_empty() {
            body.push_str("<h3>Validation</h3>");
            chart_grid(&mut body, &val);
        }
        body.push_str("<h3>Learning rate, gradient norm and throughput</h3>");
        chart_grid(&mut body, &schedule);
        body.push_str("</section>");
    }

    // Evaluation.
    let eval_path = run.join("eval.json");
    if let Ok(text) = std::fs::read_to_string(&eval_path) {
        let eval: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", eval_path.display()))?;
        toc.push(("eval", "Evaluation"));
        let _ = write!(body, "<section id=\"eval\"><h2>Evaluation</h2>{}", eval_table(&eval));
        if let Some(data) = eval.get("data").and_then(|d| d.as_object()) {
            body.push_str("<h3>Data</h3><table><tr><th>source</th><th>samples</th><th>skipped</th></tr>");
            for (src, st) in data {
                let skipped: u64 = st
                    .get("skipped")
                    .and_then(|s| s.as_object())
                    .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{skipped}</td></tr>",
                    esc(src),
                    st.get("samples").and_then(|s| s.as_u64()).unwrap_or(0)
                );
            }
            body.push_str("</table>");
        }
        body.push_str("</section>");
    }

    // Examples.
    let data_path = run.join(DATA_FILE);
    if let Ok(text) = std::fs::read_to_string(&data_path) {
        let data: ReportData =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", data_path.display()))?;
        examples_sections(&data, &mut body, &mut toc)?;
    }

    // Configuration.
    if let Some(p) = &config {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        toc.push(("config", "Configuration"));
        let _ = write!(
            body,
            "<section id=\"config\"><h2>Configuration</h2><p><code>{}</code></p><pre>{}</pre></section>",
            esc(&p.file_name().unwrap_or_default().to_string_lossy()),
            esc(&text)
        );
    }

    html.push_str("<nav>");
    for (id, title) in &toc {
        let _ = write!(html, "<a href=\"#{id}\">{title}</a>");
    }
    html.push_str("</nav>");
    html.push_str(&body);
    html.push_str(SCRIPT);
    html.push_str("</body></html>\n");
    Ok(html)
}

fn examples_sections(
    data: &ReportData,
    body: &mut String,
    toc: &mut Vec<(&'static str, &'static str)>,
) -> anyhow::Result<()> {
    if let Some(c) = &data.confusion {
        toc.push(("confusion", "Zero-shot confusion"));
        let _ = write!(
            body,
            "<section id=\"confusion\"><h2>Zero-shot confusion matrix</h2><p>{} classes{}; row-normalised (green: correct).</p><figure class=\"fig wide\">{}</figure></section>",
            c.classes.len(),
            if c.omitted > 0 {
                format!(" (the {MAX_CONFUSION_CLASSES} most frequent; {} more left out)", c.omitted)
            } else {
                String::new()
            },
            charts::confusion_chart(&c.classes, &c.counts)?
        );
    }
    if !data.retrieval.is_empty() {
        toc.push(("retrieval", "Retrieval examples"));
        body.push_str("<section id=\"retrieval\"><h2>Retrieval examples</h2><p>Each held-out image and the captions it ranks highest (cosine of the projected embeddings; ✓ = its own caption).</p><div class=\"grid\">");
        for r in &data.retrieval {
            let _ = write!(body, "<figure class=\"fig query\">{}<ol>", img(&r.image, "query image"));
            for (t, s, own) in &r.top {
                let _ = write!(
                    body,
                    "<li class=\"{}\">{} <span class=\"score\">{s:.3}</span>{}</li>",
                    if *own { "own" } else { "" },
                    esc(t),
                    if *own { " ✓" } else { "" }
                );
            }
            body.push_str("</ol></figure>");
        }
        body.push_str("</div></section>");
    }
    if !data.mim.is_empty() {
        toc.push(("mim", "MIM targets"));
        body.push_str("<section id=\"mim\"><h2>MIM targets and dVAE reconstructions</h2><p>The codebook's input, its visual tokens (one colour per code: the targets of masked image modelling), and the dVAE decoder's image from those tokens.</p><table class=\"imgs\"><tr><th>input</th><th>tokens</th><th>reconstruction</th></tr>");
        for m in &data.mim {
            let rec = m
                .reconstruction
                .as_ref()
                .map_or("<td>no decoder</td>".to_string(), |r| {
                    format!("<td>{}</td>", img(r, "reconstruction"))
                });
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}<br>{} codes</td>{rec}</tr>",
                img(&m.image, "input"),
                img(&m.tokens, "tokens"),
                m.distinct_codes
            );
        }
        body.push_str("</table></section>");
        toc.push(("masks", "BEiT masks"));
        body.push_str("<section id=\"masks\"><h2>BEiT mask previews</h2><p>The block masks of the evaluation batch (darkened patches are masked).</p><div class=\"grid\">");
        for m in &data.mim {
            let _ = write!(
                body,
                "<figure class=\"fig\">{}<figcaption>{} of {} patches</figcaption></figure>",
                img(&m.masked, "mask"),
                m.masked_patches.0,
                m.masked_patches.1
            );
        }
        body.push_str("</div></section>");
    }
    if !data.notes.is_empty() {
        body.push_str("<section id=\"notes\"><h2>Notes</h2><ul>");
        for n in &data.notes {
            let _ = write!(body, "<li>{}</li>", esc(n));
        }
        body.push_str("</ul></section>");
    }
    Ok(())
}

/// Writes `report.html` into the run directory (whole or not at all); returns its path.
pub fn write(run: &Path) -> anyhow::Result<PathBuf> {
    write_to(run, &run.join(REPORT_FILE))
}

/// Writes the page of `run` to `out`.
pub fn write_to(run: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let html = render(run)?;
    flava_vit::atomic::write_file(out, html.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// Writes `report_data.json` into the run directory.
pub fn write_data(run: &Path, data: &ReportData) -> anyhow::Result<()> {
    flava_vit::atomic::write_file(&run.join(DATA_FILE), serde_json::to_string(data)?.as_bytes())?;
    Ok(())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1320px;color:#222}\
nav{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd}nav a{margin-right:1.2em}\
section{margin-top:1.5em}.grid{display:flex;flex-wrap:wrap;gap:10px}.fig{margin:0;border:1px solid #eee}\
.fig svg{display:block}.query{width:300px;padding:6px}.query ol{font-size:13px;padding-left:1.3em}\
li.own{color:#176a2a;font-weight:600}.score{color:#888;font-size:11px}\
img.px{image-rendering:pixelated;width:128px;height:auto}table{border-collapse:collapse}\
.bad{color:#a00;font-size:12px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}td.above{color:#176a2a;font-weight:600}\
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}";

/// Counts the figures that rendered (images decoded, SVGs with a size) into `data-figures-*`
/// attributes of `<body>`, so a headless browser can check them.
const SCRIPT: &str = "<script>window.addEventListener('load',function(){var imgs=[].slice.call(document.images);\
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length;\
var svgs=[].slice.call(document.querySelectorAll('svg')).filter(function(s){var b=s.getBoundingClientRect();return b.width>0&&b.height>0}).length;\
document.body.setAttribute('data-figures-total',imgs.length+document.querySelectorAll('svg').length);\
document.body.setAttribute('data-figures-loaded',ok+svgs);});</script>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_take_tasks_and_validation_lines_apart() {
        let d = std::env::temp_dir().join(format!("flava-report-series-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let m = d.join("metrics.jsonl");
        std::fs::write(
            &m,
            "{\"step\":1,\"task\":\"pairs\",\"loss\":3.0,\"itm\":0.7,\"lr\":0.001}\n\
             not json\n{\"step\":2,\"task\":\"text\",\"loss\":2.0,\"mlm\":2.0,\"lr\":0.002}\n\
             {\"step\":2,\"val\":{\"accuracy\":0.5,\"n\":10}}\n",
        )
        .unwrap();
        let s = read_series(&m);
        assert_eq!(s["loss (pairs)"], vec![(1.0, 3.0)]);
        assert_eq!(s["loss (text)"], vec![(2.0, 2.0)]);
        assert_eq!(s["lr"], vec![(1.0, 0.001), (2.0, 0.002)]);
        assert_eq!(s["val accuracy"], vec![(2.0, 0.5)]);
        assert!(!s.contains_key("step") && !s.contains_key("loss"));
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn damaged_report_files_are_errors_naming_them_and_bad_images_are_not_pasted() {
        let d = std::env::temp_dir().join(format!("flava-report-bad-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.toml"), "steps = 3\n").unwrap();
        // Truncated eval.json, then an empty report_data.json: errors that name the file.
        std::fs::write(d.join("eval.json"), "{\"zero_shot\": {\"top1\": 0.").unwrap();
        let e = format!("{:#}", render(&d).unwrap_err());
        assert!(e.contains("eval.json"), "{e}");
        std::fs::remove_file(d.join("eval.json")).unwrap();
        std::fs::write(d.join(DATA_FILE), "").unwrap();
        let e = format!("{:#}", render(&d).unwrap_err());
        assert!(e.contains(DATA_FILE), "{e}");
        // An image that is not a PNG data URI (markup in it) is shown as a gap, not inserted.
        let data = ReportData {
            retrieval: vec![RetrievalShown {
                image: "x\"><script>alert(1)</script>".into(),
                top: vec![("<b>cap</b>".into(), 0.5, true)],
            }],
            ..Default::default()
        };
        write_data(&d, &data).unwrap();
        let html = render(&d).unwrap();
        assert!(!html.contains("alert(1)") && !html.contains("<b>cap"), "markup pasted");
        assert!(html.contains("query image: not a PNG data URI") && html.contains("&lt;b&gt;cap"));
        // A config only (a run stopped before its first step): a page with the configuration.
        std::fs::remove_file(d.join(DATA_FILE)).unwrap();
        let html = render(&d).unwrap();
        assert!(html.contains("<section id=\"config\">") && !html.contains("<section id=\"curves\">"));
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn text_is_escaped_and_a_non_run_is_refused() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        let d = std::env::temp_dir().join(format!("flava-report-empty-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let e = render(&d).unwrap_err().to_string();
        assert!(e.contains("not a run directory"), "{e}");
        assert!(render(&d.join("nope"))
            .unwrap_err()
            .to_string()
            .contains("no such run directory"));
        std::fs::remove_dir_all(d).ok();
    }
}
