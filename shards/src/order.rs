//! The global sample order as pure functions of (seed, epoch): no I/O, exhaustively testable.
//!
//! A source's order in one of its epochs: its row groups ("blocks") in a seeded random order, and the
//! rows inside each block in a seeded random order. A mixture of sources is an epoch of `count_s`
//! draws from each source, interleaved by a seeded shuffle; source `s`'s k-th draw overall is its
//! own order's sample `k mod size_s` in its own epoch `k div size_s`. Training consumes the mixture
//! as one endless sequence indexed by a global counter, so reader state is that counter.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    // SplitMix-style mixing of the parts into one 64-bit seed.
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    ChaCha8Rng::seed_from_u64(h)
}

/// Where a sample lives: shard index, row group index, row inside the row group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locator {
    pub shard: u32,
    pub row_group: u32,
    pub row: u32,
}

/// One source's blocks: (shard, row group, rows) in manifest order.
#[derive(Clone, Debug)]
pub struct SourceLayout {
    pub blocks: Vec<(u32, u32, u32)>,
}

impl SourceLayout {
    pub fn len(&self) -> u64 {
        self.blocks.iter().map(|b| b.2 as u64).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every sample in storage order (shard by shard, row group by row group).
    pub fn locators(&self) -> impl Iterator<Item = Locator> + '_ {
        self.blocks.iter().flat_map(|&(shard, row_group, rows)| (0..rows).map(move |row| Locator { shard, row_group, row }))
    }

    /// The whole order of one epoch of this source.
    pub fn epoch_order(&self, seed: u64, source: u64, epoch: u64) -> Vec<Locator> {
        let mut blocks: Vec<usize> = (0..self.blocks.len()).collect();
        blocks.shuffle(&mut rng(seed, &[source, epoch, u64::MAX]));
        let mut out = Vec::with_capacity(self.len() as usize);
        for b in blocks {
            let (shard, rg, rows) = self.blocks[b];
            let mut idx: Vec<u32> = (0..rows).collect();
            idx.shuffle(&mut rng(seed, &[source, epoch, b as u64]));
            out.extend(idx.into_iter().map(|row| Locator { shard, row_group: rg, row }));
        }
        out
    }
}

/// A mixture of sources with a per-epoch count each. Caches the orders it has built.
pub struct Mixture {
    pub seed: u64,
    pub layouts: Vec<SourceLayout>,
    pub counts: Vec<u64>,
    /// Source ids used to seed each source's order (stable under re-ordering of the recipe).
    pub source_keys: Vec<u64>,
    cache_src: std::collections::HashMap<(usize, u64), std::sync::Arc<Vec<Locator>>>,
    cache_mix: std::collections::HashMap<u64, std::sync::Arc<Vec<(u32, u32)>>>,
}

impl Mixture {
    pub fn new(seed: u64, layouts: Vec<SourceLayout>, counts: Vec<u64>, source_keys: Vec<u64>) -> Self {
        assert_eq!(layouts.len(), counts.len());
        Self { seed, layouts, counts, source_keys, cache_src: Default::default(), cache_mix: Default::default() }
    }

