//! Fused CUDA kernels of the LLM block (csrc/fused.cpp): compiled at run time with the libnvrtc that
//! ships in torch's wheel, launched on libtorch's stream, differentiable as autograd functions. Used on
//! CUDA tensors when libnvrtc is found; otherwise (and with `kernels.fused: false`) the libtorch formulations
//! run, with one warning saying why.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use tch::{Device, Tensor};

extern "C" {
    fn idavlm_fused_setup(nvrtc: *const c_char) -> *mut c_char;
    fn idavlm_fused_compile_check(nvrtc: *const c_char, arch: i32) -> *mut c_char;
    fn idavlm_rope(
        x: *const torch_sys::C_tensor,
        cos: *const torch_sys::C_tensor,
        sin: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn idavlm_adamw(
        p: *const torch_sys::C_tensor,
        g: *const torch_sys::C_tensor,
        m: *const torch_sys::C_tensor,
        v: *const torch_sys::C_tensor,
        scale: f32,
        scaled: i32,
        decay: f32,
        w1: f32,
        beta2: f32,
        omb2: f32,
        step: f32,
        inv_bc2_sqrt: f32,
        eps: f32,
    ) -> *mut c_char;
    fn idavlm_accumulate(acc: *const torch_sys::C_tensor, g: *const torch_sys::C_tensor, add: i32) -> *mut c_char;
    fn idavlm_cross_entropy_rows(
        logits: *const torch_sys::C_tensor,
        target: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn idavlm_swiglu(
        a: *const torch_sys::C_tensor,
        b: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> *mut c_char;
    fn idavlm_free_message(m: *mut c_char);
    fn idavlm_upload(cpu: *const torch_sys::C_tensor, device: i32, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
    fn idavlm_storage_release(t: *const torch_sys::C_tensor) -> *mut c_char;
    fn idavlm_storage_restore(t: *const torch_sys::C_tensor, nbytes: i64, out: *mut *mut torch_sys::C_tensor) -> *mut c_char;
}

/// Frees the memory behind `t`'s storage (csrc/storage.cpp): every tensor sharing the storage (views,
/// detached leaves, what an autograd graph saved) keeps its shape but holds no data until
/// [`storage_restore`].
///
/// # Safety
/// No tensor sharing `t`'s storage may be read or written until [`storage_restore`] has given the
/// storage memory again: libtorch's kernels do not check, and the data pointer is null (a kernel would
/// read or write through it).
pub unsafe fn storage_release(t: &Tensor) {
    // SAFETY: `t` is a live tch tensor borrowed for the call and the shim catches every C++ exception;
    // the caller upholds that nothing reads the released storage.
    if let Err(msg) = result(unsafe { idavlm_storage_release(t.as_ptr()) }) {
        panic!("releasing a storage failed: {msg}");
    }
}

/// Allocates `nbytes` for `t`'s released storage again (contents undefined) and returns a tensor of
/// `t`'s shape over it with its own version counter, to fill it through without touching the version
/// of the tensors sharing the storage (which an autograd graph checks in the backward).
pub fn storage_restore(t: &Tensor, nbytes: usize) -> Tensor {
    // SAFETY: a live tch tensor borrowed for the call.
    shim_tensor("restoring a storage", |out| unsafe { idavlm_storage_restore(t.as_ptr(), nbytes as i64, out) })
}

/// `t` (on the CPU) on `device`. To a GPU the copy goes through pinned memory without blocking: a copy
/// from pageable memory first waits for all work queued on the stream, which left the GPU idle while
/// the host built the next kernels (the step's index tensors, inputs and targets come this way).
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    let Device::Cuda(i) = device else { return t.to_device(device) };
    // SAFETY: a live tch tensor borrowed for the call.
    shim_tensor(format_args!("upload to {device:?}"), |out| unsafe { idavlm_upload(t.as_ptr(), i as i32, out) })
}

/// The MLP's gate `a * silu(b)` (a = w1(h), b = w2(h): same shape, bf16 or f32 on CUDA) in one kernel each
/// way, saving only a and b for the backward. Call after [`available`].
pub fn swiglu(a: &Tensor, b: &Tensor) -> Tensor {
    // SAFETY: two live tch tensors borrowed for the call.
    shim_tensor("fused SwiGLU", |out| unsafe { idavlm_swiglu(a.as_ptr(), b.as_ptr(), out) })
}

/// Cross-entropy of each row of `logits` (N, V), bf16 or f32 contiguous on CUDA, against int64 `target`
/// (N,): row losses (N,) f32, differentiable in the logits. Computed in f32 from the logits as they are
/// (no f32 copy of them, no saved log-probabilities: two passes forward, one backward). Call after
/// [`available`].
pub fn cross_entropy_rows(logits: &Tensor, target: &Tensor) -> Tensor {
    // SAFETY: two live tch tensors borrowed for the call.
    shim_tensor("fused cross-entropy", |out| unsafe { idavlm_cross_entropy_rows(logits.as_ptr(), target.as_ptr(), out) })
}

/// `acc = g` (add false) or `acc += g` for a gradient `g` of `acc`'s length. A contiguous bf16 `g` into a
/// contiguous f32 CUDA `acc` goes through the vectorised kernel (exactly libtorch's cast-copy and add;
/// libtorch runs mixed-dtype element-wise ops unvectorised: ~2.7 TB/s on an H200); anything else through
/// libtorch's `copy_` / `add_`.
pub fn accumulate(acc: &Tensor, g: &Tensor, add: bool) {
    let kernel = acc.kind() == tch::Kind::Float
        && g.kind() == tch::Kind::BFloat16
        && acc.is_contiguous()
        && g.is_contiguous()
        && acc.numel() == g.numel()
        && runs_on(acc);
    if !kernel {
        let mut acc = acc.shallow_clone();
        tch::no_grad(|| {
            if add {
                let _ = acc.g_add_(g);
            } else {
                acc.copy_(g);
            }
        });
        return;
    }
    // SAFETY: two live tch tensors borrowed for the call; the shim checks dtypes, layout and length.
    if let Err(msg) = result(unsafe { idavlm_accumulate(acc.as_ptr(), g.as_ptr(), i32::from(add)) }) {
        panic!("fused gradient accumulation failed: {msg}");
    }
}

/// The f32 scalars of one AdamW step as libtorch's kernels receive them (see `AdamW::update_scaled`).
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    /// Gradient factor (global-norm clipping); applied when `scaled`.
    pub scale: f32,
    pub scaled: bool,
    /// 1 - lr wd
    pub decay: f32,
    /// 1 - beta1 (lerp weight)
    pub w1: f32,
    pub beta2: f32,
    /// 1 - beta2
    pub omb2: f32,
    /// -lr / (1 - beta1^t)
    pub step: f32,
    /// 1 / sqrt(1 - beta2^t)
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
}

/// One AdamW step in place over contiguous f32 CUDA partitions in one kernel (`g` is read only). Call
/// after [`available`].
pub fn adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamScalars) {
    // SAFETY: four live tch tensors borrowed for the call; the shim checks their dtype, device, length
    // and layout and catches every C++ exception.
    let r = result(unsafe {
        idavlm_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.scale,
            i32::from(s.scaled),
            s.decay,
            s.w1,
            s.beta2,
            s.omb2,
            s.step,
            s.inv_bc2_sqrt,
            s.eps,
        )
    });
    if let Err(msg) = r {
        panic!("fused AdamW failed: {msg}");
    }
}

