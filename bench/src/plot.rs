//! PNG figures for the benchmarks, without system font libraries.
//!
//! plotters draws the shapes into an RGB buffer ([`BitMapBackend`]); its own
//! text support needs fontconfig/freetype, which we do not link. So the text is
//! collected as [`Label`]s placed in pixels (usually from a chart's
//! `backend_coord`) while plotters draws, and drawn afterwards with ab_glyph
//! from a TTF found at run time ([`find_font`]). Without a font the figure is
//! still written, without text, and [`finish`] says so.
//!
//! [`render_panels`] draws the migration benchmark's figure (issue 7): line
//! charts in a grid with min–max whiskers, a dashed floor and one legend.

use std::path::Path;

use ab_glyph::{Font, FontVec, PxScale, ScaleFont};
use anyhow::Context;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// Where a label's anchor is, along the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Center,
    Right,
}

/// A line of text placed in pixels, drawn after plotters is done.
#[derive(Clone, Debug)]
pub struct Label {
    /// The anchor: horizontally per `align`, vertically the text's middle.
    /// For vertical text, the other way round.
    pub x: i32,
    pub y: i32,
    pub text: String,
    /// Font size in pixels.
    pub px: f32,
    pub align: Align,
    pub color: [u8; 3],
    /// Read bottom to top (an y axis' label); `Left` is then the bottom end.
    pub vertical: bool,
}

impl Label {
    pub fn new(x: i32, y: i32, text: impl Into<String>, px: f32, align: Align, color: [u8; 3]) -> Label {
        Label { x, y, text: text.into(), px, align, color, vertical: false }
    }

    /// The same label, turned to read bottom to top.
    pub fn vertical(self) -> Label {
        Label { vertical: true, ..self }
    }
}

/// TTFs tried in order after `$UMS_BENCH_FONT`: Debian/Ubuntu paths of the
/// usual sans fonts.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// The first font that loads: `$UMS_BENCH_FONT`, then [`FONTS`].
pub fn find_font() -> Option<FontVec> {
    let mut paths: Vec<String> = std::env::var("UMS_BENCH_FONT").ok().into_iter().collect();
    paths.extend(FONTS.iter().map(|s| s.to_string()));
    paths.iter().find_map(|p| std::fs::read(p).ok().and_then(|b| FontVec::try_from_vec(b).ok()))
}

/// The advance width of `text` at `px` pixels; without a font, an estimate
/// (so that layouts come out about the same, and text-less figures still
/// leave room for it).
pub fn text_width(font: Option<&FontVec>, px: f32, text: &str) -> f32 {
    let Some(font) = font else { return 0.55 * px * text.chars().count() as f32 };
    let sf = font.as_scaled(PxScale::from(px));
    let mut width = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            width += sf.kern(p, id);
        }
        width += sf.h_advance(id);
        prev = Some(id);
    }
    width
}

