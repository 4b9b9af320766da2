//! Image bytes -> normalised CHW f32 pixels, as Qwen-VL's `transforms.Resize((S, S), BICUBIC)` on a PIL
//! image followed by `ToTensor` and CLIP `Normalize` (SPEC §1.2).
//!
//! The resize is PIL's own algorithm (`Resample.c`): separable convolution, the bicubic kernel
//! (a = -0.5) widened by the scale factor when shrinking (antialiasing), 8-bit fixed-point coefficients
//! with 22 fractional bits, each pass rounded and clipped to u8. On identical decoded pixels it is
//! bit-exact with PIL.
//!
//! The order of the two passes matters (the intermediate image is rounded to u8) and changed in Pillow
//! 13.0 (python-pillow/Pillow PR #9549, `ImagingResampleInner`): the vertical pass runs first when the
//! height shrinks by more than twice as many pixels as the width does (`H - h > 0 && H - h > 2 (W - w)`);
//! Pillow 12.2 and every earlier release (the original Qwen-VL environment used 10.x) always run the
//! horizontal pass first. [`ResizeOrder`] picks the rule; the default follows the Pillow the project pins
//! (13.0.0, `scripts/setup.sh`).

use crate::error::{Error, Result};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Which Pillow's pass order the resize reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ResizeOrder {
    /// Pillow >= 13.0: vertical pass first when the height shrinks by more than twice the width's shrink.
    #[default]
    Pillow13,
    /// Pillow <= 12.2 (and 10.x, the original Qwen-VL environment): always the horizontal pass first.
    Pillow12,
}

impl ResizeOrder {
    /// True when the horizontal pass runs first for a `w` x `h` -> `out_w` x `out_h` resize.
    pub fn horizontal_first(self, w: usize, h: usize, out_w: usize, out_h: usize) -> bool {
        match self {
            ResizeOrder::Pillow12 => true,
            ResizeOrder::Pillow13 => {
                let dy = h as i64 - out_h as i64;
                let dx = w as i64 - out_w as i64;
                !(dy > 0 && dy > dx * 2)
            }
        }
    }
}

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

/// Fixed-point taps of one pass, in a flat layout: every output index reads exactly `n` consecutive inputs
/// from `start[o]` (windows are shifted inside the image and padded with zero weights, which changes no
/// sum), so the inner loops have one length the compiler can unroll.
struct Taps {
    n: usize,
    start: Vec<usize>,
    k: Vec<i32>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        let c = coefficients(in_size, out_size);
        let n = c.iter().map(|(_, k)| k.len()).max().unwrap_or(1).max(1);
        debug_assert!(n <= in_size);
        let mut start = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * n];
        for (o, (xmin, w)) in c.iter().enumerate() {
            let s = (*xmin).min(in_size - n);
            start.push(s);
            k[o * n + (xmin - s)..o * n + (xmin - s) + w.len()].copy_from_slice(w);
        }
        Self { n, start, k }
    }
}

