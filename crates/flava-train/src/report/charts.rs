//! The report's figures as inline SVG (plotters' SVG backend): line charts of a run's series,
//! and the zero-shot confusion matrix as a heat map.

use plotters::prelude::*;

/// Moving average over `w` points (per-task losses are noisy).
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let s: f64 = points[lo..=i].iter().map(|p| p.1).sum();
            (points[i].0, s / (i + 1 - lo) as f64)
        })
        .collect()
}

/// One line chart: the raw points in light blue, their moving average in dark blue.
/// `points` are (step, value); non-finite values are dropped. An empty series draws an empty
/// frame with its title.
pub fn line_chart(title: &str, y_label: &str, points: &[(f64, f64)], size: (u32, u32)) -> anyhow::Result<String> {
    crate::pretrain::plot::register();
    let pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {title}: {e}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (x0, x1) = match (pts.first(), pts.last()) {
            (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1.0)),
            _ => (0.0, 1.0),
        };
        let (mut y0, mut y1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if pts.is_empty() {
            (y0, y1) = (0.0, 1.0);
        }
        if y1 - y0 < 1e-9 * y1.abs().max(1.0) {
            let pad = y0.abs().max(1.0) * 0.05;
            y0 -= pad;
            y1 += pad;
        }
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(58)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .label_style(("sans-serif", 11))
            .y_label_formatter(&|v| format_value(*v))
            .draw()
            .map_err(|e| err(&e))?;
        if pts.len() > 1 {
            chart
                .draw_series(LineSeries::new(pts.clone(), RGBColor(170, 200, 240)))
                .map_err(|e| err(&e))?;
        }
        let w = (pts.len() / 20).clamp(1, 25);
        chart
            .draw_series(LineSeries::new(smooth(&pts, w), RGBColor(20, 70, 170).stroke_width(2)))
            .map_err(|e| err(&e))?;
        if pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, RGBColor(20, 70, 170).filled())))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// Compact tick labels: 1.2e-4, 0.031, 12.5, 3.4k.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The confusion matrix `counts[label][predicted]` as a heat map, rows normalised (each row's
/// share of its images), with the class names on both axes.
pub fn confusion_chart(classes: &[String], counts: &[Vec<u32>]) -> anyhow::Result<String> {
    crate::pretrain::plot::register();
    let n = classes.len().max(1);
    let cell = (560 / n as u32).clamp(6, 28);
    let label_w = 150u32;
    let side = cell * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (side + label_w + 20, side + label_w + 40)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the confusion matrix: {e}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let font = ("sans-serif", (cell as i32 - 2).clamp(7, 12)).into_font();
        for (i, row) in counts.iter().enumerate() {
            let total: u32 = row.iter().sum();
            for (j, &c) in row.iter().enumerate() {
                let share = if total > 0 { c as f64 / total as f64 } else { 0.0 };
                let v = (255.0 * (1.0 - share)) as u8;
                let (x, y) = (label_w as i32 + (j as u32 * cell) as i32, 20 + (i as u32 * cell) as i32);
                let color = if i == j {
                    RGBColor(v, 255 - (255 - v) / 3, v)
                } else {
                    RGBColor(255, v, v)
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    color.filled(),
                ))
                .map_err(|e| err(&e))?;
            }
            let name: String = classes.get(i).map_or(String::new(), |s| s.chars().take(22).collect());
            root.draw(&Text::new(name, (4, 20 + (i as u32 * cell) as i32), font.clone()))
                .map_err(|e| err(&e))?;
        }
        root.draw(&Rectangle::new(
            [(label_w as i32, 20), ((label_w + side) as i32, 20 + side as i32)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
        let vfont = font.transform(FontTransform::Rotate90);
        for (j, name) in classes.iter().enumerate() {
            let name: String = name.chars().take(22).collect();
            root.draw(&Text::new(
                name,
                ((label_w + j as u32 * cell + cell) as i32, 24 + side as i32),
                vfont.clone(),
            ))
            .map_err(|e| err(&e))?;
        }
        root.draw(&Text::new(
            "rows: true class, columns: predicted",
            (4, 4),
            ("sans-serif", 12),
        ))
        .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_titles() {
        let pts: Vec<(f64, f64)> = (0..40).map(|i| (i as f64, 5.0 / (1.0 + i as f64))).collect();
        let s = line_chart("loss (pairs)", "loss", &pts, (400, 240)).unwrap();
        assert!(
            s.starts_with("<svg") && s.contains("loss (pairs)") && s.contains("<polyline"),
            "{s}"
        );
        // A single point and an empty series still draw.
        assert!(line_chart("one", "", &[(3.0, 1.0)], (300, 200))
            .unwrap()
            .contains("<circle"));
        assert!(line_chart("none", "", &[], (300, 200)).unwrap().contains("none"));
        let c = confusion_chart(&["cat".into(), "dog".into()], &[vec![3, 1], vec![0, 4]]).unwrap();
        assert!(c.contains("cat") && c.contains("<rect"), "{c}");
        assert_eq!(format_value(0.00012), "1.2e-4");
        assert_eq!(format_value(12.345), "12.35");
        assert_eq!(smooth(&[(0.0, 1.0), (1.0, 3.0)], 2), vec![(0.0, 1.0), (1.0, 2.0)]);
    }
}
