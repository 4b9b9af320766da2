//! Image bytes -> normalised CHW f32 pixels, as Qwen-VL's `transforms.Resize((S, S), BICUBIC)` on a PIL
//! image followed by `ToTensor` and CLIP `Normalize` (SPEC §1.2).
//!
//! The resize is PIL's own algorithm (`Resample.c`): separable convolution, the bicubic kernel
//! (a = -0.5) widened by the scale factor when shrinking (antialiasing), 8-bit fixed-point coefficients
//! with 22 fractional bits, horizontal pass first, each pass rounded and clipped to u8. On identical
//! decoded pixels it is bit-exact with PIL.

use crate::error::{Error, Result};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Per output index: first input index and fixed-point weights (PIL `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // PIL truncates toward zero with a C cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let mut k: Vec<f64> = (0..xmax).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let fixed = k
                .iter()
                .map(|&w| {
                    let v = w * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }).trunc() as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL-exact bicubic resize of an RGB8 image (row-major, 3 bytes per pixel).
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    assert_eq!(src.len(), w * h * 3);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width is unchanged, as PIL does).
    let horiz: std::borrow::Cow<[u8]> = if w == out_w {
        std::borrow::Cow::Borrowed(src)
    } else {
        let cx = coefficients(w, out_w);
        let mut tmp = vec![0u8; out_w * h * 3];
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            let orow = &mut tmp[y * out_w * 3..(y + 1) * out_w * 3];
            for (xx, (xmin, k)) in cx.iter().enumerate() {
                let (mut r, mut g, mut b) = (half, half, half);
                for (i, &kw) in k.iter().enumerate() {
                    let p = (xmin + i) * 3;
                    r += row[p] as i64 * kw as i64;
                    g += row[p + 1] as i64 * kw as i64;
                    b += row[p + 2] as i64 * kw as i64;
                }
                orow[xx * 3] = clip8(r);
                orow[xx * 3 + 1] = clip8(g);
                orow[xx * 3 + 2] = clip8(b);
            }
        }
        std::borrow::Cow::Owned(tmp)
    };
    if h == out_h {
        return horiz.into_owned();
    }
    let cy = coefficients(h, out_h);
    let mut out = vec![0u8; out_w * out_h * 3];
    let stride = out_w * 3;
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        let orow = &mut out[yy * stride..(yy + 1) * stride];
        let mut acc = vec![half; stride];
        for (i, &kw) in k.iter().enumerate() {
            let row = &horiz[(ymin + i) * stride..(ymin + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * kw as i64;
            }
        }
        for (o, a) in orow.iter_mut().zip(acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Decodes JPEG/PNG/WebP bytes to RGB8 (alpha dropped, greyscale expanded, as PIL's `convert("RGB")`).
pub fn decode_rgb8(bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize, usize)> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::Image { what: what.to_string(), detail: e.to_string() })?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Image { what: what.to_string(), detail: "empty image".into() });
    }
    Ok((rgb.into_raw(), w, h))
}

/// RGB8 (HWC) -> normalised CHW f32, written into `out` (3 * size * size values).
pub fn normalise_into(rgb: &[u8], size: usize, out: &mut [f32]) {
    let plane = size * size;
    assert_eq!(out.len(), 3 * plane);
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * CLIP_STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| CLIP_MEAN[c] / CLIP_STD[c]);
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            // (v/255 - mean)/std, as ToTensor then Normalize, folded into one multiply-add.
            out[c * plane + i] = px[c] as f32 * scale[c] - shift[c];
        }
    }
}

/// The loader's one call: image bytes -> normalised (3, size, size) f32 pixels.
pub fn preprocess_image(bytes: &[u8], size: usize, what: &str) -> Result<Vec<f32>> {
    let (rgb, w, h) = decode_rgb8(bytes, what)?;
    let resized = resize_rgb8(&rgb, w, h, size, size);
    let mut out = vec![0f32; 3 * size * size];
    normalise_into(&resized, size, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..4 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 4, 5, 4, 5), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 37 * 23 * 3];
        assert!(resize_rgb8(&src, 37, 23, 14, 14).iter().all(|&v| v == 77));
        assert!(resize_rgb8(&src, 37, 23, 100, 90).iter().all(|&v| v == 77));
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 448), (360, 448), (100, 7), (7, 100)] {
            for (_, k) in coefficients(i, o) {
                let s: i64 = k.iter().map(|&v| v as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }
}