/// PIL's 8bpc passes accumulate in a C `int`; the sums fit (|taps| <= ~1.3 * 2^22, pixels <= 255).
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over interleaved RGB rows, with `N` taps known at compile time.
#[inline(always)]
fn horizontal_n<const N: usize>(src: &[u8], w: usize, h: usize, t: &Taps, out_w: usize, out: &mut [u8]) {
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        let orow = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let (px, _) = row[t.start[xx] * 3..t.start[xx] * 3 + 3 * N].as_chunks::<3>();
            let px: &[[u8; 3]; N] = px.try_into().expect("window");
            let kk: &[i32; N] = t.k[xx * N..xx * N + N].try_into().expect("taps");
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for i in 0..N {
                r += px[i][0] as i32 * kk[i];
                g += px[i][1] as i32 * kk[i];
                b += px[i][2] as i32 * kk[i];
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
}

#[inline(always)]
fn horizontal_any(src: &[u8], w: usize, h: usize, t: &Taps, out_w: usize, out: &mut [u8]) {
    let n = t.n;
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        let orow = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let px = &row[t.start[xx] * 3..t.start[xx] * 3 + 3 * n];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &kw) in px.chunks_exact(3).zip(&t.k[xx * n..xx * n + n]) {
                r += p[0] as i32 * kw;
                g += p[1] as i32 * kw;
                b += p[2] as i32 * kw;
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
}

#[inline(always)]
fn horizontal(src: &[u8], w: usize, h: usize, t: &Taps, out_w: usize, out: &mut [u8]) {
    match t.n {
        4 => horizontal_n::<4>(src, w, h, t, out_w, out),
        5 => horizontal_n::<5>(src, w, h, t, out_w, out),
        6 => horizontal_n::<6>(src, w, h, t, out_w, out),
        7 => horizontal_n::<7>(src, w, h, t, out_w, out),
        8 => horizontal_n::<8>(src, w, h, t, out_w, out),
        _ => horizontal_any(src, w, h, t, out_w, out),
    }
}

/// Where the vertical pass puts each finished output row.
trait RowSink {
    fn row(&mut self, y: usize, acc: &[i32]);
}

struct U8Rows<'a>(&'a mut [u8]);

impl RowSink for U8Rows<'_> {
    #[inline(always)]
    fn row(&mut self, y: usize, acc: &[i32]) {
        let n = acc.len();
        for (o, &a) in self.0[y * n..(y + 1) * n].iter_mut().zip(acc) {
            *o = clip8(a);
        }
    }
}

/// Rounds to u8 exactly as the two-pass resize, then ToTensor + Normalize into CHW planes.
struct NormalisedRows<'a> {
    out: &'a mut [f32],
    width: usize,
    lut: [[f32; 256]; 3],
}

impl RowSink for NormalisedRows<'_> {
    #[inline(always)]
    fn row(&mut self, y: usize, acc: &[i32]) {
        let plane = self.out.len() / 3;
        let (r, rest) = self.out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let span = y * self.width..(y + 1) * self.width;
        for (((px, r), g), b) in acc.chunks_exact(3).zip(&mut r[span.clone()]).zip(&mut g[span.clone()]).zip(&mut b[span]) {
            *r = self.lut[0][clip8(px[0]) as usize];
            *g = self.lut[1][clip8(px[1]) as usize];
            *b = self.lut[2][clip8(px[2]) as usize];
        }
    }
}

/// Vertical pass over rows of `stride` bytes: one i32 accumulator row, each tap a multiply-add over the
/// whole row (the loop the compiler vectorises).
#[inline(always)]
fn vertical<S: RowSink>(src: &[u8], stride: usize, t: &Taps, out_h: usize, sink: &mut S) {
    let mut acc = vec![HALF; stride];
    for yy in 0..out_h {
        acc.fill(HALF);
        for i in 0..t.n {
            let kw = t.k[yy * t.n + i];
            let row = &src[(t.start[yy] + i) * stride..(t.start[yy] + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * kw;
            }
        }
        sink.row(yy, &acc);
    }
}

/// Feeds finished u8 rows to the sink unchanged (as a pass that is not needed: PIL skips it).
#[inline(always)]
fn pass_through<S: RowSink>(rows: &[u8], stride: usize, n: usize, sink: &mut S) {
    let mut acc = vec![0i32; stride];
    for y in 0..n {
        for (a, &p) in acc.iter_mut().zip(&rows[y * stride..(y + 1) * stride]) {
            *a = ((p as i32) << PRECISION_BITS) + HALF;
        }
        sink.row(y, &acc);
    }
}

/// Both passes in `order`'s sequence; a pass whose size does not change is skipped (as PIL), and the
/// last finished rows always go through the sink.
#[inline(always)]
fn resize_into<S: RowSink>(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, order: ResizeOrder, sink: &mut S) {
    if order.horizontal_first(w, h, out_w, out_h) {
        let horiz: std::borrow::Cow<[u8]> = if w == out_w {
            std::borrow::Cow::Borrowed(src)
        } else {
            let mut tmp = vec![0u8; out_w * h * 3];
            horizontal(src, w, h, &Taps::new(w, out_w), out_w, &mut tmp);
            std::borrow::Cow::Owned(tmp)
        };
        if h == out_h {
            return pass_through(&horiz, out_w * 3, h, sink);
        }
        vertical(&horiz, out_w * 3, &Taps::new(h, out_h), out_h, sink);
    } else {
        // Vertical first (the height shrinks, so h != out_h): u8 rows of the full input width, then the
        // horizontal pass, whose u8 output rows go to the sink.
        let mut vert = vec![0u8; w * out_h * 3];
        vertical(src, w * 3, &Taps::new(h, out_h), out_h, &mut U8Rows(&mut vert));
        if w == out_w {
            return pass_through(&vert, w * 3, out_h, sink);
        }
        let mut out = vec![0u8; out_w * out_h * 3];
        horizontal(&vert, w, out_h, &Taps::new(w, out_w), out_w, &mut out);
        pass_through(&out, out_w * 3, out_h, sink);
    }
}

/// Runs `f` compiled for AVX2 when the CPU has it (the vertical pass then multiplies 8 lanes at a time),
/// else for the baseline target. Same integer arithmetic, same result.
fn dispatch<S: RowSink>(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, order: ResizeOrder, sink: &mut S) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<S: RowSink>(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, order: ResizeOrder, sink: &mut S) {
            resize_into(src, w, h, out_w, out_h, order, sink)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above); the function is safe Rust otherwise.
            return unsafe { avx2(src, w, h, out_w, out_h, order, sink) };
        }
    }
    resize_into(src, w, h, out_w, out_h, order, sink)
}

