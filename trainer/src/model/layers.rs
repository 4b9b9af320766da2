//! Small building blocks shared by the LLM, the ViT and the resampler.

use tch::{Kind, Tensor};

/// `y = x W^T + b`, plus a LoRA adapter's term when it has one.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<super::lora::Adapter>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(a) => y + a.forward(x),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("layer norm of a scalar");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Qwen's RMSNorm: normalised in f32, cast back to the input dtype, then scaled.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// On CUDA libtorch's fused kernel (one kernel forward, one backward: the composite below costs
    /// eight and fifteen, ~0.2 and ~0.5 ms per norm of a W1 micro-batch on an H200, ncu 2026-11-29);
    /// elsewhere Qwen's formulation, the reference.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if x.device().is_cuda() {
            self.fused(x)
        } else {
            self.reference(x)
        }
    }

    /// Qwen's RMSNorm as written: normalised in f32, cast back to x's dtype, then scaled.
    pub fn reference(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let inv = (xf.square().mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
        (xf * inv).to_kind(x.kind()) * &self.weight
    }

    /// `aten::rms_norm`: the same f32 statistics, scaled before the one cast back (so in bf16 a value
    /// may differ from the reference by one rounding).
    pub fn fused(&self, x: &Tensor) -> Tensor {
        let d = *x.size().last().expect("RMS norm of a scalar");
        x.rms_norm([d], Some(&self.weight), self.eps)
    }
}

/// PyTorch `nn.MultiheadAttention` with packed `in_proj_weight` rows [Wq; Wk; Wv], batch first here.
#[derive(Debug)]
pub struct Mha {
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj: Linear,
    pub heads: i64,
}

impl Mha {
    /// query (N, Lq, D), key/value (N, Lk, D) -> (N, Lq, D). No mask: every query sees every key.
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Tensor {
        let w = self.in_proj_weight.chunk(3, 0);
        let b = self.in_proj_bias.chunk(3, 0);
        let q = query.linear(&w[0], Some(&b[0]));
        let k = key.linear(&w[1], Some(&b[1]));
        let v = value.linear(&w[2], Some(&b[2]));
        let (n, lq, d) = q.size3().expect("mha query must be (N, L, D)");
        let hd = d / self.heads;
        let heads = |t: &Tensor| {
            let (n, l, _) = t.size3().expect("(N, L, D)");
            t.view([n, l, self.heads, hd]).transpose(1, 2)
        };
        let (q, k, v) = (heads(&q), heads(&k), heads(&v));
        // Flash attention where it applies (see `attention::dense_flash`: the shapes here change with
        // every micro-batch); `kernels.mha_attention: sdpa` keeps libtorch's choice (cuDNN on Hopper).
        let a = if mha_flash() && super::attention::dense_flash_applies(&q) {
            super::attention::dense_flash(&q, &k, &v)
        } else {
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false)
        };
        self.out_proj.forward(&a.transpose(1, 2).reshape([n, lq, d]))
    }
}

fn mha_flash() -> bool {
    super::choice::current().mha_attention == super::choice::MhaAttention::Flash
}

/// Bicubic (align_corners = false) resize of a square position table (G*G, D) to (T*T, D), in f32,
/// returned in the table's dtype; the table itself when the sizes agree (Qwen-VL's `get_abs_pos`).
///
/// The resize is libtorch's `upsample_bicubic2d` (cubic coefficient -0.75, edge taps clamped) written
/// as the separable linear map it is: out = R (T x G) applied to the rows and to the columns, two small
/// GEMMs with their own autograd. libtorch's CUDA kernel runs such a table in one thread block (one
/// thread per output position, looping over the D channels): 8 ms for the ViT's table and 21 ms for
/// the resampler's in every forward on an H200, 8 ms more in the backward (ncu, 2026-11-28).
pub fn resize_pos_table(table: &Tensor, target_tokens: i64) -> Tensor {
    let (n, d) = table.size2().expect("position table must be 2-D");
    let src = (n as f64).sqrt().round() as i64;
    let tgt = (target_tokens as f64).sqrt().round() as i64;
    if src == tgt {
        return table.shallow_clone();
    }
    let r = bicubic_matrix(src, tgt, table.device());
    // (G, G, D): rows first, (T, G*D); then the columns of every output row, batched over rows.
    let rows = r.matmul(&table.to_kind(Kind::Float).reshape([src, src * d])).reshape([tgt, src, d]);
    r.matmul(&rows).reshape([tgt * tgt, d]).to_kind(table.kind())
}

