//! Causal attention over packed rows: several samples one after another in one row, each attending only
//! to itself (block-diagonal causal). On CUDA in bf16/f16 it is libtorch's variable-length flash
//! attention (`_flash_attention_forward` with cumulative sequence lengths, through csrc/varlen.cpp); on
//! CPU, and for f32, an explicit block-diagonal mask through scaled_dot_product_attention, which is the
//! reference the tests compare the packed path against. Also dense flash attention ([`dense_flash`]) for
//! the resampler and the ID-Former, whose shapes change with every micro-batch.

use std::ffi::c_char;

use tch::{Device, Kind, Tensor};

/// The samples of a packed row: their lengths, in order.
#[derive(Debug)]
pub struct Segments {
    pub lens: Vec<i64>,
    /// (n+1,) int32 offsets on the row's device: 0, l0, l0+l1, ...
    pub cu_seqlens: Tensor,
    pub max_len: i64,
    /// The CPU path's mask, built by the first block that needs it and shared by the others.
    mask: std::cell::OnceCell<Tensor>,
}

impl Segments {
    pub fn new(lens: &[usize], device: Device) -> Self {
        let lens: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
        let mut cu = vec![0i32];
        for &l in &lens {
            cu.push(cu.last().expect("non-empty") + l as i32);
        }
        let max_len = lens.iter().copied().max().unwrap_or(0);
        Self { cu_seqlens: super::fused::upload(&Tensor::from_slice(&cu), device), lens, max_len, mask: Default::default() }
    }

    pub fn total(&self) -> i64 {
        self.lens.iter().sum()
    }

    /// Each position's index inside its own sample: 0..l0, 0..l1, ...
    pub fn positions(&self) -> Vec<i64> {
        self.lens.iter().flat_map(|&l| 0..l).collect()
    }

    /// (S, S) bool: query i sees key j iff both are in the same sample and j <= i (built once).
    pub fn mask(&self, device: Device) -> &Tensor {
        self.mask.get_or_init(|| self.build_mask(device))
    }

    fn build_mask(&self, device: Device) -> Tensor {
        let seg: Vec<i64> = self.lens.iter().enumerate().flat_map(|(k, &l)| std::iter::repeat_n(k as i64, l as usize)).collect();
        let seg = super::fused::upload(&Tensor::from_slice(&seg), device);
        let s = self.total();
        let idx = Tensor::arange(s, (Kind::Int64, device));
        seg.unsqueeze(1).eq_tensor(&seg.unsqueeze(0)).logical_and(&idx.unsqueeze(0).le_tensor(&idx.unsqueeze(1)))
    }
}

extern "C" {
    fn idavlm_flash_varlen(
        q: *const torch_sys::C_tensor,
        k: *const torch_sys::C_tensor,
        v: *const torch_sys::C_tensor,
        cu: *const torch_sys::C_tensor,
        max_len: i64,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn idavlm_flash_dense(
        q: *const torch_sys::C_tensor,
        k: *const torch_sys::C_tensor,
        v: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn idavlm_backward_with(out: *const torch_sys::C_tensor, grad: *const torch_sys::C_tensor) -> *mut c_char;
}

/// Backpropagates `grad` (the loss's gradient at `out`, same shape) through `out`'s graph into the
/// leaves' `.grad`: libtorch's `autograd::backward({out}, {grad})`, which tch does not expose. The same
/// gradients as `(out * grad).sum().backward()` without its multiply and reduction.
pub fn backward_with(out: &Tensor, grad: &Tensor) {
    // SAFETY: both pointers are live tch tensors borrowed for the call; the shim catches every C++
    // exception and returns its message instead.
    if let Err(msg) = super::fused::result(unsafe { idavlm_backward_with(out.as_ptr(), grad.as_ptr()) }) {
        panic!("backward through a block failed: {msg}");
    }
}

/// Whether [`dense_flash`] can take q (B, H, L, Dh): CUDA bf16/f16, head size a multiple of 8 up to 256.
pub fn dense_flash_applies(q: &Tensor) -> bool {
    let dh = q.size().last().copied().unwrap_or(0);
    q.device().is_cuda() && matches!(q.kind(), Kind::BFloat16 | Kind::Half) && dh % 8 == 0 && dh <= 256
}

/// Attention without a mask through libtorch's flash-attention operator: q (B, H, Lq, Dh), k and v
/// (B, H, Lk, Dh) -> (B, H, Lq, Dh), differentiable. For shapes that change from call to call (the
/// resampler and the ID-Former over each micro-batch's images): scaled_dot_product_attention runs cuDNN
/// there, which builds a plan for each new shape (40-190 ms on an H200, `scripts/stem-attention-probe.py`).
pub fn dense_flash(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    // SAFETY: three live tch tensors borrowed for the call; the shim catches every C++ exception.
    super::fused::shim_tensor("flash attention", |out| unsafe { idavlm_flash_dense(q.as_ptr(), k.as_ptr(), v.as_ptr(), out) })
}

/// Packed causal attention: q, k, v (1, S, H, Dh) in the row's sample order -> (1, S, H, Dh).
pub fn packed(q: &Tensor, k: &Tensor, v: &Tensor, seg: &Segments) -> Tensor {
    let (b, s, h, dh) = q.size4().expect("packed attention takes (1, S, H, Dh)");
    assert_eq!(b, 1, "a packed micro-batch is one row");
    assert_eq!(s, seg.total(), "packed row length and segment lengths disagree");
    let flash = q.device().is_cuda() && matches!(q.kind(), Kind::BFloat16 | Kind::Half);
    if flash {
        let (q, k, v) = (q.view([s, h, dh]).contiguous(), k.view([s, h, dh]).contiguous(), v.view([s, h, dh]).contiguous());
        // SAFETY: the four pointers are live tch tensors borrowed for the call; the shim catches every C++
        // exception.
        let out = super::fused::shim_tensor("flash attention over packed samples", |out| unsafe {
            idavlm_flash_varlen(q.as_ptr(), k.as_ptr(), v.as_ptr(), seg.cu_seqlens.as_ptr(), seg.max_len, out)
        });
        return out.view([1, s, h, dh]);
    }
    let mask = seg.mask(q.device());
    let t = |x: &Tensor| x.transpose(1, 2);
    let a = Tensor::scaled_dot_product_attention(&t(q), &t(k), &t(v), Some(mask), 0.0, false, None, false);
    a.transpose(1, 2)
}