    pub fn epoch_len(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn source_order(&mut self, s: usize, epoch: u64) -> std::sync::Arc<Vec<Locator>> {
        if self.cache_src.len() > 16 {
            self.cache_src.clear();
        }
        let (seed, key) = (self.seed, self.source_keys[s]);
        let layout = &self.layouts[s];
        self.cache_src.entry((s, epoch)).or_insert_with(|| std::sync::Arc::new(layout.epoch_order(seed, key, epoch))).clone()
    }

    /// For each position of a mixture epoch: its source and how many draws of that source precede it
    /// in the epoch.
    fn mix_order(&mut self, epoch: u64) -> std::sync::Arc<Vec<(u32, u32)>> {
        if self.cache_mix.len() > 4 {
            self.cache_mix.clear();
        }
        let (seed, counts) = (self.seed, self.counts.clone());
        self.cache_mix
            .entry(epoch)
            .or_insert_with(|| {
                let mut v: Vec<u32> =
                    counts.iter().enumerate().flat_map(|(s, &c)| std::iter::repeat_n(s as u32, c as usize)).collect();
                if counts.len() > 1 {
                    v.shuffle(&mut rng(seed, &[u64::MAX - 1, epoch]));
                }
                let mut seen = vec![0u32; counts.len()];
                let tagged = v
                    .into_iter()
                    .map(|s| {
                        let k = seen[s as usize];
                        seen[s as usize] += 1;
                        (s, k)
                    })
                    .collect();
                std::sync::Arc::new(tagged)
            })
            .clone()
    }

    /// The sample at global position `g` of the endless mixture: (source, epoch of the mixture, locator).
    pub fn at(&mut self, g: u64) -> (usize, u64, Locator) {
        let len = self.epoch_len();
        let (epoch, i) = (g / len, g % len);
        let mix = self.mix_order(epoch);
        let (s, before_in_epoch) = mix[i as usize];
        let s = s as usize;
        // k: how many draws of source s came before this one, over all earlier epochs and this one.
        let k = epoch * self.counts[s] + before_in_epoch as u64;
        let size = self.layouts[s].len();
        let order = self.source_order(s, k / size);
        (s, epoch, order[(k % size) as usize])
    }
}

/// Global positions of rank `rank`'s micro-batch `micro` (0-based within the step) of an optimizer step
/// that starts at global position `step_start`: micro-batch m = micro * world + rank of the step, so that
/// a single process with `accum * world` micro-batches sees the same micro-batches in the same groups.
pub fn micro_positions(step_start: u64, micro: usize, rank: usize, world: usize, micro_batch: usize) -> std::ops::Range<u64> {
    let m = (micro * world + rank) as u64;
    let s = step_start + m * micro_batch as u64;
    s..s + micro_batch as u64
}

/// The general-data injection decision after ID micro-batch `micro` of optimizer step `step` (SPEC §3):
/// a pure function of the seed, so every rank draws the same.
pub fn inject(seed: u64, step: u64, micro: usize, probability: f64) -> bool {
    use rand::Rng;
    probability > 0.0 && rng(seed, &[0x1_1EC7, step, micro as u64]).random_bool(probability.min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(blocks: &[u32]) -> SourceLayout {
        SourceLayout { blocks: blocks.iter().enumerate().map(|(i, &r)| (i as u32 / 2, i as u32 % 2, r)).collect() }
    }

    #[test]
    fn an_epoch_is_a_permutation() {
        let l = layout(&[5, 7, 3, 8]);
        let mut o = l.epoch_order(1, 0, 0);
        assert_eq!(o.len(), 23);
        o.sort();
        o.dedup();
        assert_eq!(o.len(), 23);
        assert_ne!(l.epoch_order(1, 0, 0), l.epoch_order(1, 0, 1));
        assert_eq!(l.epoch_order(1, 0, 3), l.epoch_order(1, 0, 3));
    }

    #[test]
    fn mixture_counts_per_epoch() {
        let mut m = Mixture::new(7, vec![layout(&[10, 10]), layout(&[3])], vec![12, 4], vec![0, 1]);
        let mut per = [0; 2];
        for g in 0..16 {
            per[m.at(g).0] += 1;
        }
        assert_eq!(per, [12, 4]);
    }

    #[test]
    fn source_draws_cycle_through_whole_epochs() {
        // Source 1 has 3 samples and 4 draws per mixture epoch: every 3 consecutive draws are a permutation.
        let mut m = Mixture::new(3, vec![layout(&[6]), layout(&[3])], vec![2, 4], vec![0, 1]);
        let draws: Vec<Locator> = (0..60).map(|g| m.at(g)).filter(|d| d.0 == 1).map(|d| d.2).collect();
        for w in draws.chunks(3).filter(|c| c.len() == 3) {
            let mut w = w.to_vec();
            w.sort();
            w.dedup();
            assert_eq!(w.len(), 3);
        }
    }

    #[test]
    fn rank_shares_partition_the_step() {
        for world in 1..=3 {
            let accum = 4 / world.min(4);
            let mut all: Vec<u64> = Vec::new();
            for r in 0..world {
                for j in 0..accum {
                    all.extend(micro_positions(100, j, r, world, 2));
                }
            }
            all.sort();
            assert_eq!(all, (100..100 + (2 * accum * world) as u64).collect::<Vec<_>>());
        }
    }
}