/// The tensor a C++ shim function (csrc/*.cpp) stores in its `out` argument. `call` makes the FFI call with
/// the given out pointer and returns its message (null: success); a failure panics as "`what` failed:
/// the shim's message".
pub(crate) fn shim_tensor(
    what: impl std::fmt::Display,
    call: impl FnOnce(*mut *mut torch_sys::C_tensor) -> *mut c_char,
) -> Tensor {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    if let Err(msg) = result(call(&mut out)) {
        panic!("{what} failed: {msg}");
    }
    // SAFETY: on success the shim stored a new at::Tensor* in `out`, which we now own (from_ptr takes it).
    unsafe { Tensor::from_ptr(out) }
}

/// Takes a message returned by one of the C++ shim's functions (csrc/*.cpp; null: success).
pub(crate) fn result(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated message from strdup, freed once by the shim's free.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { idavlm_free_message(err) };
    Err(msg)
}

/// Where libnvrtc may be: beside libtorch's CUDA libraries in the wheel's `nvidia/*/lib` folders (found
/// from `$IDAVLM_TORCH_LIB` and `$LD_LIBRARY_PATH`), then the loader's own search by name.
pub fn nvrtc_candidates() -> Vec<PathBuf> {
    const NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    let mut dirs = crate::runtime::torch_lib_dirs();
    for d in crate::runtime::torch_lib_dirs() {
        // <site-packages>/torch/lib -> <site-packages>/nvidia/*/lib
        if let Some(site) = d.parent().and_then(|t| t.parent()) {
            if let Ok(rd) = std::fs::read_dir(site.join("nvidia")) {
                let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("lib")).collect();
                more.sort();
                dirs.extend(more);
            }
        }
    }
    let mut out: Vec<PathBuf> = dirs.iter().flat_map(|d| NAMES.iter().map(move |n| d.join(n))).filter(|p| p.exists()).collect();
    out.extend(NAMES.iter().map(PathBuf::from));
    out
}

