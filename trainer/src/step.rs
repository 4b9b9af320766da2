//! One micro-batch's forward and backward, block by block, with activation checkpointing and the ZeRO
//! strategy's gathers and gradient hand-offs at block boundaries.
//!
//! tch has no autograd hooks, so the schedule is explicit. Forward: the stem (vision under no_grad,
//! resampler and embedding with a graph), then each LLM block without a graph, keeping only its input.
//! Backward: the head's loss, then for each block from the last, recompute it with a graph on a leaf
//! copy of its input and back-propagate the incoming gradient (`(out * g).sum().backward()`); the
//! block's parameter gradient lands on the leaf its views were taken from and is handed to the strategy
//! at once. Finally the stem is back-propagated from the first block's input gradient.

use tch::{Kind, Tensor};

use crate::comm::Communicator;
use crate::error::Result;
use crate::model::{Head, ModelConfig, ModelInput, QwenVl, Stem};
use crate::profile;
use crate::zero::{Role, Sharded};
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
        };
    }
    let (b, s) = (mb.batch as i64, mb.seq as i64);
    let n = mb.num_images() as i64;
    ModelInput {
        input_ids: Tensor::from_slice(&mb.input_ids).view([b, s]).to_device(device),
        labels: Tensor::from_slice(&mb.labels).view([b, s]).to_device(device),
        pixels: Tensor::from_slice(&mb.pixels).view([n, 3, image_size, image_size]).to_device(device),
        image_rows: mb.image_rows.clone(),
        image_starts: mb.image_starts.clone(),
        image_roles: mb.image_roles.clone(),
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Gathers bucket `b` (when there is one) and returns its parameters as autograd leaves.
fn leaves_of(st: &Sharded, comm: &dyn Communicator, b: Option<usize>) -> Result<Option<(usize, Vec<Tensor>)>> {
    Ok(match b {
        Some(b) => Some((b, st.leaves(b, &st.gather(comm, b)?))),
        None => None,
    })
}

fn as_refs(p: &Option<(usize, Vec<Tensor>)>) -> Vec<(usize, &[Tensor])> {
    p.iter().map(|(b, v)| (*b, v.as_slice())).collect()
}

type Pending = Option<(usize, Tensor, crate::comm::InFlight)>;

/// Starts gathering LLM block `i`'s bucket, when there is a block and it is trained.
fn prefetch(st: &Sharded, comm: &dyn Communicator, i: Option<usize>) -> Result<Pending> {
    prefetch_role(st, comm, i.map(Role::Block))
}

/// Starts gathering the bucket of `role`, when it exists (ZeRO-3; stages 1/2 hand back the kept buffer).
fn prefetch_role(st: &Sharded, comm: &dyn Communicator, role: Option<Role>) -> Result<Pending> {
    let Some(b) = role.and_then(|r| st.bucket(&r)) else { return Ok(None) };
    let (flat, f) = st.gather_async(comm, b)?;
    Ok(Some((b, flat, f)))
}

/// Waits for a prefetched bucket and returns its parameters as autograd leaves.
fn leaves_after(st: &Sharded, comm: &dyn Communicator, p: Pending) -> Result<Option<(usize, Vec<Tensor>)>> {
    Ok(match p {
        Some((b, flat, f)) => {
            comm.wait(f)?;
            Some((b, st.leaves(b, &flat)))
        }
        None => None,
    })
}

/// Hands a bucket's gradients to the strategy, when the bucket exists.
fn hand_over(st: &mut Sharded, comm: &dyn Communicator, p: &Option<(usize, Vec<Tensor>)>) -> Result<()> {
    if let Some((b, leaves)) = p {
        st.accumulate_grad(comm, *b, leaves)?;
    }
    Ok(())
}

/// Forward + backward of one micro-batch; gradients (scaled by `scale`) go to the strategy. Returns the
/// unscaled loss (mean over the micro-batch's supervised tokens).
pub fn forward_backward(
    st: &mut Sharded,
    comm: &dyn Communicator,
    cfg: &ModelConfig,
    input: &ModelInput,
    scale: f64,
    checkpointing: bool,
) -> Result<f64> {
    let layers = cfg.num_hidden_layers as usize;
    let device = st.device;
    // ZeRO-3: block 0's all-gather runs during the stem (a no-op for stages 1/2).
    let mut next = prefetch(st, comm, checkpointing.then_some(0))?;
    // Stem, with a graph through the trainable resampler and embedding.
    let stem = leaves_of(st, comm, st.bucket(&Role::Stem))?;
    let x0 = profile::time(profile::STEM_FWD, 0.0, || {
        let refs = as_refs(&stem);
        let g = st.getter(&refs);
        Stem::new(cfg, &g).forward(input)
    });
    let rope = QwenVl::rope(cfg, input.input_ids.size()[1], device);

    // Blocks forward. With checkpointing only each block's input is kept; without, each block keeps its
    // graph (input leaf, parameter leaves, output).
    let mut x = x0.detach();
    type Graph = (Option<(usize, Vec<Tensor>)>, Tensor);
    let mut kept: Vec<(Tensor, Option<Graph>)> = Vec::with_capacity(layers);
    // ZeRO-3: block i+1's all-gather runs while block i computes, and the head's during the last block.
    for i in 0..layers {
        let b = st.bucket(&Role::Block(i));
        if checkpointing {
            let cur = next.take();
            next = prefetch_role(st, comm, Some(if i + 1 < layers { Role::Block(i + 1) } else { Role::Head }))?;
            let views = match cur {
                Some((b, flat, f)) => {
                    comm.wait(f)?;
                    Some((b, st.views(b, &flat)))
                }
                None => None,
            };
            let refs = as_refs(&views);
            let g = st.getter(&refs);
            let blk = QwenVl::block_from(cfg, i, &g);
            let out = profile::time(profile::BLOCKS_FWD, 0.0, || tch::no_grad(|| blk.forward(&x, &rope, None)));
            kept.push((x, None));
            x = out;
        } else {
            let pl = leaves_of(st, comm, b)?;
            let xin = leaf(&x);
            let out = profile::time(profile::BLOCKS_FWD, 0.0, || {
                let refs = as_refs(&pl);
                let g = st.getter(&refs);
                QwenVl::block_from(cfg, i, &g).forward(&xin, &rope, None)
            });
            x = out.detach();
            kept.push((xin, Some((pl, out))));
        }
    }

    // Head: loss and the gradient at the last block's output. The last block's gather for its
    // recompute (ZeRO-3) runs meanwhile.
    let head = if checkpointing { leaves_after(st, comm, next.take())? } else { leaves_of(st, comm, st.bucket(&Role::Head))? };
    let mut next = prefetch(st, comm, checkpointing.then_some(layers - 1))?;
    let xl = leaf(&x);
    let loss_value = profile::time(profile::HEAD, 0.0, || {
        let refs = as_refs(&head);
        let g = st.getter(&refs);
        let loss = Head::new(cfg, &g).loss(&xl, &input.labels);
        let v = loss.double_value(&[]);
        (loss * scale).backward();
        v
    });
    let mut grad = xl.grad();
    hand_over(st, comm, &head)?;
    drop(head);

    // Blocks backward, last to first; block i-1's gather (ZeRO-3) overlaps block i's backward.
    for i in (0..layers).rev() {
        let (input_i, graph) = kept.pop().expect("one kept entry per block");
        let (xin, pl, out) = match graph {
            Some((pl, out)) => (input_i, pl, out),
            None => {
                let cur = next.take();
                next = prefetch(st, comm, i.checked_sub(1))?;
                let pl = leaves_after(st, comm, cur)?;
                let xin = leaf(&input_i);
                let out = {
                    let refs = as_refs(&pl);
                    let g = st.getter(&refs);
                    profile::time(profile::BLOCKS_BWD, 0.0, || QwenVl::block_from(cfg, i, &g).forward(&xin, &rope, None))
                };
                (xin, pl, out)
            }
        };
        profile::time(profile::BLOCKS_BWD, 0.0, || (out * &grad).sum(Kind::Float).backward());
        grad = xin.grad();
        hand_over(st, comm, &pl)?;
    }

    // Stem backward (nothing to do when nothing in the stem is trained).
    if x0.requires_grad() {
        profile::time(profile::STEM_BWD, 0.0, || (x0 * &grad).sum(Kind::Float).backward());
    }
    hand_over(st, comm, &stem)?;
    Ok(loss_value)
}
