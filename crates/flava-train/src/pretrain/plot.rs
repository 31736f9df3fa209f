//! Loss curves as a PNG (plotters, bitmap backend; the DejaVu Sans Mono font ships in `assets/`
//! so that labels render on machines without fonts).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::report::charts::smooth;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// Registers the bundled font as `sans-serif` (once): plotters measures text with it, in PNG and SVG.
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // A valid bundled font; failure would only lose the labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws one panel per loss name (x: step, y: loss, smoothed) into a PNG.
pub fn plot_losses(series: &BTreeMap<String, Vec<(f64, f64)>>, path: &Path) -> anyhow::Result<()> {
    register();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let names: Vec<&String> = series.keys().collect();
    let cols = 3usize;
    let rows = names.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (420 * cols as u32, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    for (area, name) in areas.iter().zip(&names) {
        let pts = smooth(&series[*name], 10);
        if pts.is_empty() {
            continue;
        }
        let (x0, x1) = (pts[0].0, pts.last().map_or(1.0, |p| p.0).max(pts[0].0 + 1.0));
        let (mut y0, mut y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if y1 - y0 < 1e-6 {
            y0 -= 0.5;
            y1 += 0.5;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(name.as_str(), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        chart.draw_series(LineSeries::new(pts, &BLUE)).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let mut s = BTreeMap::new();
        s.insert(
            "loss".to_string(),
            (0..50).map(|i| (i as f64, 5.0 / (1.0 + i as f64))).collect(),
        );
        s.insert("mlm".to_string(), (0..20).map(|i| (3.0 * i as f64, 2.0)).collect());
        let p = std::env::temp_dir().join(format!("flava-plot-{}.png", std::process::id()));
        plot_losses(&s, &p).unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (1260, 300));
        std::fs::remove_file(p).ok();
    }
}