/// The (T x G) matrix of a 1-D bicubic resize from G to T samples as libtorch computes it
/// (align_corners = false: source x = (i + 0.5) G / T - 0.5, no clamping of x for cubic; taps at
/// floor(x) - 1 .. floor(x) + 2 clamped into [0, G - 1]; A = -0.75). Built once per (G, T, device).
fn bicubic_matrix(src: i64, tgt: i64, device: tch::Device) -> Tensor {
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<(i64, i64, tch::Device), Tensor>> = Default::default();
    }
    let key = (src, tgt, device);
    if let Some(t) = CACHE.with(|c| c.borrow().get(&key).map(|t| t.shallow_clone())) {
        return t;
    }
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = src as f64 / tgt as f64;
    let mut m = vec![0f32; (tgt * src) as usize];
    for i in 0..tgt {
        // libtorch computes the source coordinate and the weights in the accumulation type (f32).
        let x = (scale as f32 * (i as f32 + 0.5) - 0.5) as f64;
        let x0 = x.floor();
        let t = (x - x0) as f32 as f64;
        let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let j = (x0 as i64 + k as i64 - 1).clamp(0, src - 1);
            m[(i * src + j) as usize] += *wk as f32;
        }
    }
    let t = Tensor::from_slice(&m).view([tgt, src]).to_device(device);
    CACHE.with(|c| c.borrow_mut().insert(key, t.shallow_clone()));
    t
}

/// The resampler's fixed 2-D sin-cos table (G*G, D) with G = 16: first D/2 dims encode the column,
/// last D/2 the row; each half is [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(D/4)).
pub fn sincos_2d(dim: i64, grid: i64) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = Vec::with_capacity((grid * grid * dim) as usize);
    for row in 0..grid {
        for col in 0..grid {
            for p in [col, row] {
                // numpy computes this table in float64 and the model stores it as f32.
                out.extend(omega.iter().map(|w| (p as f64 * w).sin() as f32));
                out.extend(omega.iter().map(|w| (p as f64 * w).cos() as f32));
            }
        }
    }
    out
}

/// Rotary tables for positions `start..start+len`: cos and sin of shape (len, head_dim), f32.
/// `ntk_alpha` > 1 is Qwen's dynamic NTK base scaling (inference only).
pub fn rope_tables(head_dim: i64, base: f64, start: i64, len: i64, ntk_alpha: f64, device: tch::Device) -> (Tensor, Tensor) {
    let base = base * ntk_alpha.powf(head_dim as f64 / (head_dim as f64 - 2.0));
    // As Qwen: inv_freq = 1 / base^(arange(0, dim, 2).float() / dim), all in f32 torch arithmetic.
    let exps = Tensor::arange_start_step(0, head_dim, 2, (Kind::Float, device)) / head_dim as f64;
    let inv = Tensor::full([1], base, (Kind::Float, device)).pow(&exps).reciprocal();
    let pos = Tensor::arange_start(start, start + len, (Kind::Float, device));
    let freqs = pos.outer(&inv);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// Applies rotate-half RoPE in f32 to x (B, S, H, Dh) with tables (S, Dh), or (B, S, Dh) when each row
/// has its own positions; returns x's dtype. On CUDA the fused kernel ([`super::fused::rope`], equal to
/// the reference bit for bit) or, without libnvrtc, [`apply_rope_swapped`]; elsewhere the reference.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    if super::fused::runs_on(x) {
        super::fused::rope(x, cos, sin)
    } else if x.device().is_cuda() {
        apply_rope_swapped(x, cos, sin)
    } else {
        apply_rope_reference(x, cos, sin)
    }
}

/// RoPE as Qwen writes it: x in f32, `x * cos + rotate_half(x) * sin`, cast back.
pub fn apply_rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let half = xf.size()[3] / 2;
    let x1 = xf.narrow(3, 0, half);
    let x2 = xf.narrow(3, half, half);
    let rot = Tensor::cat(&[&x2.neg(), &x1], 3);
    let (c, s) = (cos.unsqueeze(-2), sin.unsqueeze(-2)); // (.., S, 1, Dh) broadcasts over heads
    (xf * c + rot * s).to_kind(x.kind())
}

/// The same rotation in four kernels instead of seven, and with half the f32 traffic:
/// `rotate_half(x) * sin = swap_halves(x) * [-sin_lo | sin_hi]`, so the halves are swapped in x's
/// dtype (one copy), `x * cos` promotes to f32 on the fly, and `addcmul` adds the swapped term, each
/// product rounded to f32 as in the reference before the sum (libtorch may fuse that sum into an FMA,
/// a last-bit difference in f32). The backward autograd derives is shorter in the same way.
pub fn apply_rope_swapped(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let last = sin.dim() as i64 - 1;
    let signed = Tensor::cat(&[&sin.narrow(last, 0, half).neg(), &sin.narrow(last, half, half)], last);
    let swapped = x.roll([half], [3]);
    let (c, s) = (cos.unsqueeze(-2), signed.unsqueeze(-2));
    (x * &c).addcmul(&swapped, &s).to_kind(x.kind())
}

