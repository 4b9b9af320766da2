//! One micro-batch's forward and backward, block by block, with activation checkpointing and the ZeRO
//! strategy's gathers and gradient hand-offs at block boundaries.
//!
//! tch has no autograd hooks, so the schedule is explicit. Forward: the stem (vision under no_grad,
//! resampler and embedding with a graph), then each LLM block: the first `recomputed` blocks without a
//! graph, keeping only their input, the others with their graph (see [`crate::memplan`]; under ZeRO-3 a
//! kept graph's gathered parameters are freed after the forward and gathered again for the backward,
//! the gather of block i-1 overlapping block i's backward whether i-1 is kept or recomputed). Backward: the
//! head's loss, then for each block from the last, back-propagate the incoming gradient
//! (`(out * g).sum().backward()`) through its kept graph or through a recomputation with a graph on a
//! leaf copy of its input; the block's parameter gradient lands on the leaves its views were taken from
//! and is handed to the strategy at once. Finally the stem is back-propagated from the first block's
//! input gradient.

use tch::{Kind, Tensor};

use crate::comm::Communicator;
use crate::error::Result;
use crate::model::attention::backward_with;
use crate::model::fused::upload;
use crate::model::{Head, ModelConfig, ModelInput, QwenVl, Stem};
use crate::profile;
use crate::zero::{BucketParams, Prefetch, Role, Sharded, Use};
use idavlm_shards::reader::MicroBatch;
use idavlm_shards::tokenizer::ENDOFTEXT;

/// Tensors of a micro-batch on the model's device. An empty micro-batch (every sample dropped) becomes
/// one unsupervised two-token row, so that this rank still takes part in every collective.
pub fn model_input(mb: &MicroBatch, image_size: i64, device: tch::Device) -> ModelInput {
    if mb.batch == 0 {
        let ids = Tensor::from_slice(&[ENDOFTEXT as i64, ENDOFTEXT as i64]).view([1, 2]).to_device(device);
        return ModelInput {
            labels: Tensor::full([1, 2], -100, (Kind::Int64, device)),
            input_ids: ids,
            pixels: Tensor::zeros([0, 3, image_size, image_size], (Kind::Float, device)),
            image_rows: vec![],
            image_starts: vec![],
            image_roles: vec![],
            image_groups: vec![],
            seq_lens: vec![],
            supervised: Some(Tensor::zeros([0], (Kind::Int64, device))),
        };
    }
    let (b, s) = (mb.batch as i64, mb.seq as i64);
    let n = mb.num_images() as i64;
    ModelInput {
        input_ids: upload(&Tensor::from_slice(&mb.input_ids).view([b, s]), device),
        labels: upload(&Tensor::from_slice(&mb.labels).view([b, s]), device),
        pixels: upload(&Tensor::from_slice(&mb.pixels).view([n, 3, image_size, image_size]), device),
        supervised: Some(ModelInput::supervised_positions(&mb.labels, mb.batch, mb.seq, device)),
        image_rows: mb.image_rows.clone(),
        image_starts: mb.image_starts.clone(),
        image_roles: mb.image_roles.clone(),
        image_groups: mb.image_groups.clone(),
        seq_lens: mb.seq_lens.clone(),
    }
}

