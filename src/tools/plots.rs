//! PNG plots of a `vigil eval` report: the only module that imports `plotters`.
//!
//! Labels need a TrueType font: DejaVu Sans (Debian's `fonts-dejavu-core`), or the file named
//! by `VIGIL_PLOT_FONT`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::tools::eval::{Report, StreamReport};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "no font for the plots' labels: install fonts-dejavu-core or set VIGIL_PLOT_FONT to a .ttf"
    )]
    NoFont,
    #[error("drawing {file}: {message}")]
    Draw { file: String, message: String },
}

const FONT: &str = "sans-serif";
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Register a font once per process.
fn font() -> Result<(), PlotError> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        let explicit = std::env::var_os("VIGIL_PLOT_FONT").map(PathBuf::from);
        let found = explicit
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .find_map(|p| std::fs::read(p).ok());
        match found {
            Some(bytes) => {
                // The registry wants 'static bytes: one font, kept for the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
            }
            None => false,
        }
    });
    if ok { Ok(()) } else { Err(PlotError::NoFont) }
}

fn draw_err(file: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw {
        file: file.display().to_string(),
        message: e.to_string(),
    }
}

/// Write every plot into `dir`; returns the files written.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    font()?;
    let files = vec![
        dir.join("rates.png"),
        dir.join("scores.png"),
        dir.join("liveness.png"),
        dir.join("timeline.png"),
    ];
    rates(report, &files[0])?;
    scores(report, &files[1])?;
    liveness(report, &files[2])?;
    timeline(&report.streams, report.fps, &files[3])?;
    Ok(files)
}

/// Draw a chart's legend, the same way on every plot.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
}

