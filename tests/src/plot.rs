//! PNG figures for the benchmarks, without system font libraries.
//!
//! plotters draws the shapes into an RGB buffer ([`BitMapBackend`]); its own
//! text support needs fontconfig/freetype, which we do not link. So the text is
//! collected as [`Label`]s placed in pixels (usually from a chart's
//! `backend_coord`) while plotters draws, and drawn afterwards with ab_glyph
//! from a TTF found at run time ([`find_font`]). Without a font the figure is
//! still written, without text, and [`finish`] says so.

use std::path::Path;

use ab_glyph::{Font, FontVec, PxScale, ScaleFont};
use anyhow::Context;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(130.0), 200.0);
        assert_eq!(nice_step(600.0), 1000.0);
    }
}
