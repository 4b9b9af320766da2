//! The three rows (t, h, w) of Qwen3-VL's M-RoPE positions for one sample (transformers'
//! `Qwen3VLModel.get_rope_index`, SPEC-QWEN3VL.md §3.3), computed once in the data path.

use super::IMAGE_PAD;

/// An image's patch grid: temporal groups, patch rows, patch columns (before the 2x2 merge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grid {
    pub t: i64,
    pub h: i64,
    pub w: i64,
}

impl Grid {
    /// LLM tokens of this image: t·h·w / merge².
    pub fn tokens(&self, merge: i64) -> usize {
        (self.t * self.h * self.w / (merge * merge)) as usize
    }
}

/// Positions of one sample's tokens: `rows[0]` t, `rows[1]` h, `rows[2]` w. Text tokens (and the
/// vision start/end markers) advance every row by one; an image's run of `<|image_pad|>` tokens over
/// the merged grid (H', W') gets t = cur, h = cur + r, w = cur + c, after which cur advances by
/// max(H', W'). `grids` are the sample's images in order; a run whose length is not its grid's token
/// count, or more runs than grids, is an error naming the image.
pub fn rope_index(ids: &[u32], grids: &[Grid], merge: i64) -> Result<[Vec<i64>; 3], String> {
    let n = ids.len();
    let mut rows = [Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut cur = 0i64;
    let mut i = 0;
    let mut image = 0;
    while i < n {
        if ids[i] != IMAGE_PAD {
            for r in &mut rows {
                r.push(cur);
            }
            cur += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&t| t == IMAGE_PAD).count();
        let g = grids.get(image).ok_or_else(|| format!("image {image}: an image span without a grid"))?;
        let (hh, ww) = (g.h / merge, g.w / merge);
        if g.t != 1 || run != g.tokens(merge) {
            return Err(format!(
                "image {image}: {run} <|image_pad|> tokens, its grid {}x{}x{} gives {}",
                g.t,
                g.h,
                g.w,
                g.tokens(merge)
            ));
        }
        for r in 0..hh {
            for c in 0..ww {
                rows[0].push(cur);
                rows[1].push(cur + r);
                rows[2].push(cur + c);
            }
        }
        cur += hh.max(ww);
        i += run;
        image += 1;
    }
    if image != grids.len() {
        return Err(format!("{} image grids for {image} image spans", grids.len()));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qwen3vl::{VISION_END, VISION_START};

    /// SPEC-QWEN3VL.md §3.3's worked example.
    #[test]
    fn the_specs_worked_example() {
        let mut ids = vec![151_644, 872, 198, VISION_START];
        ids.extend([IMAGE_PAD; 6]);
        ids.extend([VISION_END, 1]);
        let r = rope_index(&ids, &[Grid { t: 1, h: 4, w: 6 }], 2).unwrap();
        assert_eq!(r[0], [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8]);
        assert_eq!(r[1], [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8]);
        assert_eq!(r[2], [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]);
        let e = rope_index(&ids[..8], &[Grid { t: 1, h: 4, w: 6 }], 2).unwrap_err();
        assert!(e.contains("4 <|image_pad|> tokens") && e.contains("gives 6"), "{e}");
    }
}
