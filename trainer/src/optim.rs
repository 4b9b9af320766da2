//! AdamW over f32 flat partitions, the learning-rate schedules, and global-norm clipping factors.

use tch::Tensor;

use crate::recipe::{OptimizerSection, ScheduleKind, ScheduleSection};

/// Learning rate of every optimizer step, 1-based.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// Warm-up defaults to max(2, ceil(1% of the run's steps)) (SPEC §4).
    pub fn new(s: &ScheduleSection, lr: f64, total_steps: u64) -> Self {
        let warmup = s.warmup_steps.unwrap_or_else(|| ((total_steps as f64 * 0.01).ceil() as u64).max(2));
        Self { kind: s.kind, lr, min_lr: s.min_lr, warmup, total: total_steps }
    }

    /// The lr of optimizer step `k` (1-based).
    pub fn lr_at(&self, k: u64) -> f64 {
        let w = self.warmup.max(1) as f64;
        match self.kind {
            // DeepSpeed WarmupLR (log): its counter is k - 2 at step k (starts at -1, advanced after
            // each step); gamma = ln(counter + 1) / ln(W) while counter < W; lr 0 while counter < 0.
            ScheduleKind::WarmupLog => {
                let c = k as i64 - 2;
                if c < 0 {
                    0.0
                } else if (c as f64) < w {
                    self.min_lr + (self.lr - self.min_lr) * ((c + 1) as f64).ln() / w.max(2.0).ln()
                } else {
                    self.lr
                }
            }
            ScheduleKind::WarmupLinear => {
                let c = k as i64 - 2;
                if c < 0 {
                    0.0
                } else if (c as f64) < w {
                    self.min_lr + (self.lr - self.min_lr) * c as f64 / w
                } else {
                    self.lr
                }
            }
            ScheduleKind::Cosine => {
                let k = k as f64;
                if k <= w {
                    self.lr * k / w
                } else {
                    let p = ((k - w) / (self.total as f64 - w).max(1.0)).min(1.0);
                    self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
            ScheduleKind::Constant => self.lr,
        }
    }
}

/// What one AdamW step of one parameter group takes besides the tensors.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs {
    pub lr: f64,
    pub weight_decay: f64,
    /// The gradient's factor (global-norm clipping); 1 or more is not applied.
    pub grad_scale: f64,
    /// 1-based optimizer step.
    pub t: u64,
}

/// Hyper-parameters of AdamW.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(o: &OptimizerSection) -> Self {
        Self { beta1: o.betas[0], beta2: o.betas[1], eps: o.eps, weight_decay: o.weight_decay }
    }

    /// One decoupled AdamW update of `param` (f32) in place, as torch.optim.AdamW: decay, moments,
    /// bias correction with the 1-based step `t`.
    pub fn update(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, lr: f64, t: u64) {
        self.update_scaled(param, grad, m, v, &StepArgs { lr, weight_decay: self.weight_decay, grad_scale: 1.0, t })
    }

    /// 1 - beta1^t and 1 - beta2^t for the 1-based step `t`.
    fn bias_corrections(&self, t: u64) -> (f64, f64) {
        (1.0 - self.beta1.powi(t as i32), 1.0 - self.beta2.powi(t as i32))
    }

    /// One AdamW step of `grad * k.grad_scale` (global-norm clipping; a scale >= 1 is not applied) with
    /// the step's lr, weight decay and 1-based step number. On CUDA one fused kernel
    /// ([`crate::model::fused::adamw`]: the same operations in one pass instead of twelve); elsewhere, or
    /// without libnvrtc, libtorch's operations ([`Self::update_unfused`]).
    pub fn update_scaled(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, k: &StepArgs) {
        let (bc1, bc2) = self.bias_corrections(k.t);
        let fusable = [&*param, grad, &*m, &*v].iter().all(|x| x.kind() == tch::Kind::Float && x.is_contiguous());
        if fusable && crate::model::fused::runs_on(param) {
            let s = crate::model::fused::AdamScalars {
                scale: k.grad_scale as f32,
                scaled: k.grad_scale < 1.0,
                decay: (1.0 - k.lr * k.weight_decay) as f32,
                w1: (1.0 - self.beta1) as f32,
                beta2: self.beta2 as f32,
                omb2: (1.0 - self.beta2) as f32,
                step: (-k.lr / bc1) as f32,
                // libtorch divides by a scalar as a product with its f32 reciprocal.
                inv_bc2_sqrt: 1.0f32 / bc2.sqrt() as f32,
                eps: self.eps as f32,
            };
            crate::model::fused::adamw(param, grad, m, v, s);
            return;
        }
        self.update_unfused(param, grad, m, v, k)
    }

    /// [`Self::update_scaled`] as libtorch operations (the reference of the fused kernel).
    pub fn update_unfused(&self, param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, k: &StepArgs) {
        let (bc1, bc2) = self.bias_corrections(k.t);
        let (lr, weight_decay, grad_scale) = (k.lr, k.weight_decay, k.grad_scale);
        tch::no_grad(|| {
            let grad = if grad_scale < 1.0 { grad * grad_scale } else { grad.shallow_clone() };
            let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
            let _ = m.lerp_(&grad, 1.0 - self.beta1);
            let _ = v.g_mul_scalar_(self.beta2);
            let _ = v.g_add_(&(&grad * &grad * (1.0 - self.beta2)));
            let denom = v.sqrt() / bc2.sqrt() + self.eps;
            let _ = param.addcdiv_(&(m.shallow_clone() * (-lr / bc1)), &denom);
        });
    }
}