/// Draws `l` into the RGB buffer `buf` of `size` (width, height) pixels,
/// blending by coverage; pixels outside the buffer are skipped.
pub fn draw_text(buf: &mut [u8], size: (u32, u32), font: &FontVec, l: &Label) {
    let (w, h) = (size.0 as i32, size.1 as i32);
    let sf = font.as_scaled(PxScale::from(l.px));
    let width = text_width(Some(font), l.px, &l.text);
    // Horizontal text is laid out at its place; vertical text around (0, 0),
    // then turned a quarter anticlockwise onto its anchor.
    let (ox, oy) = if l.vertical { (0, 0) } else { (l.x, l.y) };
    let x0 = match l.align {
        Align::Left => ox as f32,
        Align::Center => ox as f32 - width / 2.0,
        Align::Right => ox as f32 - width,
    };
    let baseline = oy as f32 + (sf.ascent() + sf.descent()) / 2.0;
    let mut caret = x0;
    let mut prev = None;
    for c in l.text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        let g = id.with_scale_and_position(l.px, ab_glyph::point(caret, baseline));
        caret += sf.h_advance(id);
        prev = Some(id);
        let Some(og) = font.outline_glyph(g) else { continue };
        let b = og.px_bounds();
        og.draw(|gx, gy, cov| {
            let (tx, ty) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
            let (px, py) = if l.vertical { (l.x + ty, l.y - tx) } else { (tx, ty) };
            if px < 0 || py < 0 || px >= w || py >= h {
                return;
            }
            let i = (py as usize * w as usize + px as usize) * 3;
            for k in 0..3 {
                let (bg, fg) = (buf[i + k] as f32, l.color[k] as f32);
                buf[i + k] = (bg + (fg - bg) * cov.min(1.0)).round() as u8;
            }
        });
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ at least `raw`: a tick step people read easily.
pub fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// Writes an RGB buffer of `size` (width, height) as an 8-bit PNG, creating
/// the parent directory.
pub fn write_png(path: &Path, buf: &[u8], size: (u32, u32)) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}", path.display()))?);
    let mut enc = png::Encoder::new(f, size.0, size.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(buf).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The last step of a figure: draws `labels` onto the buffer plotters drew
/// into (if a font is found) and writes the PNG. Returns whether text could be
/// drawn.
pub fn finish(buf: &mut [u8], size: (u32, u32), labels: &[Label], path: &Path) -> anyhow::Result<bool> {
    let font = find_font();
    if let Some(font) = &font {
        for l in labels {
            draw_text(buf, size, font, l);
        }
    }
    write_png(path, buf, size)?;
    Ok(font.is_some())
}

/// A decoded 8-bit RGB PNG (for tests of the figures).
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Image {
    /// Pixels that are not pure white: a figure that drew nothing has none.
    pub fn non_white(&self) -> usize {
        self.rgb.chunks_exact(3).filter(|p| p != &[255, 255, 255]).count()
    }
}

/// Reads a PNG written by [`write_png`] (8-bit RGB only).
pub fn read_png(path: &Path) -> anyhow::Result<Image> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(f)).read_info()?;
    let mut rgb = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut rgb)?;
    anyhow::ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "{}: {:?} {:?}, not 8-bit RGB",
        path.display(),
        info.color_type,
        info.bit_depth
    );
    rgb.truncate(info.buffer_size());
    Ok(Image { width: info.width, height: info.height, rgb })
}

// ------------------------------------------------------------ panels of lines

/// One line of a [`Panel`]: a method's results against the x variable.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend's text; series of different panels with the same label are
    /// one legend entry (same marker).
    pub label: String,
    pub color: [u8; 3],
    pub points: Vec<SeriesPoint>,
}

/// A point of a [`Series`]: the median of the runs, drawn as a marker on the
/// line, and their range, drawn as a whisker.
#[derive(Clone, Copy, Debug)]
pub struct SeriesPoint {
    pub x: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl SeriesPoint {
    fn finite(&self) -> bool {
        self.x.is_finite() && self.median.is_finite()
    }
}

/// One chart of [`render_panels`].
#[derive(Clone, Debug)]
pub struct Panel {
    /// Above the chart, e.g. "1 Gbit/s link: migration time".
    pub title: String,
    /// e.g. "workload memory (MiB)".
    pub x_label: String,
    /// e.g. "seconds".
    pub y_label: String,
    /// One line per method; a method without data here is just absent (or
    /// has no points). Non-finite values are skipped.
    pub series: Vec<Series>,
    /// A lower bound the methods cannot beat (the wire time): drawn dashed,
    /// medians only, in its own color (grey reads as "reference"), with its
    /// label in the legend ("wire time (floor)").
    pub floor: Option<Series>,
    /// A logarithmic y axis (decades), for panels whose series lie an order
    /// of magnitude apart (ums beside the UMS paper's figures): on a linear
    /// axis the smaller ones would sit flat on the bottom.
    pub log_y: bool,
}

/// Pixels of one panel, title and axes included.
const PANEL_W: u32 = 640;
const PANEL_H: u32 = 440;
const TITLE_PX: f32 = 20.0;
const PANEL_TITLE_PX: f32 = 16.0;
const AXIS_PX: f32 = 15.0;
const TICK_PX: f32 = 14.0;
const LEGEND_PX: f32 = 15.0;
const LEGEND_ROW: i32 = 26;
/// The legend's sample line, the room it takes with its space before the text,
/// and the space between entries.
const LEGEND_LINE: i32 = 34;
const LEGEND_SWATCH: i32 = 44;
const LEGEND_GAP: i32 = 28;
/// Where the legend starts (below the figure's title).
const LEGEND_TOP: i32 = 44;
const BLACK_TEXT: [u8; 3] = [0, 0, 0];

/// The marker of the `i`th legend entry: shapes besides colors, so that lines
/// stay apart in grey print and for color-blind readers.
#[derive(Clone, Copy)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Marker {
    fn nth(i: usize) -> Marker {
        [Marker::Circle, Marker::Square, Marker::Triangle, Marker::Diamond][i % 4]
    }

