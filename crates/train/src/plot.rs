//! Training curves as a PNG: one panel per group of CSV columns, lines over the `step` column,
//! drawn into an RGB buffer with an 8x8 bitmap font and written with the `png` crate. Empty cells
//! (columns logged only on some steps) are skipped, so sparse series show as dotted lines.

use std::path::Path;

use font8x8::UnicodeFonts;

use crate::error::{Result, TrainError};

const WIDTH: usize = 960;
const PANEL_HEIGHT: usize = 260;
const MARGIN_LEFT: usize = 70;
const MARGIN_RIGHT: usize = 20;
const MARGIN_TOP: usize = 28;
const MARGIN_BOTTOM: usize = 30;
const COLORS: [[u8; 3]; 5] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
];

/// One panel: a title and the CSV columns drawn in it.
pub struct Panel<'a> {
    pub title: &'a str,
    pub columns: &'a [&'a str],
}

struct Canvas {
    pixels: Vec<u8>,
    width: usize,
    height: usize,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self {
            pixels: vec![255; width * height * 3],
            width,
            height,
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// A two-pixel-wide line (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(c).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.set(x + (i * 8 + col) as i64, y + row as i64, color);
                    }
                }
            }
        }
    }
}

/// A compact number for axis labels.
fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.1e}")
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `panels` of the CSV at `csv` (first column `step`) into `png`.
pub fn plot_csv(csv: &Path, png: &Path, panels: &[Panel]) -> Result<()> {
    let text = std::fs::read_to_string(csv).map_err(|source| TrainError::Io {
        path: csv.to_path_buf(),
        source,
    })?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let column = |name: &str| -> Vec<(f64, f64)> {
        let Some(c) = header.iter().position(|h| *h == name) else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|r| {
                let x = r.first()?.parse::<f64>().ok()?;
                let y = r.get(c)?.parse::<f64>().ok()?;
                y.is_finite().then_some((x, y))
            })
            .collect()
    };
    let mut canvas = Canvas::new(WIDTH, PANEL_HEIGHT * panels.len().max(1));
    for (p, panel) in panels.iter().enumerate() {
        let top = (p * PANEL_HEIGHT + MARGIN_TOP) as i64;
        let bottom = ((p + 1) * PANEL_HEIGHT - MARGIN_BOTTOM) as i64;
        let (left, right) = (MARGIN_LEFT as i64, (WIDTH - MARGIN_RIGHT) as i64);
        let series: Vec<(&str, Vec<(f64, f64)>)> =
            panel.columns.iter().map(|c| (*c, column(c))).collect();
        let points = series.iter().flat_map(|(_, s)| s.iter());
        let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
        for &(x, y) in points {
            x_min = x_min.min(x);
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
        if x_max <= x_min {
            x_max = x_min.max(0.0) + 1.0;
            x_min = x_max - 1.0;
        }
        if y_max <= y_min {
            y_max = y_min + 1.0;
        }
        let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
            let px = left as f64 + (x - x_min) / (x_max - x_min) * (right - left) as f64;
            let py = bottom as f64 - (y - y_min) / (y_max - y_min) * (bottom - top) as f64;
            (px.round() as i64, py.round() as i64)
        };
        let grey = [120, 120, 120];
        canvas.line((left, top), (left, bottom), grey);
        canvas.line((left, bottom), (right, bottom), grey);
        for t in 0..=4 {
            let y = y_min + (y_max - y_min) * f64::from(t) / 4.0;
            let (_, py) = to_px((x_min, y));
            canvas.line((left - 4, py), (left, py), grey);
            canvas.text(4, py - 4, &label(y), [60, 60, 60]);
            let x = x_min + (x_max - x_min) * f64::from(t) / 4.0;
            let (px, _) = to_px((x, y_min));
            canvas.line((px, bottom), (px, bottom + 4), grey);
            canvas.text(px - 12, bottom + 8, &label(x), [60, 60, 60]);
        }
        canvas.text(left, top - 20, panel.title, [0, 0, 0]);
        let mut legend_x = left + 8 * panel.title.len() as i64 + 24;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            canvas.line((legend_x, top - 16), (legend_x + 16, top - 16), color);
            canvas.text(legend_x + 20, top - 20, name, color);
            legend_x += 20 + 8 * name.len() as i64 + 16;
            for pair in points.windows(2) {
                canvas.line(to_px(pair[0]), to_px(pair[1]), color);
            }
            if let [only] = points.as_slice() {
                let (x, y) = to_px(*only);
                canvas.line((x - 2, y), (x + 2, y), color);
            }
        }
    }
    let file = std::fs::File::create(png).map_err(|source| TrainError::Io {
        path: png.to_path_buf(),
        source,
    })?;
    let mut encoder = png::Encoder::new(
        std::io::BufWriter::new(file),
        canvas.width as u32,
        canvas.height as u32,
    );
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let io = |e: png::EncodingError| TrainError::Io {
        path: png.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut writer = encoder.write_header().map_err(io)?;
    writer.write_image_data(&canvas.pixels).map_err(io)?;
    writer.finish().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_each_series_in_its_color() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("m.csv");
        std::fs::write(&csv, "step,a,b\n0,0,\n1,1,0.5\n2,0.5,\n3,0.25,0.75\n").unwrap();
        let png_path = dir.path().join("m.png");
        plot_csv(
            &csv,
            &png_path,
            &[Panel {
                title: "test",
                columns: &["a", "b"],
            }],
        )
        .unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&png_path).unwrap(),
        ));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width, info.height),
            (WIDTH as u32, PANEL_HEIGHT as u32)
        );
        let count = |color: [u8; 3]| buf.chunks(3).filter(|p| *p == color).count();
        // Both series (and their legend entries) are drawn; the sparse one has fewer pixels.
        assert!(count(COLORS[0]) > 500, "{}", count(COLORS[0]));
        assert!(count(COLORS[1]) > 200, "{}", count(COLORS[1]));
        assert!(count(COLORS[1]) < count(COLORS[0]));
    }
}