/// False match and false non-match rates against the threshold (log scale), with the
/// configured threshold marked.
fn rates(r: &Report, file: &Path) -> Result<(), PlotError> {
    let e = draw_err(file);
    let root = BitMapBackend::new(file, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let floor = 1e-6f64;
    let (x0, x1) = (
        r.rates.first().map_or(0.2, |p| p.threshold),
        r.rates.last().map_or(0.5, |p| p.threshold),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Recognition error rates (609 impostors, 185k pairs; genuine pairs and video frames)",
            (FONT, 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (floor..1.0f64).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("cosine threshold")
        .y_desc("rate (log; 0 drawn at 1e-6)")
        .label_style((FONT, 13))
        .draw()
        .map_err(|x| e(&x))?;
    let series = |f: fn(&crate::tools::eval::RatePoint) -> f64| {
        r.rates
            .iter()
            .map(move |p| (p.threshold, f(p).max(floor)))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(
            series(|p| p.false_match_rate),
            RED.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("false match rate")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            series(|p| p.false_non_match_rate),
            BLUE.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("false non-match rate")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let t = r.match_threshold;
    chart
        .draw_series(LineSeries::new(
            [(t, floor), (t, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|x| e(&x))?
        .label(format!("configured threshold {t:.2}"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    legend(&mut chart).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// Share of `values` in each of `bins` equal bins over `lo..hi`.
fn histogram(values: &[f32], lo: f32, hi: f32, bins: usize) -> Vec<(f32, f32)> {
    let mut counts = vec![0usize; bins];
    for v in values {
        let i = (((v - lo) / (hi - lo)) * bins as f32).floor();
        counts[(i.max(0.0) as usize).min(bins - 1)] += 1;
    }
    let n = values.len().max(1) as f32;
    let w = (hi - lo) / bins as f32;
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (lo + (i as f32 + 0.5) * w, *c as f32 / n))
        .collect()
}

/// Two histograms on one chart, with a vertical marker.
fn two_histograms(
    file: &Path,
    title: &str,
    x_desc: &str,
    (lo, hi): (f32, f32),
    a: (&str, &[f32], RGBColor),
    b: (&str, &[f32], RGBColor),
    marker: (&str, f32),
) -> Result<(), PlotError> {
    let e = draw_err(file);
    let root = BitMapBackend::new(file, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let bins = 40;
    let (ha, hb) = (histogram(a.1, lo, hi, bins), histogram(b.1, lo, hi, bins));
    let top = ha.iter().chain(&hb).map(|p| p.1).fold(0.01f32, f32::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0f32..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("share of the set")
        .label_style((FONT, 13))
        .draw()
        .map_err(|x| e(&x))?;
    for ((name, values, color), h) in [(a, &ha), (b, &hb)] {
        chart
            .draw_series(LineSeries::new(h.iter().copied(), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(format!("{name} (n={})", values.len()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            [(marker.1, 0.0), (marker.1, top)],
            BLACK.stroke_width(1),
        ))
        .map_err(|x| e(&x))?
        .label(marker.0.to_owned())
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    legend(&mut chart).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

fn scores(r: &Report, file: &Path) -> Result<(), PlotError> {
    two_histograms(
        file,
        "Similarity to the reference: different people vs the same person",
        "cosine similarity",
        (-0.2, 1.0),
        ("impostor pairs, every 16th", &r.impostor_score_sample, RED),
        ("genuine pairs and frames", &r.genuine_score_sample, BLUE),
        (
            &format!("threshold {:.2}", r.match_threshold),
            r.match_threshold,
        ),
    )
}

fn liveness(r: &Report, file: &Path) -> Result<(), PlotError> {
    let ratios = |kind: &str| -> Vec<f32> {
        r.streams
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(|s| s.still_ratios.iter().copied())
            .collect()
    };
    two_histograms(
        file,
        "Stream liveness: appearance drift over 1.5 s / frame-to-frame jitter, per 4 s window",
        "drift / jitter",
        (0.0, 8.0),
        ("honest people on video", &ratios("genuine"), BLUE),
        ("replayed and held-up photos", &ratios("attack"), RED),
        (&format!("still below {:.1}", r.still_ratio), r.still_ratio),
    )
}

fn verdict_color(v: &str) -> RGBColor {
    match v {
        "ok" => RGBColor(60, 170, 80),
        "no_face" => RGBColor(170, 170, 170),
        "low_quality" => RGBColor(230, 190, 60),
        "spoof" => RGBColor(200, 40, 40),
        "wrong_person" => RGBColor(140, 60, 170),
        "phone" => RGBColor(230, 120, 30),
        _ => RGBColor(60, 60, 200),
    }
}

/// One row per stream: a cell per frame coloured by its verdict, and a mark where the policy
/// acted.
fn timeline(streams: &[StreamReport], fps: f64, file: &Path) -> Result<(), PlotError> {
    let e = draw_err(file);
    let row = 30u32;
    let label_w = 380u32;
    let width = 1300u32;
    let height = 70 + row * streams.len() as u32 + 40;
    let root = BitMapBackend::new(file, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    root.draw(&Text::new(
        "Per stream: each frame's verdict, and the policy's actions (black: lock or sign out, white: allow)",
        (10, 10),
        (FONT, 17),
    ))
    .map_err(|x| e(&x))?;
    let frames = streams
        .iter()
        .map(|s| s.timeline.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let cell = ((width - label_w - 20) as f32 / frames as f32).max(1.0);
    for (i, s) in streams.iter().enumerate() {
        let y = 40 + row as i32 * i as i32;
        root.draw(&Text::new(
            format!("{} {}", s.kind, s.name),
            (10, y + 8),
            (FONT, 13),
        ))
        .map_err(|x| e(&x))?;
        for (j, v) in s.timeline.iter().enumerate() {
            let x = label_w as i32 + (j as f32 * cell) as i32;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell.ceil() as i32, y + row as i32 - 6)],
                verdict_color(v).filled(),
            ))
            .map_err(|x| e(&x))?;
        }
        for (at, action, _) in &s.actions {
            let j = (at * fps).round() as usize;
            let x = label_w as i32 + (j as f32 * cell) as i32;
            let color = if action == "allow" { WHITE } else { BLACK };
            root.draw(&Rectangle::new(
                [(x, y - 2), (x + 3, y + row as i32 - 4)],
                color.filled(),
            ))
            .map_err(|x| e(&x))?;
        }
    }
    let y = 40 + row as i32 * streams.len() as i32 + 8;
    let mut x = 10;
    for v in [
        "ok",
        "no_face",
        "low_quality",
        "spoof",
        "wrong_person",
        "phone",
    ] {
        root.draw(&Rectangle::new(
            [(x, y), (x + 16, y + 16)],
            verdict_color(v).filled(),
        ))
        .map_err(|x| e(&x))?;
        root.draw(&Text::new(v, (x + 22, y + 1), (FONT, 14)))
            .map_err(|x| e(&x))?;
        x += 150;
    }
    root.present().map_err(|x| e(&x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_shares_add_up_and_clamp_the_ends() {
        let h = histogram(&[-5.0, 0.1, 0.5, 0.9, 5.0], 0.0, 1.0, 4);
        assert_eq!(h.len(), 4);
        assert!((h.iter().map(|p| p.1).sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(h[0].1, 0.4); // -5 clamps into the first bin, with 0.1
        assert_eq!(h[3].1, 0.4); // 5 clamps into the last, with 0.9
    }
}