/// libnvrtc opens its companion `libnvrtc-builtins.so.<version>` by name when it compiles, which the
/// loader finds only when the wheel's folder is on `LD_LIBRARY_PATH`; loading it first from the folder
/// of `nvrtc` makes that lookup find the loaded copy.
fn preload_builtins(nvrtc: &std::path::Path) {
    let Some(dir) = nvrtc.parent().filter(|d| !d.as_os_str().is_empty()) else { return };
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so") {
            let c = CString::new(e.path().to_string_lossy().as_bytes()).expect("path without NUL");
            // SAFETY: dlopen with a valid NUL-terminated path; the handle is kept for the process's life.
            unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        }
    }
}

/// Opens libnvrtc once: Ok(path) or why the fused kernels are off.
fn setup() -> &'static Result<PathBuf, String> {
    static SETUP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut tried = Vec::new();
        for p in nvrtc_candidates() {
            preload_builtins(&p);
            let c = CString::new(p.to_string_lossy().as_bytes()).expect("path without NUL");
            // SAFETY: a valid NUL-terminated path; the shim catches every C++ exception.
            match result(unsafe { idavlm_fused_setup(c.as_ptr()) }) {
                Ok(()) => return Ok(p),
                Err(e) => tried.push(e),
            }
        }
        Err(format!("libnvrtc not found ({})", tried.join("; ")))
    })
}

/// Whether a fused kernel takes `t`: a bf16 or f32 CUDA tensor, and the kernels available.
pub fn runs_on(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.kind(), tch::Kind::BFloat16 | tch::Kind::Float) && available()
}

/// Whether the fused kernels run on CUDA tensors (warns once when not).
pub fn available() -> bool {
    static WARNED: OnceLock<()> = OnceLock::new();
    if !super::choice::current().fused {
        return false;
    }
    match setup() {
        Ok(_) => true,
        Err(why) => {
            WARNED.get_or_init(|| tracing::warn!("fused CUDA kernels off, libtorch formulations instead: {why}"));
            false
        }
    }
}

/// Compiles the kernels for compute capability `arch` (e.g. 90) with the given libnvrtc, without a GPU.
pub fn compile_check(nvrtc: &std::path::Path, arch: i32) -> Result<(), String> {
    preload_builtins(nvrtc);
    let c = CString::new(nvrtc.to_string_lossy().as_bytes()).expect("path without NUL");
    // SAFETY: a valid NUL-terminated path; the shim catches every C++ exception.
    result(unsafe { idavlm_fused_compile_check(c.as_ptr(), arch) })
}

/// Rotate-half RoPE of x (B, S, H, Dh), bf16 or f32 on CUDA, with f32 tables (S, Dh) or (B, S, Dh):
/// bit for bit [`super::layers::apply_rope_reference`], in one kernel each way. Call after [`available`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    // SAFETY: three live tch tensors borrowed for the call.
    shim_tensor("fused rope", |out| unsafe { idavlm_rope(x.as_ptr(), cos.as_ptr(), sin.as_ptr(), out) })
}

#[cfg(test)]
mod tests {
    /// The kernels' source compiles with the wheel's libnvrtc (no GPU needed) for Ampere and Hopper.
    #[test]
    fn the_fused_kernels_compile_with_the_wheels_nvrtc() {
        let nvrtc = super::nvrtc_candidates()
            .into_iter()
            .find(|p| p.is_absolute())
            .expect("libnvrtc beside the venv's libtorch (nvidia/cu13/lib; source scripts/env.sh)");
        for arch in [80, 90] {
            super::compile_check(&nvrtc, arch).unwrap_or_else(|e| panic!("{}: {e}", nvrtc.display()));
        }
    }

    /// ZeRO-3's reshard after forward: a graph's saved parameter (a leaf over a flat buffer) survives
    /// its storage being freed and filled again through the restored alias: the backward sees the
    /// refilled values and no in-place modification (the alias has its own version counter).
    #[test]
    fn a_released_storage_restores_for_the_backward() {
        use tch::{Kind, Tensor};
        let values = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) / 7.0;
        let flat = values.copy();
        let w = flat.narrow(0, 4, 6).view([2, 3]).detach().set_requires_grad(true);
        let x = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = (&w * &x).sum(Kind::Float);
        // SAFETY: `flat`, `w` and the graph's saved `w` are read again only after the restore below.
        unsafe { super::storage_release(&flat) };
        assert_eq!(flat.data_ptr(), std::ptr::null_mut(), "the memory is gone");
        let mut alias = super::storage_restore(&flat, 12 * 4);
        assert_eq!(alias.size(), vec![12]);
        tch::no_grad(|| alias.copy_(&values));
        y.backward();
        assert!(x.grad().equal(&values.narrow(0, 4, 6).view([2, 3])));
        assert!(w.grad().equal(&Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu))));
        // Restoring a storage that holds memory is refused.
        let r = std::panic::catch_unwind(|| super::storage_restore(&flat, 48));
        assert!(r.is_err());
    }
}