/// splitmix64's finaliser: well-spread seeds from small integers.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Forward + backward of one micro-batch; gradients (scaled by `scale`) go to the strategy. Returns the
/// unscaled loss (mean over the micro-batch's supervised tokens) as a 0-d tensor on the device: reading
/// it waits for the GPU, so callers read a step's losses once, after its last micro-batch.
///
/// Blocks `0..recomputed` keep only their input and are recomputed in the backward; the others keep
/// their graph (see [`crate::memplan`]). `dropout_seed` seeds LoRA's dropout per block, so that a
/// recomputed block draws the same mask.
pub fn forward_backward(
    st: &mut Sharded,
    comm: &dyn Communicator,
    cfg: &ModelConfig,
    input: &ModelInput,
    scale: f64,
    recomputed: usize,
    dropout_seed: u64,
) -> Result<Tensor> {
    let seed_block = |i: usize| {
        if cfg.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            tch::manual_seed(mix(dropout_seed ^ mix(i as u64 + 1)) as i64 & i64::MAX);
        }
    };
    let layers = cfg.num_hidden_layers as usize;
    let device = st.device;
    let reshard = st.reshards_kept();
    // ZeRO-3: block 0's all-gather runs during the stem (stages 1/2 hand back the kept buffer).
    let mut next = st.prefetch(comm, Role::Block(0))?;
    // Stem, with a graph through the trainable resampler and embedding.
    let mut stem = st.gather_now(comm, Role::Stem, Use::Leaves)?;
    let x0 = profile::time(profile::STEM_FWD, 0.0, || Stem::new(cfg, &st.getter(&[&stem])).forward(input));
    if reshard {
        // ZeRO-3: the stem's gathered parameters (the embedding and the resampler) are not needed again
        // before its backward, at the end of the micro-batch.
        // SAFETY: the stem's graph is run backward only at the end, after `regather(stem)` (started at
        // block 0's backward) has been waited by `st.finish(comm, next)`; nothing else reads `stem`'s
        // views meanwhile, and an error return drops the graph unread.
        unsafe { st.release(&mut stem) };
    }
    let rope = QwenVl::rope_for(cfg, input, device);

    // Blocks forward. A recomputed block keeps only its input; the others keep their graph (input leaf,
    // parameter leaves, output). Block i+1's gather (ZeRO-3) runs while block i computes, and the
    // head's during the last block.
    let mut x = x0.detach();
    let mut kept: Vec<(Tensor, Option<(BucketParams, Tensor)>)> = Vec::with_capacity(layers);
    for i in 0..layers {
        let after = if i + 1 < layers { Role::Block(i + 1) } else { Role::Head };
        let cur = std::mem::replace(&mut next, st.prefetch(comm, after)?);
        if i < recomputed {
            let p = st.take(comm, cur, Use::Views)?;
            let blk = QwenVl::block_from(cfg, i, &st.getter(&[&p]));
            seed_block(i);
            let out = profile::time(profile::BLOCKS_FWD, 0.0, || tch::no_grad(|| blk.forward(&x, &rope, None)));
            kept.push((x, None));
            x = out;
        } else {
            let mut p = st.take(comm, cur, Use::Leaves)?;
            let xin = leaf(&x);
            seed_block(i);
            let out = profile::time(profile::BLOCKS_FWD, 0.0, || {
                QwenVl::block_from(cfg, i, &st.getter(&[&p])).forward(&xin, &rope, None)
            });
            x = out.detach();
            if reshard {
                // ZeRO-3: the graph keeps views of the gathered parameters, whose memory goes now; the
                // backward gathers them again (FSDP's reshard after forward).
                // SAFETY: block i's graph is run backward only after `backward_gather` regathered `p`
                // (started during block i+1's backward, or the head's) and `st.finish` waited for it;
                // `p` itself is read only after that wait (`accumulate_grad`); an error return drops
                // the graph unread.
                unsafe { st.release(&mut p) };
            }
            kept.push((xin, Some((p, out))));
        }
    }

    // Head: loss and the gradient at the last block's output. The gather for the last block's backward
    // (ZeRO-3: a recomputed block's parameters, or a kept one's released parameters) runs during the head.
    let head = st.take(comm, next, Use::Leaves)?;
    let mut next = backward_gather(st, comm, &mut kept, layers - 1)?;
    let xl = leaf(&x);
    let loss_value = profile::time(profile::HEAD, 0.0, || {
        let loss = Head::new(cfg, &st.getter(&[&head])).loss(&xl, &input.labels, input.supervised.as_ref());
        let v = loss.detach();
        (loss * scale).backward();
        v
    });
    let mut grad = xl.grad();
    st.accumulate_grad(comm, &head)?;
    drop(head);

    // Blocks backward, last to first; block i-1's gather (ZeRO-3) overlaps block i's backward, and the
    // stem's (released after its forward) block 0's.
    for i in (0..layers).rev() {
        let (input_i, graph) = kept.pop().expect("one kept entry per block");
        let before = if i > 0 { backward_gather(st, comm, &mut kept, i - 1)? } else { st.regather(comm, &mut stem)? };
        let cur = std::mem::replace(&mut next, before);
        let (xin, p, out) = match graph {
            Some((p, out)) => {
                st.finish(comm, cur)?;
                (input_i, p, out)
            }
            None => {
                debug_assert!(i < recomputed);
                let p = st.take(comm, cur, Use::Leaves)?;
                let xin = leaf(&input_i);
                seed_block(i);
                let out = profile::time(profile::BLOCKS_BWD, 0.0, || {
                    QwenVl::block_from(cfg, i, &st.getter(&[&p])).forward(&xin, &rope, None)
                });
                (xin, p, out)
            }
        };
        profile::time(profile::BLOCKS_BWD, 0.0, || backward_with(&out, &grad));
        grad = xin.grad();
        st.accumulate_grad(comm, &p)?;
    }

    // Stem backward (nothing to do when nothing in the stem is trained), once its parameters are back.
    st.finish(comm, next)?;
    if x0.requires_grad() {
        profile::time(profile::STEM_BWD, 0.0, || backward_with(&x0, &grad));
    }
    st.accumulate_grad(comm, &stem)?;
    Ok(loss_value)
}

/// Starts the gather block `i` needs for its backward: under ZeRO-3 a fresh gather of a recomputed
/// block's parameters, or the gather of a kept block's released parameters back into their storage;
/// nothing otherwise.
fn backward_gather(
    st: &Sharded,
    comm: &dyn Communicator,
    kept: &mut [(Tensor, Option<(BucketParams, Tensor)>)],
    i: usize,
) -> Result<Prefetch> {
    match &mut kept[i].1 {
        Some((p, _)) => st.regather(comm, p),
        None => st.prefetch(comm, Role::Block(i)),
    }
}

/// The forward of one micro-batch without a graph (evaluation): the mean of its shifted token losses (0
/// when nothing is supervised). Takes part in the same gathers as a training forward (ZeRO-3), so every
/// rank must call it the same number of times.
pub fn forward_loss(st: &Sharded, comm: &dyn Communicator, cfg: &ModelConfig, input: &ModelInput) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let layers = cfg.num_hidden_layers as usize;
    let mut next = st.prefetch(comm, Role::Block(0))?;
    let stem = st.gather_now(comm, Role::Stem, Use::Views)?;
    let mut x = Stem::new(cfg, &st.getter(&[&stem])).forward(input);
    drop(stem);
    let rope = QwenVl::rope_for(cfg, input, st.device);
    for i in 0..layers {
        let after = if i + 1 < layers { Role::Block(i + 1) } else { Role::Head };
        let cur = std::mem::replace(&mut next, st.prefetch(comm, after)?);
        let p = st.take(comm, cur, Use::Views)?;
        x = QwenVl::block_from(cfg, i, &st.getter(&[&p])).forward(&x, &rope, None);
    }
    let head = st.take(comm, next, Use::Views)?;
    let loss = Head::new(cfg, &st.getter(&[&head])).loss(&x, &input.labels, input.supervised.as_ref()).double_value(&[]);
    Ok(loss)
}