    fn draw<DB: DrawingBackend>(
        self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
        (x, y): (i32, i32),
        color: RGBColor,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let style = color.filled();
        let r = 5;
        match self {
            Marker::Circle => area.draw(&Circle::new((x, y), r, style)),
            Marker::Square => area.draw(&Rectangle::new([(x - r + 1, y - r + 1), (x + r - 1, y + r - 1)], style)),
            Marker::Triangle => {
                area.draw(&Polygon::new(vec![(x, y - r - 1), (x - r - 1, y + r - 1), (x + r + 1, y + r - 1)], style))
            }
            Marker::Diamond => {
                area.draw(&Polygon::new(vec![(x, y - r - 1), (x + r, y), (x, y + r + 1), (x - r, y)], style))
            }
        }
        .map_err(|e| anyhow::anyhow!("drawing a marker: {e}"))
    }
}

/// A legend entry: every distinct series label, first seen first.
struct Entry {
    label: String,
    color: [u8; 3],
    /// None: the floor (a dashed line instead of a marker).
    marker: Option<Marker>,
}

fn legend(panels: &[Panel]) -> (Vec<Entry>, usize) {
    let mut entries: Vec<Entry> = Vec::new();
    for s in panels.iter().flat_map(|p| &p.series).filter(|s| s.points.iter().any(SeriesPoint::finite)) {
        if !entries.iter().any(|e| e.label == s.label) {
            let marker = Some(Marker::nth(entries.len()));
            entries.push(Entry { label: s.label.clone(), color: s.color, marker });
        }
    }
    let methods = entries.len();
    for f in panels.iter().filter_map(|p| p.floor.as_ref()).filter(|s| s.points.iter().any(SeriesPoint::finite)) {
        if !entries.iter().any(|e| e.label == f.label) {
            entries.push(Entry { label: f.label.clone(), color: f.color, marker: None });
        }
    }
    (entries, methods)
}

/// Legend rows: entries in order, a new row when one would pass `width`.
fn legend_rows(entries: &[Entry], font: Option<&FontVec>, width: i32) -> Vec<Vec<(usize, i32)>> {
    let mut rows: Vec<Vec<(usize, i32)>> = Vec::new();
    let mut row = Vec::new();
    let mut used = 0;
    for (i, e) in entries.iter().enumerate() {
        let w = LEGEND_SWATCH + text_width(font, LEGEND_PX, &e.label).ceil() as i32;
        if !row.is_empty() && used + LEGEND_GAP + w > width {
            rows.push(std::mem::take(&mut row));
            used = 0;
        }
        used += if row.is_empty() { w } else { LEGEND_GAP + w };
        row.push((i, w));
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// y tick labels: integers when the step is, else as many decimals as it has
/// (0.0, 0.5, 1.0 rather than 0, 0.5, 1).
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10()).ceil() as usize };
    format!("{v:.decimals$}")
}