/// A fast formulation compared with its reference: relative errors (max |fast - ref| / max |ref|) of the
/// output and of every input gradient, and each path's forward + backward time.
#[derive(Debug)]
pub struct FastPathCheck {
    pub name: &'static str,
    pub kind: Kind,
    pub forward_rel: f64,
    pub grad_rel: f64,
    pub reference_ms: f64,
    pub fast_ms: f64,
}

impl FastPathCheck {
    /// f32: rounding only; bf16: one bf16 rounding of the output, a few in the gradients.
    pub fn passed(&self) -> bool {
        let block = self.name.starts_with("qwen_block");
        let (f, g) = match (block, self.kind == Kind::BFloat16) {
            // The whole block, explicit against autograd: #14's bound on any gradient in bf16; in f32
            // the GEMMs' sums over 4096-11008 products in another order.
            (true, true) => (1.6e-2, 2e-2),
            (true, false) => (1e-5, 1e-4),
            (false, true) => (1.6e-2, 6.4e-2),
            (false, false) => (2e-6, 1e-5),
        };
        self.forward_rel <= f && self.grad_rel <= g
    }
}

/// Waits for the work queued on `device` (nothing to wait for on the CPU).
fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// max |a - r| / max |r|, in f32.
pub(crate) fn rel_err(a: &Tensor, r: &Tensor) -> f64 {
    let (a, r) = (a.to_kind(Kind::Float), r.to_kind(Kind::Float));
    (&a - &r).abs().max().double_value(&[]) / r.abs().max().double_value(&[]).max(1e-30)
}

/// Runs `once` and keeps what it returns, then times `reps` more runs: (that result, mean ms per run),
/// the device synchronised around the timing.
pub(crate) fn measured<T>(device: tch::Device, reps: usize, once: impl Fn() -> T) -> (T, f64) {
    let out = once();
    sync(device);
    let t = std::time::Instant::now();
    for _ in 0..reps.max(1) {
        let _ = once();
    }
    sync(device);
    (out, t.elapsed().as_secs_f64() * 1e3 / reps.max(1) as f64)
}

/// Output and input gradients of `f` at `inputs` under the loss `sum(f * g)` (f32), and its time.
fn with_grads(
    device: tch::Device,
    reps: usize,
    f: &dyn Fn() -> Tensor,
    g: &Tensor,
    inputs: &[&Tensor],
) -> ((Tensor, Vec<Tensor>), f64) {
    measured(device, reps, || {
        let y = f();
        let loss = (y.to_kind(Kind::Float) * g.to_kind(Kind::Float)).sum(Kind::Float);
        let grads = Tensor::run_backward(&[loss], inputs, false, false);
        (y, grads)
    })
}

/// A [`FastPathCheck`] of `fast` against `reference`, both evaluated by [`with_grads`].
pub(crate) fn compare(
    name: &'static str,
    kind: Kind,
    device: tch::Device,
    reps: usize,
    (reference, fast): (&dyn Fn() -> Tensor, &dyn Fn() -> Tensor),
    g: &Tensor,
    inputs: &[&Tensor],
) -> FastPathCheck {
    let ((yr, gr), reference_ms) = with_grads(device, reps, reference, g, inputs);
    let ((yf, gf), fast_ms) = with_grads(device, reps, fast, g, inputs);
    let grad_rel = gf.iter().zip(&gr).map(|(a, r)| rel_err(a, r)).fold(0.0, f64::max);
    FastPathCheck { name, kind, forward_rel: rel_err(&yf, &yr), grad_rel, reference_ms, fast_ms }
}