/// PIL-exact bicubic resize of an RGB8 image (row-major, 3 bytes per pixel), passes in `order`.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, order: ResizeOrder) -> Vec<u8> {
    assert_eq!(src.len(), w * h * 3);
    if w == out_w && h == out_h {
        return src.to_vec();
    }
    let mut out = vec![0u8; out_w * out_h * 3];
    dispatch(src, w, h, out_w, out_h, order, &mut U8Rows(&mut out));
    out
}

fn normalise_lut() -> [[f32; 256]; 3] {
    // (v/255 - mean)/std, as ToTensor then Normalize, folded into one multiply-add per value.
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * CLIP_STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| CLIP_MEAN[c] / CLIP_STD[c]);
    std::array::from_fn(|c| std::array::from_fn(|v| v as f32 * scale[c] - shift[c]))
}

/// PIL-exact resize to `size` x `size` straight into normalised CHW f32 (`out`: 3 * size * size values),
/// without the intermediate u8 image.
pub fn resize_normalise_into(src: &[u8], w: usize, h: usize, size: usize, order: ResizeOrder, out: &mut [f32]) {
    assert_eq!(src.len(), w * h * 3);
    assert_eq!(out.len(), 3 * size * size);
    dispatch(src, w, h, size, size, order, &mut NormalisedRows { out, width: size, lut: normalise_lut() });
}

/// Decodes JPEG/PNG/WebP bytes to RGB8 (alpha dropped, greyscale expanded, as PIL's `convert("RGB")`).
pub fn decode_rgb8(bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize, usize)> {
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
        // PIL refuses these ("image file is truncated"); a decoder that fills the missing rows would
        // train on grey blocks.
        return Err(Error::Image {
            what: what.to_string(),
            detail: "image file is truncated (JPEG without its end marker)".into(),
        });
    }
    let img = image::load_from_memory(bytes).map_err(|e| Error::Image { what: what.to_string(), detail: e.to_string() })?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Image { what: what.to_string(), detail: "empty image".into() });
    }
    Ok((rgb.into_raw(), w, h))
}