/// A log axis's tick at decade `t` (log10 of the value): 0.01, 0.1, 1, 10, 100.
fn decade_label(t: f64) -> String {
    let v = 10f64.powf(t);
    if t >= 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.prec$}", prec = (-t).round() as usize)
    }
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// Renders `panels` in a grid of `cols` columns under `title`, with one legend
/// for all of them, to a PNG at `path` (640×440 pixels a panel, plus the title
/// and legend). Each panel has a linear x axis with ticks at the x values of
/// its data, a linear y axis from 0 with round ticks, a grid, a line per
/// series with a marker at each median and a whisker from min to max, and
/// the floor dashed below them. Returns whether text could be drawn (a font
/// was found).
pub fn render_panels(title: &str, panels: &[Panel], cols: usize, path: &Path) -> anyhow::Result<bool> {
    let cols = cols.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let font = find_font();
    let (entries, methods) = legend(panels);
    let width = PANEL_W * cols as u32;
    let legend_layout = legend_rows(&entries, font.as_ref(), width as i32 - 40);
    let top = LEGEND_TOP + LEGEND_ROW * legend_layout.len() as i32 + 8;
    let size = (width, top as u32 + PANEL_H * rows as u32 + 8);
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    let mut labels = vec![Label::new(size.0 as i32 / 2, 22, title, TITLE_PX, Align::Center, BLACK_TEXT)];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        // The legend, centered row by row under the title.
        for (r, row) in legend_layout.iter().enumerate() {
            let total: i32 = row.iter().map(|(_, w)| w).sum::<i32>() + LEGEND_GAP * (row.len() as i32 - 1);
            let mut x = (size.0 as i32 - total) / 2;
            let y = LEGEND_TOP + LEGEND_ROW * r as i32 + LEGEND_ROW / 2;
            for &(i, w) in row {
                let e = &entries[i];
                let color = rgb(e.color);
                match e.marker {
                    Some(m) => {
                        root.draw(&PathElement::new(vec![(x, y), (x + LEGEND_LINE, y)], color.stroke_width(2)))
                            .map_err(plot_err)?;
                        m.draw(&root, (x + LEGEND_LINE / 2, y), color)?;
                    }
                    None => {
                        root.draw(&DashedPathElement::new(
                            vec![(x, y), (x + LEGEND_LINE, y)],
                            6,
                            4,
                            color.stroke_width(2),
                        ))
                        .map_err(plot_err)?;
                    }
                }
                labels.push(Label::new(x + LEGEND_SWATCH, y, e.label.clone(), LEGEND_PX, Align::Left, BLACK_TEXT));
                x += w + LEGEND_GAP;
            }
        }
        let (_, grid_area) = root.split_vertically(top);
        let areas = grid_area.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(&areas) {
            draw_panel(panel, area, &root, &entries, methods, font.as_ref(), &mut labels)?;
        }
        root.present().map_err(plot_err)?;
    }
    let drew_text = font.is_some();
    if let Some(font) = &font {
        for l in &labels {
            draw_text(&mut buf, size, font, l);
        }
    }
    write_png(path, &buf, size)?;
    Ok(drew_text)
}

/// One panel into `area`; markers, whiskers and the legend-consistent dodge are
/// drawn in pixels on `root`, text goes to `labels`.
/// A panel's y axis: bottom, top, step and ticks (in drawn units), and the
/// map from a value to drawn units (itself, or log10 on a log axis).
type YAxis = (f64, f64, f64, Vec<f64>, Box<dyn Fn(f64) -> f64>);