/// Compares the GPU formulations with their references on `device` in `kind` at block shape (B, S, H,
/// Dh), forward and backward, timing each over `reps` runs: [`RmsNorm::fused`] and
/// [`apply_rope_swapped`] everywhere; on CUDA also the NVRTC kernels (RoPE, gradient casts/adds,
/// cross-entropy, SwiGLU) and, in bf16, the flash attention of [`Mha::forward`].
pub fn check_fast_paths(device: tch::Device, kind: Kind, shape: (i64, i64, i64, i64), reps: usize) -> Vec<FastPathCheck> {
    let (b, s, h, dh) = shape;
    let d = h * dh;
    let (cos, sin) = rope_tables(dh, 10_000.0, 0, s, 1.0, device);
    let weight = (Tensor::randn([d], (Kind::Float, device)) * 0.3 + 1.0).to_kind(kind).set_requires_grad(true);
    let norm = RmsNorm { weight: weight.shallow_clone(), eps: 1e-6 };
    let x = Tensor::randn([b, s, d], (Kind::Float, device)).to_kind(kind).set_requires_grad(true);
    let g = Tensor::randn([b, s, d], (Kind::Float, device)).to_kind(kind);
    let heads = |x: &Tensor| x.view([b, s, h, dh]);
    let reference_rope = || apply_rope_reference(&heads(&x), &cos, &sin).view([b, s, d]);
    let mut out = vec![
        compare("rms_norm", kind, device, reps, (&|| norm.reference(&x), &|| norm.fused(&x)), &g, &[&x, &weight]),
        compare(
            "rope",
            kind,
            device,
            reps,
            (&reference_rope, &|| apply_rope_swapped(&heads(&x), &cos, &sin).view([b, s, d])),
            &g,
            &[&x],
        ),
    ];
    if device.is_cuda() && super::fused::available() {
        let fused_rope = || super::fused::rope(&heads(&x), &cos, &sin).view([b, s, d]);
        out.push(compare("rope_nvrtc", kind, device, reps, (&reference_rope, &fused_rope), &g, &[&x]));
        if kind == Kind::BFloat16 {
            out.push(check_accumulate(device, b * s * d, reps));
        }
        out.push(check_cross_entropy(device, kind, b * s, reps));
        // The MLP gate at W1's width (intermediate_size / 2 = 11,008): inputs a and b, output a * silu(b).
        let (ga, gb) = (
            Tensor::randn([b, s, 11_008], (Kind::Float, device)).to_kind(kind).set_requires_grad(true),
            (Tensor::randn([b, s, 11_008], (Kind::Float, device)) * 2.0).to_kind(kind).set_requires_grad(true),
        );
        let gg = Tensor::randn([b, s, 11_008], (Kind::Float, device)).to_kind(kind);
        let gates: (&dyn Fn() -> Tensor, &dyn Fn() -> Tensor) = (&|| &ga * gb.silu(), &|| super::fused::swiglu(&ga, &gb));
        let mut c = compare("swiglu", kind, device, reps, gates, &gg, &[&ga, &gb]);
        // An odd length takes the one-element-per-thread kernel.
        let (oa, ob) = (
            Tensor::randn([3, 7], (Kind::Float, device)).to_kind(kind),
            Tensor::randn([3, 7], (Kind::Float, device)).to_kind(kind),
        );
        c.forward_rel = c.forward_rel.max(rel_err(&super::fused::swiglu(&oa, &ob), &(&oa * ob.silu())));
        out.push(c);
    }
    if device.is_cuda() && kind == Kind::BFloat16 {
        // The resampler's pool at full size: 8 images x 32 heads, 256 queries over 1,024 keys, head size
        // 128: flash attention (`Mha::forward`) against libtorch's scaled_dot_product_attention.
        let mk = |l: i64| Tensor::randn([8, 32, l, 128], (Kind::Float, device)).to_kind(kind).set_requires_grad(true);
        let (q, k, v) = (mk(256), mk(1024), mk(1024));
        let gm = Tensor::randn([8, 32, 256, 128], (Kind::Float, device)).to_kind(kind);
        let sdpa = || Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        let flash = || super::attention::dense_flash(&q, &k, &v);
        out.push(compare("mha_flash", kind, device, reps, (&sdpa, &flash), &gm, &[&q, &k, &v]));
    }
    out
}

/// The fused cross-entropy against libtorch's f32 log-softmax loss over `rows` x 151,936 logits drawn from
/// N(0, 9): loss and logits gradient, and each path's time.
fn check_cross_entropy(device: tch::Device, kind: Kind, rows: i64, reps: usize) -> FastPathCheck {
    let vocab = 151_936;
    let logits = (Tensor::randn([rows, vocab], (Kind::Float, device)) * 3.0).to_kind(kind).set_requires_grad(true);
    let target = Tensor::randint(vocab, [rows], (Kind::Int64, device));
    let run = |fused: bool| {
        measured(device, reps, || {
            let loss = if fused {
                super::fused::cross_entropy_rows(&logits, &target).mean(Kind::Float)
            } else {
                super::Head::cross_entropy_reference(&logits, &target)
            };
            let g = Tensor::run_backward(&[&loss * 0.5], &[&logits], false, false).remove(0);
            (loss, g)
        })
    };
    let ((lr, gr), reference_ms) = run(false);
    let ((lf, gf), fast_ms) = run(true);
    FastPathCheck {
        name: "cross_entropy",
        kind,
        forward_rel: rel_err(&lf, &lr),
        grad_rel: rel_err(&gf, &gr),
        reference_ms,
        fast_ms,
    }
}

