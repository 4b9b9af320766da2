//! Parameter -> bucket -> shard layout, as pure data (no tch).
//!
//! Trainable parameters are packed into flat buckets in backward order: the head (ln_f, lm_head), then
//! LLM blocks from last to first, then the stem (wte, resampler, ID-Former). Each bucket is padded to a
//! multiple of `world * ALIGN` elements so it splits into equal, aligned shards: rank r owns elements
//! [r * shard, (r + 1) * shard) of every bucket. A bucket is the unit of gathering (ZeRO-3) and of
//! gradient reduce-scatter (ZeRO-2/3).

use crate::model::{ParamSpec, Part};

/// Shard starts are multiples of this many elements (512 bytes in bf16, 256 in f32... at least 16-byte
/// aligned for NCCL in every dtype).
pub const ALIGN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Head,
    Block(usize),
    Stem,
}

impl Role {
    pub fn name(&self) -> String {
        match self {
            Role::Head => "head".into(),
            Role::Block(i) => format!("block.{i}"),
            Role::Stem => "stem".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Index into the model's parameter specs.
    pub param: usize,
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: usize,
    pub numel: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub role: Role,
    pub entries: Vec<Entry>,
    /// Elements used by parameters.
    pub numel: usize,
    /// Elements including padding: a multiple of world * ALIGN.
    pub padded: usize,
    /// Elements per rank.
    pub shard: usize,
}

impl Bucket {
    /// Elements of `rank`'s shard that hold parameters (the rest is padding past the bucket's end).
    pub fn valid_len(&self, rank: usize) -> usize {
        self.numel.saturating_sub(rank * self.shard).min(self.shard)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world: usize,
    pub buckets: Vec<Bucket>,
}

pub fn role_of(spec: &ParamSpec) -> Role {
    match (spec.block, spec.part) {
        (Some(i), _) => Role::Block(i),
        (None, Part::Llm) if spec.name.starts_with("lm_head") || spec.name.starts_with("transformer.ln_f") => Role::Head,
        _ => Role::Stem,
    }
}

/// Lays out the trainable parameters of `specs` for `world` ranks.
pub fn layout(specs: &[ParamSpec], trainable: &dyn Fn(&ParamSpec) -> bool, world: usize) -> Layout {
    assert!(world >= 1);
    let mut roles: Vec<Role> = specs.iter().filter(|s| trainable(s)).map(role_of).collect();
    roles.sort_by(|a, b| backward_order(a).cmp(&backward_order(b)));
    roles.dedup();
    let unit = world * ALIGN;
    let buckets = roles
        .into_iter()
        .map(|role| {
            let mut offset = 0;
            let entries: Vec<Entry> = specs
                .iter()
                .enumerate()
                .filter(|(_, s)| trainable(s) && role_of(s) == role)
                .map(|(i, s)| {
                    let numel = s.numel() as usize;
                    let e = Entry { param: i, name: s.name.clone(), shape: s.shape.clone(), offset, numel };
                    offset += numel;
                    e
                })
                .collect();
            let padded = offset.div_ceil(unit).max(1) * unit;
            Bucket { role, entries, numel: offset, padded, shard: padded / world }
        })
        .collect();
    Layout { world, buckets }
}

/// Head first, then blocks from last to first, then the stem: the order gradients become ready.
fn backward_order(r: &Role) -> (u8, i64) {
    match r {
        Role::Head => (0, 0),
        Role::Block(i) => (1, -(*i as i64)),
        Role::Stem => (2, 0),
    }
}

impl Layout {
    pub fn bucket_index(&self, role: &Role) -> Option<usize> {
        self.buckets.iter().position(|b| &b.role == role)
    }
    pub fn trainable_numel(&self) -> usize {
        self.buckets.iter().map(|b| b.numel).sum()
    }
    /// Elements of optimizer state this rank holds.
    pub fn shard_numel(&self) -> usize {
        self.buckets.iter().map(|b| b.shard).sum()
    }
    /// A fingerprint of what is trained (names and sizes), independent of the world size.
    pub fn fingerprint(&self) -> Vec<(String, usize)> {
        self.buckets.iter().map(|b| (b.role.name(), b.numel)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{param_specs, ModelConfig};

    fn tiny() -> Vec<ParamSpec> {
        let mut c = ModelConfig::tiny();
        c.id_former = true;
        param_specs(&c)
    }

    #[test]
    fn buckets_cover_trainable_params_once_in_backward_order() {
        let specs = tiny();
        let tr = |s: &ParamSpec| !matches!(s.part, Part::Vit | Part::PostProj);
        for world in [1, 2, 3, 5] {
            let l = layout(&specs, &tr, world);
            let names: Vec<String> = l.buckets.iter().map(|b| b.role.name()).collect();
            assert_eq!(names, ["head", "block.1", "block.0", "stem"]);
            let mut seen: Vec<usize> = l.buckets.iter().flat_map(|b| b.entries.iter().map(|e| e.param)).collect();
            seen.sort();
            let want: Vec<usize> = specs.iter().enumerate().filter(|(_, s)| tr(s)).map(|(i, _)| i).collect();
            assert_eq!(seen, want);
            for b in &l.buckets {
                assert_eq!(b.padded % (world * ALIGN), 0);
                assert_eq!(b.shard * world, b.padded);
                assert!(b.padded >= b.numel);
                let mut end = 0;
                for e in &b.entries {
                    assert_eq!(e.offset, end, "entries are contiguous");
                    end += e.numel;
                }
                assert_eq!(end, b.numel);
            }
            assert_eq!(l.fingerprint(), layout(&specs, &tr, 1).fingerprint());
        }
    }

    #[test]
    fn uneven_sizes_pad() {
        let specs = tiny();
        let l = layout(&specs, &|s: &ParamSpec| s.name == "transformer.ln_f.weight", 3);
        assert_eq!(l.buckets.len(), 1);
        assert_eq!(l.buckets[0].numel, 128);
        assert_eq!(l.buckets[0].padded, 192);
        assert_eq!(l.buckets[0].shard, 64);
    }
}
