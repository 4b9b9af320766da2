//! Qwen3-VL's image path (SPEC-QWEN3VL.md §5): smart_resize to multiples of patch·merge within the
//! recipe's pixel budget, PIL's bicubic, (x/255 − 0.5)/0.5, and the merge-block patch rows of
//! `pixel_values` (each row C·T·p·p = 1536 values, the single frame repeated over T = 2).

use super::positions::Grid;
use crate::preprocess::{resize_rgb8, ResizeOrder};

pub const PATCH: usize = 16;
pub const TEMPORAL: usize = 2;
pub const MERGE: usize = 2;
/// patch · merge: both sides of a resized image are multiples of it.
pub const FACTOR: usize = PATCH * MERGE;
/// Values per patch row: 3 · 2 · 16 · 16.
pub const ROW: usize = 3 * TEMPORAL * PATCH * PATCH;
/// The released preprocessor_config.json's bounds (§5.1).
pub const MIN_PIXELS: usize = 65_536;
pub const MAX_PIXELS: usize = 16_777_216;

/// Python's `round` (half to even) of a non-negative ratio, as transformers' smart_resize uses it.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() == 0.0 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// The resized (height, width) of a `height` x `width` image: multiples of [`FACTOR`], pixels within
/// [min_pixels, max_pixels], the aspect ratio kept as closely as possible (transformers'
/// `smart_resize`, half-to-even rounding). An aspect ratio over 200 is an error.
pub fn smart_resize(height: usize, width: usize, min_pixels: usize, max_pixels: usize) -> Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err(format!("an image of {width}x{height} pixels"));
    }
    let (h, w) = (height as f64, width as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(format!("aspect ratio {ratio:.1} of a {width}x{height} image is over 200 (Qwen3-VL refuses it)"));
    }
    let f = FACTOR as f64;
    let mut hb = round_half_even(h / f) * f;
    let mut wb = round_half_even(w / f) * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

/// An RGB8 image (row-major) to its `pixel_values` rows and grid: resized by PIL's bicubic to
/// [`smart_resize`]'s size, normalised, laid out block by block (block_row, block_col, in_row,
/// in_col), each row (C, T, p, p).
pub fn patchify_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(Vec<f32>, Grid), String> {
    let (rh, rw) = smart_resize(height, width, min_pixels, max_pixels)?;
    let img = resize_rgb8(rgb, width, height, rw, rh, ResizeOrder::Pillow13);
    let (gh, gw) = (rh / PATCH, rw / PATCH);
    let mut out = vec![0f32; gh * gw * ROW];
    // (v/255 − 0.5)/0.5 per value, as rescale then normalise.
    let lut: [f32; 256] = std::array::from_fn(|v| (v as f32 * (1.0 / 255.0) - 0.5) / 0.5);
    let mut row = 0;
    for br in 0..gh / MERGE {
        for bc in 0..gw / MERGE {
            for ir in 0..MERGE {
                for ic in 0..MERGE {
                    let (py, px) = ((br * MERGE + ir) * PATCH, (bc * MERGE + ic) * PATCH);
                    let dst = &mut out[row * ROW..(row + 1) * ROW];
                    for c in 0..3 {
                        for y in 0..PATCH {
                            for x in 0..PATCH {
                                let v = lut[img[((py + y) * rw + px + x) * 3 + c] as usize];
                                for t in 0..TEMPORAL {
                                    dst[((c * TEMPORAL + t) * PATCH + y) * PATCH + x] = v;
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
    Ok((out, Grid { t: 1, h: gh as i64, w: gw as i64 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC-QWEN3VL.md §5.2's computed examples, 336x1040 being the half-to-even case.
    #[test]
    fn smart_resize_gives_the_specs_examples() {
        let r = |h, w| smart_resize(h, w, MIN_PIXELS, MAX_PIXELS).unwrap();
        assert_eq!(r(480, 640), (480, 640));
        assert_eq!(r(1080, 1920), (1088, 1920));
        assert_eq!(r(100, 100), (256, 256));
        assert_eq!(r(336, 1040), (320, 1024));
        let e = smart_resize(10, 2010, MIN_PIXELS, MAX_PIXELS).unwrap_err();
        assert!(e.contains("over 200"), "{e}");
    }
}