/// The fused bf16 -> f32 gradient copy and add against libtorch's `copy_` and `add_`, at an aligned offset
/// and at odd ones (the unvectorised kernel and the tail), and the time of one add of `n` elements each.
fn check_accumulate(device: tch::Device, n: i64, reps: usize) -> FastPathCheck {
    let mut worst: f64 = 0.0;
    for (off, len) in [(0, n), (3, n - 11), (8, 1001), (5, 7)] {
        let g = Tensor::randn([len], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let base = Tensor::randn([len + off], (Kind::Float, device));
        for add in [false, true] {
            let (ours, theirs) = (base.copy(), base.copy());
            super::fused::accumulate(&ours.narrow(0, off, len), &g, add);
            let mut t = theirs.narrow(0, off, len);
            if add {
                let _ = t.g_add_(&g);
            } else {
                t.copy_(&g);
            }
            worst = worst.max((&ours - &theirs).abs().max().double_value(&[]));
        }
    }
    let g = Tensor::randn([n], (Kind::Float, device)).to_kind(Kind::BFloat16);
    let acc = Tensor::zeros([n], (Kind::Float, device));
    let (_, reference_ms) = measured(device, reps, || {
        let _ = acc.shallow_clone().g_add_(&g);
    });
    let (_, fast_ms) = measured(device, reps, || super::fused::accumulate(&acc, &g, true));
    FastPathCheck { name: "grad_add", kind: Kind::Float, forward_rel: worst, grad_rel: 0.0, reference_ms, fast_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA formulations (fused RMS norm, swapped-halves RoPE) equal Qwen's, forward and gradient:
    /// to f32 rounding in f32, to one bf16 rounding in bf16 (`idavlm-worker kernels` runs the same on GPUs).
    #[test]
    fn fast_norm_and_rope_equal_the_reference_forward_and_gradient() {
        tch::manual_seed(5);
        for kind in [Kind::Float, Kind::BFloat16] {
            for c in check_fast_paths(tch::Device::Cpu, kind, (2, 7, 3, 8), 1) {
                assert!(c.passed(), "{kind:?} {}: forward {:.2e}, gradient {:.2e}", c.name, c.forward_rel, c.grad_rel);
            }
        }
        // Per-row tables (packed rows): (B, S, Dh).
        let (b, s, h, dh) = (2, 5, 2, 8);
        let (cos, sin) = rope_tables(dh, 10_000.0, 0, s, 1.0, tch::Device::Cpu);
        let x = Tensor::randn([b, s, h, dh], (Kind::Float, tch::Device::Cpu));
        let (c2, s2) = (cos.unsqueeze(0).repeat([b, 1, 1]), sin.unsqueeze(0).repeat([b, 1, 1]));
        let diff = (apply_rope_swapped(&x, &c2, &s2) - apply_rope_reference(&x, &cos, &sin)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "per-row tables: {diff}");
    }

    /// The GEMM form equals libtorch's upsample_bicubic2d, forward and gradient, up and down.
    #[test]
    fn position_table_resize_equals_upsample_bicubic2d_and_its_gradient() {
        tch::manual_seed(3);
        for (src, tgt, d) in [(16, 32, 24), (16, 4, 8), (16, 23, 5), (4, 16, 3)] {
            let table = Tensor::randn([src * src, d], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let reference = table
                .reshape([1, src, src, d])
                .permute([0, 3, 1, 2])
                .upsample_bicubic2d([tgt, tgt], false, None, None)
                .permute([0, 2, 3, 1])
                .reshape([tgt * tgt, d]);
            let ours = resize_pos_table(&table, tgt * tgt);
            let diff = (&ours - &reference).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{src}->{tgt}: forward differs by {diff}");
            let g = Tensor::randn([tgt * tgt, d], (Kind::Float, tch::Device::Cpu));
            let grad = |out: &Tensor| Tensor::run_backward(&[(out * &g).sum(Kind::Float)], &[&table], false, false).remove(0);
            let (gr, go) = (grad(&reference), grad(&ours));
            let rel = (&go - &gr).abs().max().double_value(&[]) / gr.abs().max().double_value(&[]);
            assert!(rel < 1e-5, "{src}->{tgt}: gradient differs by {rel} (relative)");
        }
    }
}