/// A JPEG is complete when its end-of-image marker (FF D9) follows the start of its first scan
/// (FF DA). Entropy-coded data never holds FF D9 (FF bytes are stuffed), and a thumbnail's own EOI sits
/// in an APP segment before the first scan; bytes after the EOI are allowed (as libjpeg does).
fn jpeg_is_complete(b: &[u8]) -> bool {
    // Walk the marker segments up to the first SOS.
    let mut i = 2;
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let m = b[i + 1];
        if m == 0xFF {
            i += 1;
            continue;
        }
        if (0xD0..=0xD7).contains(&m) || m == 0x01 {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        if m == 0xDA {
            let scan = i + 2 + len;
            return scan <= b.len() && b[scan..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    false
}

/// RGB8 (HWC) -> normalised CHW f32, written into `out` (3 * size * size values).
pub fn normalise_into(rgb: &[u8], size: usize, out: &mut [f32]) {
    let plane = size * size;
    assert_eq!(out.len(), 3 * plane);
    let lut = normalise_lut();
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = lut[c][px[c] as usize];
        }
    }
}

/// The loader's one call: image bytes -> normalised (3, size, size) f32 pixels.
pub fn preprocess_image(bytes: &[u8], size: usize, order: ResizeOrder, what: &str) -> Result<Vec<f32>> {
    let (rgb, w, h) = decode_rgb8(bytes, what)?;
    let mut out = vec![0f32; 3 * size * size];
    resize_normalise_into(&rgb, w, h, size, order, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    #[test]
    fn identity_size_is_a_copy() {
        let src: Vec<u8> = (0..4 * 5 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 4, 5, 4, 5, ResizeOrder::Pillow13), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 37 * 23 * 3];
        for order in [ResizeOrder::Pillow13, ResizeOrder::Pillow12] {
            assert!(resize_rgb8(&src, 37, 23, 14, 14, order).iter().all(|&v| v == 77));
            assert!(resize_rgb8(&src, 37, 23, 100, 90, order).iter().all(|&v| v == 77));
            assert!(resize_rgb8(&src, 23, 37, 14, 14, order).iter().all(|&v| v == 77));
        }
    }

    /// The straightforward transcription of PIL's `ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`
    /// (per-output windows, i64 sums) and of `ImagingResampleInner`'s pass order: the oracle for the
    /// flat, vectorised passes.
    fn reference_resize(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, order: ResizeOrder) -> Vec<u8> {
        let half = 1i64 << (PRECISION_BITS - 1);
        let clip = |a: i64| (a >> PRECISION_BITS).clamp(0, 255) as u8;
        let horizontal = |src: &[u8], w: usize, h: usize| -> Vec<u8> {
            if w == out_w {
                return src.to_vec();
            }
            let mut tmp = vec![0u8; out_w * h * 3];
            for y in 0..h {
                for (xx, (xmin, k)) in coefficients(w, out_w).iter().enumerate() {
                    for c in 0..3 {
                        let acc =
                            k.iter().enumerate().fold(half, |a, (i, &kw)| a + src[(y * w + xmin + i) * 3 + c] as i64 * kw as i64);
                        tmp[(y * out_w + xx) * 3 + c] = clip(acc);
                    }
                }
            }
            tmp
        };
        let vertical = |src: &[u8], w: usize, h: usize| -> Vec<u8> {
            if h == out_h {
                return src.to_vec();
            }
            let mut out = vec![0u8; w * out_h * 3];
            for (yy, (ymin, k)) in coefficients(h, out_h).iter().enumerate() {
                for x in 0..w * 3 {
                    let acc = k.iter().enumerate().fold(half, |a, (i, &kw)| a + src[(ymin + i) * w * 3 + x] as i64 * kw as i64);
                    out[yy * w * 3 + x] = clip(acc);
                }
            }
            out
        };
        if order.horizontal_first(w, h, out_w, out_h) {
            vertical(&horizontal(src, w, h), out_w, h)
        } else {
            horizontal(&vertical(src, w, h), w, out_h)
        }
    }

    #[test]
    fn pass_order_rule_is_pillow_13s() {
        let o = ResizeOrder::Pillow13;
        // Narrower and taller than the output: the height shrinks, the width grows -> vertical first.
        assert!(!o.horizontal_first(400, 600, 448, 448));
        assert!(!o.horizontal_first(440, 460, 448, 448));
        // Wider and shorter, both growing, equal shrink, and a shrink of exactly twice: horizontal first.
        assert!(o.horizontal_first(600, 400, 448, 448));
        assert!(o.horizontal_first(40, 64, 448, 448));
        assert!(o.horizontal_first(1000, 1000, 448, 448));
        assert!(o.horizontal_first(548, 648, 448, 448));
        assert!(!o.horizontal_first(548, 649, 448, 448));
        assert!(ResizeOrder::Pillow12.horizontal_first(400, 600, 448, 448));
    }

    #[test]
    fn fast_passes_equal_the_reference_bit_for_bit() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let sizes = [
            (640, 360, 448, 448),
            (360, 640, 448, 448),
            (100, 7, 448, 448),
            (3, 2, 448, 448),
            (1000, 1000, 448, 448),
            (448, 300, 448, 448),
            (300, 448, 448, 448),
            (37, 23, 14, 14),
            (1, 1, 5, 5),
            (448, 448, 448, 448),
            (400, 600, 448, 448),
            (440, 460, 448, 448),
            (448, 900, 448, 448),
            (1, 900, 448, 448),
            (40, 64, 56, 56),
        ];
        for ((w, h, ow, oh), order) in sizes.into_iter().flat_map(|s| [(s, ResizeOrder::Pillow13), (s, ResizeOrder::Pillow12)]) {
            // Noise with hard edges: exercises clipping at 0 and 255 in both passes.
            let src: Vec<u8> =
                (0..w * h * 3).map(|_| if next() % 5 == 0 { 255 * (next() % 2) as u8 } else { next() as u8 }).collect();
            let want = reference_resize(&src, w, h, ow, oh, order);
            assert_eq!(resize_rgb8(&src, w, h, ow, oh, order), want, "{w}x{h} -> {ow}x{oh} {order:?}");
            if ow == oh {
                let mut fused = vec![0f32; 3 * ow * oh];
                resize_normalise_into(&src, w, h, ow, order, &mut fused);
                let mut two_step = vec![0f32; 3 * ow * oh];
                normalise_into(&want, ow, &mut two_step);
                assert!(fused.iter().zip(&two_step).all(|(a, b)| a.to_bits() == b.to_bits()), "{w}x{h} fused");
            }
        }
    }

    #[test]
    fn webp_decodes_to_its_pixels() {
        let (w, h) = (23u32, 17u32);
        let px: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut bytes = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut bytes).encode(&px, w, h, image::ExtendedColorType::Rgb8).unwrap();
        assert_eq!(&bytes[8..12], b"WEBP");
        let (rgb, dw, dh) = decode_rgb8(&bytes, "t.webp").unwrap();
        assert_eq!((dw, dh), (w as usize, h as usize));
        assert_eq!(rgb, px);
        let e = decode_rgb8(&bytes[..bytes.len() / 2], "cut.webp").unwrap_err().to_string();
        assert!(e.contains("cut.webp"), "{e}");
    }

    #[test]
    fn truncated_images_are_refused_as_pil_does() {
        let px: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 31 % 253) as u8).collect();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode(&px, 64, 48, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert!(decode_rgb8(&jpeg, "whole.jpg").is_ok());
        // Trailing bytes after the end marker are fine (PIL and libjpeg ignore them).
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0, 0, 0, 0]);
        assert!(decode_rgb8(&padded, "padded.jpg").is_ok());
        for cut in [jpeg.len() - 2, jpeg.len() * 3 / 4, jpeg.len() / 2] {
            let e = decode_rgb8(&jpeg[..cut], "cut.jpg").unwrap_err().to_string();
            assert!(e.contains("cut.jpg") && e.contains("truncated"), "{cut}: {e}");
        }
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png).write_image(&px, 64, 48, image::ExtendedColorType::Rgb8).unwrap();
        assert!(decode_rgb8(&png, "whole.png").is_ok());
        for cut in [png.len() - 12, png.len() / 2] {
            assert!(decode_rgb8(&png[..cut], "cut.png").is_err(), "png cut at {cut} accepted");
        }
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