/// Compares the fused AdamW kernel with libtorch's operations on `device` over `n` elements (a few steps,
/// clipped and not): relative error of the parameters and moments, and the time of one step of each.
/// None where the kernel does not run (not CUDA, no libnvrtc).
pub fn check_fused_adamw(device: tch::Device, n: i64, reps: usize) -> Option<crate::model::layers::FastPathCheck> {
    use crate::model::layers::{measured, rel_err};
    if !device.is_cuda() || !crate::model::fused::available() {
        return None;
    }
    let o = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let f = (tch::Kind::Float, device);
    let init = [Tensor::randn([n], f), Tensor::randn([n], f) * 1e-3, Tensor::rand([n], f) * 1e-6];
    let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn([n], f) * 1e-2).collect();
    let run = |fused: bool| -> (Vec<Tensor>, f64) {
        let step = |[p, m, v]: &[Tensor; 3], g: &Tensor, scale: f64, t: u64| {
            let k = StepArgs { lr: 1e-3, weight_decay: 0.1, grad_scale: scale, t };
            let (mut p, mut m, mut v) = (p.shallow_clone(), m.shallow_clone(), v.shallow_clone());
            if fused {
                o.update_scaled(&mut p, g, &mut m, &mut v, &k);
            } else {
                o.update_unfused(&mut p, g, &mut m, &mut v, &k);
            }
        };
        // Three steps compared (the second clipped), then `reps` more timed on copies.
        let state = init.each_ref().map(|t| t.copy());
        for (t, g) in grads.iter().enumerate() {
            step(&state, g, if t == 1 { 0.5 } else { 1.0 }, t as u64 + 1);
        }
        let copies = state.each_ref().map(|t| t.copy());
        let (_, ms) = measured(device, reps, || step(&copies, &grads[0], 0.5, 4));
        (state.into(), ms)
    };
    let _ = run(true);
    let (reference, reference_ms) = run(false);
    let (fused, fast_ms) = run(true);
    let forward_rel = fused.iter().zip(&reference).map(|(a, r)| rel_err(a, r)).fold(0.0, f64::max);
    Some(crate::model::layers::FastPathCheck {
        name: "adamw",
        kind: tch::Kind::Float,
        forward_rel,
        grad_rel: 0.0,
        reference_ms,
        fast_ms,
    })
}

/// The factor gradients are multiplied by for global-norm clipping (torch's clip_grad_norm_).
pub fn clip_coef(total_norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(m) => (m / (total_norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepspeed_warmup_log() {
        let s = Schedule { kind: ScheduleKind::WarmupLog, lr: 5e-6, min_lr: 0.0, warmup: 10, total: 1000 };
        assert_eq!(s.lr_at(1), 0.0);
        assert_eq!(s.lr_at(2), 0.0);
        assert!((s.lr_at(3) - 5e-6 * 2f64.ln() / 10f64.ln()).abs() < 1e-18);
        assert!((s.lr_at(11) - 5e-6 * 10f64.ln() / 10f64.ln()).abs() < 1e-18);
        assert_eq!(s.lr_at(12), 5e-6);
        assert_eq!(s.lr_at(500), 5e-6);
    }

    #[test]
    fn adamw_matches_the_formula() {
        let o = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut p = Tensor::from_slice(&[1.0f32, -2.0]);
        let g = Tensor::from_slice(&[0.5f32, 0.25]);
        let mut m = Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        let mut v = m.copy();
        o.update(&mut p, &g, &mut m, &mut v, 1e-3, 1);
        // First step: m/bc1 = g, sqrt(v/bc2) = |g| -> p = p(1 - lr wd) - lr g/(|g| + eps).
        let want = [1.0 * (1.0 - 1e-4) - 1e-3 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 1e-4) - 1e-3 * 0.25 / (0.25 + 1e-8)];
        for (i, w) in want.iter().enumerate() {
            assert!((p.double_value(&[i as i64]) - w).abs() < 1e-6);
        }
    }
}
