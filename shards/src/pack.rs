//! Packing variable-length samples into micro-batches of at most `budget` tokens (issue #15's packer): a
//! deterministic best-fit over windows of `window` upcoming samples. Within a window the samples are
//! placed longest first (ties by position) into the open micro-batch with the least room that still
//! fits them, or a new one; the window's micro-batches are closed before the next window starts. The
//! result depends only on the lengths in their order, so a reader that knows its position can pack again
//! after a resume and get the same micro-batches.

/// Micro-batches as positions into the input, and what did not fit anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Each micro-batch's samples (positions into the input), in the order they were placed.
    pub bins: Vec<Vec<usize>>,
    /// Samples longer than the budget (they fit no micro-batch).
    pub too_long: Vec<usize>,
}

impl Packing {
    /// Tokens packed over the capacity of the micro-batches (1.0: no padding at all).
    pub fn efficiency(&self, lengths: &[usize], budget: usize) -> f64 {
        let used: usize = self.bins.iter().flatten().map(|&i| lengths[i]).sum();
        if self.bins.is_empty() {
            return 1.0;
        }
        used as f64 / (self.bins.len() * budget) as f64
    }
}

/// The one rule between a packing budget and `max_len`: every sample training keeps (at most `max_len`
/// tokens) must fit a micro-batch. The message names both figures; callers say where they come from.
pub fn check_budget(tokens: usize, max_len: usize) -> std::result::Result<(), String> {
    if tokens < max_len {
        return Err(format!(
            "packing budget {tokens} tokens is below max_len {max_len}: a sample that long could fit no micro-batch"
        ));
    }
    Ok(())
}

/// Packs `lengths` (tokens per sample, in reading order) into micro-batches of at most `budget` tokens.
pub fn pack(lengths: &[usize], budget: usize, window: usize) -> Packing {
    let window = window.max(1);
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut too_long = Vec::new();
    for start in (0..lengths.len()).step_by(window) {
        let end = (start + window).min(lengths.len());
        let mut order: Vec<usize> = (start..end).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        // Open micro-batches of this window: (room left, samples).
        let mut open: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in order {
            let len = lengths[i];
            if len > budget {
                too_long.push(i);
                continue;
            }
            let best = open
                .iter()
                .enumerate()
                .filter(|(_, (room, _))| *room >= len)
                .min_by_key(|(k, (room, _))| (*room, *k))
                .map(|(k, _)| k);
            match best {
                Some(k) => {
                    open[k].0 -= len;
                    open[k].1.push(i);
                }
                None => open.push((budget - len, vec![i])),
            }
        }
        bins.extend(open.into_iter().map(|(_, b)| b));
    }
    too_long.sort_unstable();
    Packing { bins, too_long }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_once_within_the_budget_and_the_same_every_time() {
        let lengths: Vec<usize> = (0..500).map(|i| 300 + (i * 7919) % 1700).collect();
        let p = pack(&lengths, 4096, 64);
        let mut seen: Vec<usize> = p.bins.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert!(p.bins.iter().all(|b| b.iter().map(|&i| lengths[i]).sum::<usize>() <= 4096));
        assert_eq!(p, pack(&lengths, 4096, 64));
        // A window never mixes with the next: every micro-batch's samples come from one window.
        assert!(p.bins.iter().all(|b| b.iter().all(|&i| i / 64 == b[0] / 64)));
        assert!(p.efficiency(&lengths, 4096) > 0.95, "{}", p.efficiency(&lengths, 4096));
    }

    #[test]
    fn too_long_samples_are_set_aside_and_best_fit_picks_the_tightest_room() {
        let p = pack(&[5000, 3000, 2000, 1000, 900], 4096, 10);
        assert_eq!(p.too_long, vec![0]);
        // 3000 opens one, 2000 opens another, 1000 fits the tightest (3000's: room 1096), 900 the other.
        assert_eq!(p.bins, vec![vec![1, 3], vec![2, 4]]);
    }
}
