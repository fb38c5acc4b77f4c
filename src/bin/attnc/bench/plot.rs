//! `--plot PATH.svg`: median time per call against the swept dimension, one line per kernel and
//! engine, on log-log axes, rendered in memory with plotters' SVG backend and written
//! atomically (a failed write leaves no partial file and an existing file untouched).

use crate::failure::Failure;
use crate::CliResult;
use plotters::coord::combinators::{BindKeyPoints, IntoLogRange};
use plotters::prelude::*;
use std::path::Path;

/// Width and height of the plot, in SVG pixels.
const SIZE: (u32, u32) = (960, 600);

/// One line of the plot.
pub struct Series {
    /// Legend text, e.g. `local (jit)`.
    pub label: String,
    /// Which kernel of the sweep, for the colour (every engine of a kernel shares it).
    pub kernel_index: usize,
    /// `jit`, `interp` or `naive`, for the marker and the line width.
    pub engine: &'static str,
    /// (swept value, median ms) in ascending order of the value.
    pub points: Vec<(f64, f64)>,
}

/// Writes the SVG text to `path` atomically.
pub fn write(path: &Path, svg: &str) -> CliResult {
    attnc::io::write_atomically(path, svg.as_bytes())
        .map_err(|e| Failure::input("output", e.to_string()))
}

/// Renders the series as an SVG document.
pub fn render(title: &str, symbol: &str, series: &[Series]) -> Result<String, Failure> {
    let fail = |e: String| Failure::input("output", format!("drawing the plot: {e}"));
    let (x_range, y_range) = ranges(series)
        .ok_or_else(|| fail("no positive, finite timing to draw on log axes".to_string()))?;
    let mut svg = String::new();
    draw(&mut svg, title, symbol, series, x_range, y_range).map_err(fail)?;
    Ok(svg)
}

fn draw(
    svg: &mut String,
    title: &str,
    symbol: &str,
    series: &[Series],
    x_range: (f64, f64),
    y_range: (f64, f64),
) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (x_range.0..x_range.1)
                .log_scale()
                .with_key_points(swept_values(series)),
            (y_range.0..y_range.1)
                .log_scale()
                .with_key_points(time_ticks(y_range)),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(format!("{symbol} (log scale)"))
        .y_desc("median time per call (ms, log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| milliseconds(*v))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;

    for s in series {
        let color = Palette99::pick(s.kernel_index).to_rgba();
        let width = if s.engine == "jit" { 2 } else { 1 };
        let line = ShapeStyle {
            color,
            filled: false,
            stroke_width: width,
        };
        let points = s.points.iter().copied().filter(|&p| drawable(p));
        // Solid for the compiled kernel, dashed for the baselines; the markers tell the engines
        // apart without colour: ● jit, ▲ naive, × interpreter. The legend shows both.
        let anchor = move |x: i32, y: i32| {
            EmptyElement::at((x, y)) + PathElement::new(vec![(0, 0), (24, 0)], line)
        };
        let drawn = if s.engine == "jit" {
            chart.draw_series(LineSeries::new(points.clone(), line))
        } else {
            chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, line))
        }
        .map_err(|e| e.to_string())?;
        let drawn = drawn.label(s.label.as_str());
        match s.engine {
            "jit" => {
                drawn.legend(move |(x, y)| anchor(x, y) + Circle::new((12, 0), 3, line.filled()));
                chart.draw_series(points.map(|p| Circle::new(p, 3, line.filled())))
            }
            "naive" => {
                drawn.legend(move |(x, y)| {
                    anchor(x, y) + TriangleMarker::new((12, 0), 4, line.filled())
                });
                chart.draw_series(points.map(|p| TriangleMarker::new(p, 4, line.filled())))
            }
            _ => {
                drawn.legend(move |(x, y)| anchor(x, y) + Cross::new((12, 0), 4, line));
                chart.draw_series(points.map(|p| Cross::new(p, 4, line)))
            }
        }
        .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// A point a log-log chart can show.
fn drawable((x, y): (f64, f64)) -> bool {
    x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0
}

/// The axis ranges, with a margin, over every drawable point; `None` when there is none.
fn ranges(series: &[Series]) -> Option<((f64, f64), (f64, f64))> {
    let points = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|&p| drawable(p))
    };
    let min = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::INFINITY, f64::min);
    let max = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::NEG_INFINITY, f64::max);
    let x = (
        min(&mut points().map(|p| p.0)),
        max(&mut points().map(|p| p.0)),
    );
    let y = (
        min(&mut points().map(|p| p.1)),
        max(&mut points().map(|p| p.1)),
    );
    if !x.0.is_finite() {
        return None;
    }
    // A factor on each side, so that a single value still spans a visible range.
    Some(((x.0 / 1.3, x.1 * 1.3), (y.0 / 2.0, y.1 * 2.0)))
}

/// The ticks of the swept axis: exactly the values timed.
fn swept_values(series: &[Series]) -> Vec<f64> {
    let mut values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&p| drawable(p))
        .map(|p| p.0)
        .collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    values
}

/// The ticks of the time axis: 1, 2, 5 times each power of ten inside `range`, or only the
/// powers of ten when that would crowd the axis.
fn time_ticks((low, high): (f64, f64)) -> Vec<f64> {
    let first = low.log10().floor() as i32;
    let last = high.log10().ceil() as i32;
    let ticks = |steps: &[f64]| -> Vec<f64> {
        (first..=last)
            .flat_map(|e| steps.iter().map(move |s| s * 10f64.powi(e)))
            .filter(|t| (low..=high).contains(t))
            .collect()
    };
    let fine = ticks(&[1.0, 2.0, 5.0]);
    if fine.len() <= 12 {
        fine
    } else {
        ticks(&[1.0])
    }
}

/// An axis label for a time in milliseconds: as many decimals as its size needs.
fn milliseconds(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else if v >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: Vec<(f64, f64)>) -> Series {
        Series {
            label: "k (jit)".to_string(),
            kernel_index: 0,
            engine: "jit",
            points,
        }
    }

    #[test]
    fn ranges_cover_every_drawable_point_and_skip_the_rest() {
        let s = [series(vec![
            (256.0, 0.5),
            (2048.0, 8.0),
            (0.0, 1.0),
            (512.0, f64::NAN),
        ])];
        let ((x0, x1), (y0, y1)) = ranges(&s).expect("drawable points");
        assert!(x0 < 256.0 && x1 > 2048.0, "{x0}..{x1}");
        assert!(y0 < 0.5 && y1 > 8.0, "{y0}..{y1}");
        assert!(ranges(&[series(vec![(0.0, 1.0)])]).is_none());
    }

    #[test]
    fn nothing_drawable_is_an_error_not_a_panic() {
        assert!(render("t", "n", &[series(vec![(1.0, f64::INFINITY)])]).is_err());
        assert!(render("t", "n", &[]).is_err());
    }

    #[test]
    fn one_point_still_renders() {
        let svg = render("t", "n", &[series(vec![(64.0, 0.25)])]).expect("renders");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn time_ticks_follow_one_two_five_inside_the_range() {
        assert_eq!(time_ticks((0.15, 3.0)), [0.2, 0.5, 1.0, 2.0]);
        let wide = time_ticks((1e-3, 1e4));
        assert_eq!(wide.len(), 8, "{wide:?}");
    }

    #[test]
    fn axis_labels_keep_small_times_readable() {
        assert_eq!(milliseconds(250.0), "250");
        assert_eq!(milliseconds(2.5), "2.5");
        assert_eq!(milliseconds(0.25), "0.25");
        assert_eq!(milliseconds(0.005), "5e-3");
    }
}