fn draw_panel<DB: DrawingBackend>(
    panel: &Panel,
    area: &DrawingArea<DB, plotters::coord::Shift>,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[Entry],
    methods: usize,
    font: Option<&FontVec>,
    labels: &mut Vec<Label>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let finite = |s: &Series| -> Vec<SeriesPoint> {
        let mut v: Vec<SeriesPoint> = s.points.iter().copied().filter(SeriesPoint::finite).collect();
        v.sort_by(|a, b| a.x.total_cmp(&b.x));
        v
    };
    let series: Vec<(&Series, Vec<SeriesPoint>)> =
        panel.series.iter().map(|s| (s, finite(s))).filter(|(_, p)| !p.is_empty()).collect();
    let floor: Option<Vec<SeriesPoint>> = panel.floor.as_ref().map(finite).filter(|p| !p.is_empty());
    let all = || series.iter().flat_map(|(_, p)| p.iter()).chain(floor.iter().flatten());

    // x: the data's x values as ticks, a little room either side so that
    // markers and whiskers at the ends stay off the axes.
    let mut xticks: Vec<f64> = all().map(|p| p.x).collect();
    xticks.sort_by(f64::total_cmp);
    xticks.dedup();
    let (x0, x1) = match (xticks.first(), xticks.last()) {
        (Some(&a), Some(&b)) if b > a => (a, b),
        (Some(&a), _) => (a - 1.0, a + 1.0),
        _ => (0.0, 1.0),
    };
    let pad = (x1 - x0) * 0.04;
    let (xmin, xmax) = (x0 - pad, x1 + pad);
    // y: from 0 to a round value above every whisker; or, on a log axis,
    // the decades around every value (drawn as log10 of the value).
    let top = all().map(|p| p.max.max(p.median)).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let (ybot, ymax, ystep, yticks, ty): YAxis = if panel.log_y {
        let low = all().map(|p| p.min.min(p.median)).filter(|v| v.is_finite() && *v > 0.0).fold(f64::MAX, f64::min);
        let low = if low == f64::MAX { 0.1 } else { low };
        let (lo, hi) = (low.log10().floor(), top.max(low * 10.0).log10().ceil());
        let floor_value = 10f64.powf(lo);
        let ticks: Vec<f64> = (lo as i32..=hi as i32).map(f64::from).collect();
        (lo, hi, 1.0, ticks, Box::new(move |v: f64| v.max(floor_value).log10()))
    } else {
        let ystep = nice_step(if top > 0.0 { top * 1.05 / 5.0 } else { 0.2 });
        let ymax = ((top * 1.05 / ystep).ceil() * ystep).max(ystep);
        let ticks = (0..).map(|i| i as f64 * ystep).take_while(|v| *v <= ymax + ystep * 1e-6).collect();
        (0.0, ymax, ystep, ticks, Box::new(|v: f64| v))
    };

    let mut chart = ChartBuilder::on(area)
        .margin_top(40)
        .margin_right(24)
        .margin_left(86)
        .margin_bottom(62)
        .build_cartesian_2d(xmin..xmax, ybot..ymax)
        .map_err(plot_err)?;
    let grid = RGBColor(225, 225, 225);
    for &x in &xticks {
        chart.draw_series(LineSeries::new([(x, ybot), (x, ymax)], grid)).map_err(plot_err)?;
    }
    for &y in &yticks {
        chart.draw_series(LineSeries::new([(xmin, y), (xmax, y)], grid)).map_err(plot_err)?;
    }
    if let (Some(floor), Some(f)) = (&floor, &panel.floor) {
        let style = rgb(f.color).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(floor.iter().map(|p| (p.x, ty(p.median))), 8, 5, style))
            .map_err(plot_err)?;
    }
    chart
        .draw_series(std::iter::once(Rectangle::new([(xmin, ybot), (xmax, ymax)], BLACK.stroke_width(1))))
        .map_err(plot_err)?;
    // Methods close to each other would hide each other's whiskers: each is
    // shifted by a few pixels, by its legend position, the same in every panel.
    let dodge = |label: &str| -> i32 {
        let i = entries.iter().position(|e| e.label == label).unwrap_or(0) as f64;
        ((i - (methods.max(1) as f64 - 1.0) / 2.0) * 5.0).round() as i32
    };
    let px = |x: f64, y: f64| chart.backend_coord(&(x, ty(y)));
    for (s, points) in &series {
        let color = rgb(s.color);
        let dx = dodge(&s.label);
        let marker = entries.iter().find(|e| e.label == s.label).and_then(|e| e.marker).unwrap_or(Marker::Circle);
        let line: Vec<(i32, i32)> = points.iter().map(|p| px(p.x, p.median)).map(|(x, y)| (x + dx, y)).collect();
        root.draw(&PathElement::new(line, color.stroke_width(2))).map_err(plot_err)?;
        for p in points {
            let (x, y) = px(p.x, p.median);
            if p.min.is_finite() && p.max.is_finite() && p.max > p.min {
                let (_, lo) = px(p.x, p.min.max(0.0));
                let (_, hi) = px(p.x, p.max);
                let w = color.stroke_width(1);
                let x = x + dx;
                root.draw(&PathElement::new(vec![(x, lo), (x, hi)], w)).map_err(plot_err)?;
                root.draw(&PathElement::new(vec![(x - 4, lo), (x + 4, lo)], w)).map_err(plot_err)?;
                root.draw(&PathElement::new(vec![(x - 4, hi), (x + 4, hi)], w)).map_err(plot_err)?;
            }
            marker.draw(root, (x + dx, y), color)?;
        }
    }

    // Text. x tick labels that would run into the previous one are left out
    // (64 next to 0 on a 1024-wide axis is fine at this size, 8 next to 0 not).
    let chart_px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    let (_, ybottom) = chart_px(xmin, ybot);
    let mut last_right = i32::MIN;
    for &x in &xticks {
        let (tx, _) = chart_px(x, ybot);
        let text = format!("{x}");
        let half = (text_width(font, TICK_PX, &text) / 2.0).ceil() as i32;
        if tx - half < last_right + 6 {
            continue;
        }
        last_right = tx + half;
        labels.push(Label::new(tx, ybottom + 14, text, TICK_PX, Align::Center, BLACK_TEXT));
    }
    let (xleft, _) = chart_px(xmin, ybot);
    let mut widest = 0.0f32;
    for &y in &yticks {
        let (_, ty) = chart_px(xmin, y);
        let text = if panel.log_y { decade_label(y) } else { tick_label(y, ystep) };
        widest = widest.max(text_width(font, TICK_PX, &text));
        labels.push(Label::new(xleft - 8, ty, text, TICK_PX, Align::Right, BLACK_TEXT));
    }
    let (xright, ytop) = chart_px(xmax, ymax);
    let mid_x = (xleft + xright) / 2;
    labels.push(Label::new(mid_x, ybottom + 42, panel.x_label.clone(), AXIS_PX, Align::Center, BLACK_TEXT));
    let y_label_x = xleft - 8 - widest.ceil() as i32 - 16;
    labels.push(
        Label::new(y_label_x, (ytop + ybottom) / 2, panel.y_label.clone(), AXIS_PX, Align::Center, BLACK_TEXT)
            .vertical(),
    );
    labels.push(Label::new(mid_x, ytop - 20, panel.title.clone(), PANEL_TITLE_PX, Align::Center, BLACK_TEXT));
    if series.is_empty() && floor.is_none() {
        labels.push(Label::new(mid_x, (ytop + ybottom) / 2, "no data", AXIS_PX, Align::Center, [120, 120, 120]));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made-up numbers shaped like the migration benchmark's: a 2×2 grid,
    /// four methods, one of them missing from a panel, and the wire floor.
    fn example() -> Vec<Panel> {
        let mib = [0.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
        let methods: [(&str, [u8; 3], f64, f64); 4] = [
            ("ums migrate", [31, 90, 200], 0.35, 1.02),
            ("stop-then-copy (UMS container-level)", [220, 120, 20], 0.5, 1.1),
            ("CRIU page server", [40, 150, 70], 0.6, 1.05),
            ("podman checkpoint --export / restore --import", [200, 40, 60], 2.5, 1.6),
        ];
        let mut panels = Vec::new();
        for (link, secs_per_mib) in [("1 Gbit/s link", 8.0 / 1000.0), ("unlimited link", 8.0 / 20000.0)] {
            for (what, downtime) in [("migration time", false), ("downtime", true)] {
                let series = methods
                    .iter()
                    .filter(|(name, ..)| !(downtime && name.starts_with("podman") && link.starts_with("unlimited")))
                    .map(|&(name, color, base, slope)| {
                        let points = mib
                            .iter()
                            .map(|&x| {
                                let scale = if downtime && name == "ums migrate" { 0.15 } else { 1.0 };
                                let m = (base + x * secs_per_mib * slope) * scale;
                                SeriesPoint { x, median: m, min: m * 0.9, max: m * 1.15 }
                            })
                            .collect();
                        Series { label: name.to_string(), color, points }
                    })
                    .collect();
                let floor = Series {
                    label: "wire time (floor)".into(),
                    color: [120, 120, 120],
                    points: mib
                        .iter()
                        .map(|&x| {
                            let m = x * secs_per_mib;
                            SeriesPoint { x, median: m, min: m, max: m }
                        })
                        .collect(),
                };
                let mut series: Vec<Series> = series;
                let log_y = link.starts_with("1 Gbit") && !downtime;
                if log_y {
                    series.push(Series {
                        label: "UMS paper: container-level".into(),
                        color: [140, 60, 160],
                        points: [(0.0, 8.42), (128.0, 14.72), (1024.0, 76.85)]
                            .iter()
                            .map(|&(x, m)| SeriesPoint { x, median: m, min: m, max: m })
                            .collect(),
                    });
                }
                panels.push(Panel {
                    title: format!("{link}: {what}"),
                    x_label: "workload memory (MiB)".into(),
                    y_label: "seconds".into(),
                    series,
                    floor: Some(floor),
                    log_y,
                });
            }
        }
        panels
    }

    #[test]
    fn panels_render_to_a_png_of_the_right_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("panels.png");
        let text =
            render_panels("migration time and downtime against memory size", &example(), 2, &path).expect("render");
        let img = read_png(&path).expect("decode");
        assert_eq!(img.width, 2 * PANEL_W);
        assert!(img.height > 2 * PANEL_H && img.height < 2 * PANEL_H + 200, "height {}", img.height);
        assert!(img.non_white() > 20_000, "{} non-white pixels (text: {text})", img.non_white());
        if let Some(out) = std::env::var_os("UMS_TEST_PLOT_PNG") {
            std::fs::copy(&path, out).expect("copy");
        }
    }

    #[test]
    fn empty_panels_still_render() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.png");
        let panel = Panel {
            title: "nothing".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series { label: "a".into(), color: [0, 0, 0], points: vec![] }],
            floor: None,
            log_y: false,
        };
        render_panels("empty", &[panel], 2, &path).expect("render");
        let img = read_png(&path).expect("decode");
        assert_eq!(img.width, PANEL_W);
    }

    #[test]
    fn a_log_axis_spans_the_decades_of_its_values() {
        assert_eq!(decade_label(-2.0), "0.01");
        assert_eq!(decade_label(-1.0), "0.1");
        assert_eq!(decade_label(0.0), "1");
        assert_eq!(decade_label(2.0), "100");
        // ums at a fraction of a second beside the paper's tens of seconds:
        // both drawn, neither flat on the axis.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.png");
        let pts = |v: &[(f64, f64)]| v.iter().map(|&(x, m)| SeriesPoint { x, median: m, min: m, max: m }).collect();
        let panel = Panel {
            title: "1 Gbit/s link: migration time".into(),
            x_label: "workload memory (MiB)".into(),
            y_label: "seconds (log)".into(),
            series: vec![
                Series {
                    label: "ums".into(),
                    color: [31, 90, 200],
                    points: pts(&[(0.0, 0.48), (128.0, 1.57), (1024.0, 10.08)]),
                },
                Series {
                    label: "UMS paper: container-level".into(),
                    color: [140, 60, 160],
                    points: pts(&[(0.0, 8.42), (128.0, 14.72), (1024.0, 76.85)]),
                },
            ],
            floor: None,
            log_y: true,
        };
        render_panels("log", &[panel], 1, &path).expect("render");
        let img = read_png(&path).expect("decode");
        assert!(img.non_white() > 5_000, "{} non-white pixels", img.non_white());
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(130.0), 200.0);
        assert_eq!(nice_step(600.0), 1000.0);
    }
}
