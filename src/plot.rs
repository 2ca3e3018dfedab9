//! PNG figures (plotters on an in-memory bitmap, text in the bundled DejaVu Sans, so no system
//! fonts or libraries are needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

fn init_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the bundled font is valid; a failure here would only lose the text
        let _ = register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the figure: {e}")
}

/// Check that a figure can be written to `path` (its folder exists, it ends in .png).
pub fn check_out(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {}: folder {} does not exist", path.display(), dir.display());
    }
    if path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
        bail!("figures are PNG files: {} should end in .png", path.display());
    }
    Ok(())
}

/// A palette that stays readable in print.
pub const PALETTE: [RGBColor; 8] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127)];

/// `(lo, hi)` of the values, padded by 5% (and widened when flat).
fn span(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

/// One named line of `(x, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines against a common x axis (e.g. reward and losses against steps).
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    check_out(path)?;
    init_font();
    let xr = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let yr = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root).caption(title, (FONT, 22)).margin(12).x_label_area_size(45).y_label_area_size(65).build_cartesian_2d(xr.0..xr.1, yr.0..yr.1).map_err(pe)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style((FONT, 14)).draw().map_err(pe)?;
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied().filter(|p| p.1.is_finite()), c.stroke_width(2)))
            .map_err(pe)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    if series.len() > 1 {
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 14)).draw().map_err(pe)?;
    }
    root.present().map_err(pe)?;
    Ok(())
}

/// Side-by-side scatter plots of 2-D point sets on one shared square range, with an optional
/// marker (e.g. where the reward peaks).
pub fn scatter_panels(path: &Path, panels: &[(String, Vec<(f64, f64)>)], marker: Option<(f64, f64)>, range: (f64, f64)) -> Result<()> {
    check_out(path)?;
    init_font();
    let root = BitMapBackend::new(path, (420 * panels.len().max(1) as u32, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    for (area, (title, pts)) in root.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
        let mut chart = ChartBuilder::on(area).caption(title, (FONT, 16)).margin(10).x_label_area_size(30).y_label_area_size(35).build_cartesian_2d(range.0..range.1, range.0..range.1).map_err(pe)?;
        chart.configure_mesh().label_style((FONT, 12)).draw().map_err(pe)?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, PALETTE[0].mix(0.5).filled()))).map_err(pe)?;
        if let Some(m) = marker {
            chart.draw_series(std::iter::once(Cross::new(m, 8, PALETTE[3].stroke_width(3)))).map_err(pe)?;
        }
    }
    root.present().map_err(pe)?;
    Ok(())
}

/// One labelled point of a trade-off curve, with the path that led to it.
pub struct FrontierPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub path: Vec<(f64, f64)>,
}

/// A trade-off curve: labelled end points joined in order, each with its trajectory drawn thin,
/// and a start point.
pub fn frontier(path: &Path, title: &str, x_label: &str, y_label: &str, points: &[FrontierPoint], start: (f64, f64)) -> Result<()> {
    check_out(path)?;
    init_font();
    let all = || points.iter().flat_map(|p| p.path.iter().copied().chain(std::iter::once((p.x, p.y)))).chain(std::iter::once(start));
    let xr = span(all().map(|p| p.0));
    let yr = span(all().map(|p| p.1));
    let root = BitMapBackend::new(path, (820, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let mut chart = ChartBuilder::on(&root).caption(title, (FONT, 20)).margin(14).x_label_area_size(45).y_label_area_size(60).build_cartesian_2d(xr.0..xr.1 + 0.08 * (xr.1 - xr.0), yr.0..yr.1).map_err(pe)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style((FONT, 14)).draw().map_err(pe)?;
    for (i, p) in points.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart.draw_series(LineSeries::new(p.path.iter().copied(), c.mix(0.35).stroke_width(1))).map_err(pe)?;
    }
    chart.draw_series(LineSeries::new(points.iter().map(|p| (p.x, p.y)), BLACK.stroke_width(2))).map_err(pe)?;
    for (i, p) in points.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 6, c.filled()))).map_err(pe)?.label(p.label.clone()).legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
    }
    chart.draw_series(std::iter::once(TriangleMarker::new(start, 9, BLACK.filled()))).map_err(pe)?.label("pre-trained").legend(|(x, y)| TriangleMarker::new((x + 8, y), 6, BLACK.filled()));
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 14)).draw().map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

/// One panel of [`panels`]: lines over the shared x positions, and horizontal reference lines
/// (drawn dashed, e.g. the pre-trained model's value or the real-data floor).
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    pub refs: Vec<(String, f64)>,
}

/// A grid of panels (`cols` wide) sharing categorical x positions `0, 1, ..` named by `x_labels`
/// (e.g. the α values of a sweep, evenly spaced whatever their values).
pub fn panels(path: &Path, title: &str, x_label: &str, x_labels: &[String], panels: &[Panel], cols: usize) -> Result<()> {
    check_out(path)?;
    init_font();
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (460 * cols as u32, 340 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let root = root.titled(title, (FONT, 22)).map_err(pe)?;
    let nx = x_labels.len().max(1);
    for (area, p) in root.split_evenly((rows, cols)).iter().zip(panels) {
        let yr = span(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)).chain(p.refs.iter().map(|r| r.1)));
        let mut chart = ChartBuilder::on(area).caption(&p.title, (FONT, 16)).margin(10).x_label_area_size(38).y_label_area_size(55).build_cartesian_2d(-0.3..(nx as f64 - 0.7), yr.0..yr.1).map_err(pe)?;
        let fmt = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < x_labels.len() { x_labels[i as usize].clone() } else { String::new() }
        };
        chart.configure_mesh().x_desc(x_label).x_labels(nx).x_label_formatter(&fmt).label_style((FONT, 13)).draw().map_err(pe)?;
        for (i, (name, v)) in p.refs.iter().enumerate() {
            let c = PALETTE[(7 - i) % PALETTE.len()];
            chart
                .draw_series(DashedLineSeries::new([(-0.3, *v), (nx as f64 - 0.7, *v)], 6, 4, c.stroke_width(2)))
                .map_err(pe)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        for (i, s) in p.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|q| q.1.is_finite()).collect();
            chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2))).map_err(pe)?.label(s.name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&q| Circle::new(q, 4, c.filled()))).map_err(pe)?;
        }
        if p.series.len() + p.refs.len() > 1 {
            chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 12)).draw().map_err(pe)?;
        }
    }
    root.present().map_err(pe)?;
    Ok(())
}
