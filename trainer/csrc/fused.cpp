// Fused elementwise kernels of the LLM block on CUDA, compiled at run time with NVRTC (libnvrtc ships in
// torch's wheel; no CUDA toolchain is needed where the binary is built or run) and launched through the
// driver API on libtorch's stream (the legacy default stream of the tensor's device). Each is a
// torch::autograd::Function, so the block's autograd graph, recomputation and `backward_with` work as
// with libtorch's own operators.
//
// RoPE (rotate-half, Qwen's formulation in f32): one kernel forward, one backward, each reading its input
// once and writing its output once in the tensor's dtype, instead of libtorch's chain of casts, a copy of
// the swapped halves and f32 temporaries. The arithmetic is the reference's, rounding for rounding
// (products and sums rounded separately to f32, no FMA, round-to-nearest-even back to bf16), so its
// results equal the autograd formulation's bit for bit (`idavlm-worker kernels` checks this on GPUs).
//
// Nothing here links against CUDA: libcuda and libnvrtc are opened with dlopen, the latter by the path
// the Rust side found. Exceptions never cross into Rust: failures come back as messages.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/autograd.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused.h"

namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
using nvrtcResult = int;
using nvrtcProgram = void*;

constexpr int kAttrCcMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrCcMinor = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR

struct Api {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                             void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcGetPTXSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetPTX)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
  const char* (*nvrtcGetErrorString)(nvrtcResult);
  bool driver = false;
  bool nvrtc = false;
};

Api api;
std::mutex mu;

// Kernels, one thread per rotated pair (i, i + half) of one (row, position, head). x is read through its
// strides (the last one 1), y is written contiguous (B, S, H, 2*half); the f32 tables are (S, 2*half),
// or (B, S, 2*half) with batch stride tb. backward = 1 applies the transposed rotation to a gradient.
const char* kSource = R"CUDA(
typedef unsigned short bf16_t;
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) { return __uint_as_float(((unsigned)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)((u >> 16) | 0x40u); return; }  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                     // nearest, ties to even
  p[i] = (bf16_t)(u >> 16);
}
template <typename T>
__device__ __forceinline__ void rope(const T* x, T* y, const float* cs, const float* sn, long long n_items, int half,
                                     int heads, int seq, long long sb, long long ss, long long sh, long long tb,
                                     int backward, long long ysb, long long yss, long long ysh) {
  // One thread per (row, position, i) pair slot, looping over the heads: the four table values are read
  // once for all heads, and a warp's reads of x and writes of y stay contiguous within each head.
  long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n_items) return;
  int i = (int)(p % half);
  long long r = p / half;
  int s = (int)(r % seq);
  long long b = r / seq;
  long long ti = b * tb + (long long)s * (2 * half) + i;
  float c_lo = cs[ti], c_hi = cs[ti + half], s_lo = sn[ti], s_hi = sn[ti + half];
  long long xb = b * sb + s * ss + i;
  long long yb = b * ysb + s * yss + i;
  for (int h = 0; h < heads; ++h) {
    long long xi = xb + h * sh, yi = yb + h * ysh;
    float lo = ld(x, xi), hi = ld(x, xi + half);
    float a, c;
    if (!backward) {  // y = x cos + rotate_half(x) sin, rotate_half(x) = (-x_hi, x_lo)
      a = __fadd_rn(__fmul_rn(lo, c_lo), __fmul_rn(-hi, s_lo));
      c = __fadd_rn(__fmul_rn(hi, c_hi), __fmul_rn(lo, s_hi));
    } else {          // dx = g cos + rotate_half^T(g sin), rotate_half^T(v) = (v_hi, -v_lo)
      a = __fadd_rn(__fmul_rn(lo, c_lo), __fmul_rn(hi, s_hi));
      c = __fadd_rn(__fmul_rn(hi, c_hi), __fmul_rn(-lo, s_lo));
    }
    st(y, yi, a);
    st(y, yi + half, c);
  }
}
#define ARGS long long n, int half, int heads, int seq, long long sb, long long ss, long long sh, long long tb, int bw, \
             long long ysb, long long yss, long long ysh
extern "C" __global__ void rope_bf16(const bf16_t* x, bf16_t* y, const float* c, const float* s, ARGS) {
  rope<bf16_t>(x, y, c, s, n, half, heads, seq, sb, ss, sh, tb, bw, ysb, yss, ysh);
}
extern "C" __global__ void rope_f32(const float* x, float* y, const float* c, const float* s, ARGS) {
  rope<float>(x, y, c, s, n, half, heads, seq, sb, ss, sh, tb, bw, ysb, yss, ysh);
}
// One AdamW step over f32 partitions in one pass, the operations of optim.rs's libtorch form in order and
// rounded as libtorch's kernels round them (a division by a scalar is a product with its f32 reciprocal;
// lerp and the additions of a product may be contracted to FMAs there, as here):
// g *= scale (clipping, when scaled); p *= 1 - lr wd; m = lerp(m, g, 1 - beta1); v = v beta2 + g g (1 - beta2);
// p += (m (-lr / bc1)) / (sqrt(v) (1 / sqrt(bc2)) + eps).
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, long long n, float scale, int scaled,
                                     float decay, float w1, float beta2, float omb2, float step, float inv_bc2_sqrt,
                                     float eps) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gi = g[i];
  if (scaled) gi = __fmul_rn(gi, scale);
  float pi = __fmul_rn(p[i], decay);
  float mi = m[i];
  float d = __fsub_rn(gi, mi);
  mi = w1 < 0.5f ? __fmaf_rn(w1, d, mi) : __fmaf_rn(-d, __fsub_rn(1.0f, w1), gi);
  float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), omb2));
  float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bc2_sqrt), eps);
  p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(mi, step), denom));
  m[i] = mi;
  v[i] = vi;
}
// acc (f32) = or += g (bf16), exactly as libtorch's cast-copy and add (bf16 -> f32 is exact; one f32
// rounding per add), 8 elements per thread with 16-byte accesses (acc and g 16-byte aligned; the host
// checks), the tail one by one.
extern "C" __global__ void accumulate_bf16_vec8(float* acc, const bf16_t* g, long long n, int add) {
  long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (base >= n) return;
  if (base + 8 <= n) {
    uint4 gv = *reinterpret_cast<const uint4*>(g + base);
    unsigned w[4] = {gv.x, gv.y, gv.z, gv.w};
    float f[8];
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
    float4* a = reinterpret_cast<float4*>(acc + base);
    float4 a0, a1;
    if (add) {
      a0 = a[0];
      a1 = a[1];
      a0.x = __fadd_rn(a0.x, f[0]); a0.y = __fadd_rn(a0.y, f[1]); a0.z = __fadd_rn(a0.z, f[2]); a0.w = __fadd_rn(a0.w, f[3]);
      a1.x = __fadd_rn(a1.x, f[4]); a1.y = __fadd_rn(a1.y, f[5]); a1.z = __fadd_rn(a1.z, f[6]); a1.w = __fadd_rn(a1.w, f[7]);
    } else {
      a0 = make_float4(f[0], f[1], f[2], f[3]);
      a1 = make_float4(f[4], f[5], f[6], f[7]);
    }
    a[0] = a0;
    a[1] = a1;
  } else {
    for (long long k = base; k < n; ++k) acc[k] = add ? __fadd_rn(acc[k], ld(g, k)) : ld(g, k);
  }
}
extern "C" __global__ void accumulate_bf16(float* acc, const bf16_t* g, long long n, int add) {
  long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (k < n) acc[k] = add ? __fadd_rn(acc[k], ld(g, k)) : ld(g, k);
}
// Cross-entropy per row of logits (N, V) without f32 copies of them: one block per row. Forward: an
// online max / sum of exponentials in f32 (lse = max + log sum exp(x - max)), row loss = lse - x[t];
// backward: dx = (exp(x - lse) - [j == t]) g_row, written in the logits' dtype. A target outside [0, V)
// gives a NaN loss (the trainer's non-finite handling takes it from there).
#define NEG_INF __int_as_float(0xff800000u)
__device__ __forceinline__ void online(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  if (m2 == NEG_INF) return;
  if (m == NEG_INF) { m = m2; s = s2; return; }
  if (m2 > m) { s = s * expf(m - m2) + s2; m = m2; } else { s += s2 * expf(m2 - m); }
}
template <typename T>
__device__ __forceinline__ void ce_fwd(const T* x, const long long* tgt, float* loss, float* lse, long long V) {
  __shared__ float wm[32], ws[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * V;
  float m = NEG_INF, s = 0.0f;
  for (long long j = threadIdx.x; j < V; j += blockDim.x) online(m, s, ld(xr, j));
  for (int o = 16; o > 0; o >>= 1) combine(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  if (lane == 0) { wm[warp] = m; ws[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? wm[lane] : NEG_INF;
    s = lane < warps ? ws[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) combine(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) {
      const float l = m + logf(s);
      const long long t = tgt[row];
      lse[row] = l;
      loss[row] = (t >= 0 && t < V) ? l - ld(xr, t) : __int_as_float(0x7fc00000);
    }
  }
}
template <typename T>
__device__ __forceinline__ void ce_bwd(const T* x, const long long* tgt, const float* lse, const float* g, T* gx, long long V) {
  const long long row = blockIdx.x;
  const T* xr = x + row * V;
  T* gr = gx + row * V;
  const float l = lse[row], gs = g[row];
  const long long t = tgt[row];
  for (long long j = threadIdx.x; j < V; j += blockDim.x) {
    float p = expf(ld(xr, j) - l);
    if (j == t) p -= 1.0f;
    st(gr, j, p * gs);
  }
}
extern "C" __global__ void ce_fwd_bf16(const bf16_t* x, const long long* t, float* loss, float* lse, long long V) { ce_fwd<bf16_t>(x, t, loss, lse, V); }
extern "C" __global__ void ce_fwd_f32(const float* x, const long long* t, float* loss, float* lse, long long V) { ce_fwd<float>(x, t, loss, lse, V); }
extern "C" __global__ void ce_bwd_bf16(const bf16_t* x, const long long* t, const float* lse, const float* g, bf16_t* gx, long long V) { ce_bwd<bf16_t>(x, t, lse, g, gx, V); }
extern "C" __global__ void ce_bwd_f32(const float* x, const long long* t, const float* lse, const float* g, float* gx, long long V) { ce_bwd<float>(x, t, lse, g, gx, V); }
// SwiGLU of the MLP, m = a * silu(b), with silu(b) = b / (1 + exp(-b)) rounded to the tensors' dtype before
// the product, as libtorch's two kernels round it. Backward from g: da = g silu(b), and through
// dsilu = g a (rounded) db = dsilu sig (1 + b (1 - sig)), sig = 1 / (1 + exp(-b)), libtorch's silu_backward.
template <typename T>
__device__ __forceinline__ float rnd(float v) { T t; st(&t, 0, v); return ld(&t, 0); }
template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* a, const T* b, T* m, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = ld(b, i);
  const float s = rnd<T>(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))));
  st(m, i, __fmul_rn(ld(a, i), s));
}
template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* g, const T* a, const T* b, T* da, T* db, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = ld(b, i), gi = ld(g, i);
  const float e = __fadd_rn(1.0f, expf(-x));
  const float s = rnd<T>(__fdiv_rn(x, e));
  st(da, i, __fmul_rn(gi, s));
  const float dy = rnd<T>(__fmul_rn(gi, ld(a, i)));
  const float sig = __fdiv_rn(1.0f, e);
  st(db, i, __fmul_rn(__fmul_rn(dy, sig), __fmaf_rn(x, __fsub_rn(1.0f, sig), 1.0f)));
}
// bf16, 8 elements per thread with 16-byte accesses (n a multiple of 8, every pointer 16-byte aligned:
// the host checks), the same arithmetic as above.
__device__ __forceinline__ void load8(const bf16_t* p, long long i, float* f) {
  uint4 v = *reinterpret_cast<const uint4*>(p + i);
  unsigned w[4] = {v.x, v.y, v.z, v.w};
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = __uint_as_float(w[k] << 16);
    f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
__device__ __forceinline__ void store8(bf16_t* p, long long i, const float* f) {
  bf16_t h[8];
  for (int k = 0; k < 8; ++k) st(h, k, f[k]);
  uint4 v;
  v.x = (unsigned)h[0] | ((unsigned)h[1] << 16);
  v.y = (unsigned)h[2] | ((unsigned)h[3] << 16);
  v.z = (unsigned)h[4] | ((unsigned)h[5] << 16);
  v.w = (unsigned)h[6] | ((unsigned)h[7] << 16);
  *reinterpret_cast<uint4*>(p + i) = v;
}
extern "C" __global__ void swiglu_fwd_bf16_vec8(const bf16_t* a, const bf16_t* b, bf16_t* m, long long n) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  float fa[8], fb[8], fm[8];
  load8(a, i, fa);
  load8(b, i, fb);
  for (int k = 0; k < 8; ++k) {
    const float s = rnd<bf16_t>(__fdiv_rn(fb[k], __fadd_rn(1.0f, expf(-fb[k]))));
    fm[k] = __fmul_rn(fa[k], s);
  }
  store8(m, i, fm);
}
extern "C" __global__ void swiglu_bwd_bf16_vec8(const bf16_t* g, const bf16_t* a, const bf16_t* b, bf16_t* da, bf16_t* db,
                                                long long n) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i >= n) return;
  float fg[8], fa[8], fb[8], oa[8], ob[8];
  load8(g, i, fg);
  load8(a, i, fa);
  load8(b, i, fb);
  for (int k = 0; k < 8; ++k) {
    const float x = fb[k];
    const float e = __fadd_rn(1.0f, expf(-x));
    const float s = rnd<bf16_t>(__fdiv_rn(x, e));
    oa[k] = __fmul_rn(fg[k], s);
    const float dy = rnd<bf16_t>(__fmul_rn(fg[k], fa[k]));
    const float sig = __fdiv_rn(1.0f, e);
    ob[k] = __fmul_rn(__fmul_rn(dy, sig), __fmaf_rn(x, __fsub_rn(1.0f, sig), 1.0f));
  }
  store8(da, i, oa);
  store8(db, i, ob);
}
extern "C" __global__ void swiglu_fwd_bf16(const bf16_t* a, const bf16_t* b, bf16_t* m, long long n) { swiglu_fwd<bf16_t>(a, b, m, n); }
extern "C" __global__ void swiglu_fwd_f32(const float* a, const float* b, float* m, long long n) { swiglu_fwd<float>(a, b, m, n); }
extern "C" __global__ void swiglu_bwd_bf16(const bf16_t* g, const bf16_t* a, const bf16_t* b, bf16_t* da, bf16_t* db, long long n) { swiglu_bwd<bf16_t>(g, a, b, da, db, n); }
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* a, const float* b, float* da, float* db, long long n) { swiglu_bwd<float>(g, a, b, da, db, n); }
)CUDA";

template <typename F>
void sym(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (!f) throw std::runtime_error(std::string("symbol ") + name + " not found");
}

void load_nvrtc(const char* path) {
  if (api.nvrtc) return;
  void* lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) throw std::runtime_error(std::string("cannot open ") + path + ": " + dlerror());
  sym(lib, "nvrtcCreateProgram", api.nvrtcCreateProgram);
  sym(lib, "nvrtcCompileProgram", api.nvrtcCompileProgram);
  sym(lib, "nvrtcGetProgramLogSize", api.nvrtcGetProgramLogSize);
  sym(lib, "nvrtcGetProgramLog", api.nvrtcGetProgramLog);
  sym(lib, "nvrtcGetPTXSize", api.nvrtcGetPTXSize);
  sym(lib, "nvrtcGetPTX", api.nvrtcGetPTX);
  sym(lib, "nvrtcDestroyProgram", api.nvrtcDestroyProgram);
  sym(lib, "nvrtcGetErrorString", api.nvrtcGetErrorString);
  api.nvrtc = true;
}

void load_driver() {
  if (api.driver) return;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!lib) throw std::runtime_error(std::string("cannot open libcuda.so.1: ") + dlerror());
  sym(lib, "cuInit", api.cuInit);
  sym(lib, "cuDeviceGet", api.cuDeviceGet);
  sym(lib, "cuDeviceGetAttribute", api.cuDeviceGetAttribute);
  sym(lib, "cuDevicePrimaryCtxRetain", api.cuDevicePrimaryCtxRetain);
  sym(lib, "cuCtxPushCurrent_v2", api.cuCtxPushCurrent);
  sym(lib, "cuCtxPopCurrent_v2", api.cuCtxPopCurrent);
  sym(lib, "cuModuleLoadData", api.cuModuleLoadData);
  sym(lib, "cuModuleGetFunction", api.cuModuleGetFunction);
  sym(lib, "cuLaunchKernel", api.cuLaunchKernel);
  sym(lib, "cuGetErrorString", api.cuGetErrorString);
  api.driver = true;
}

void check_cu(CUresult r, const char* what) {
  if (r == 0) return;
  const char* s = nullptr;
  if (api.cuGetErrorString) api.cuGetErrorString(r, &s);
  throw std::runtime_error(std::string(what) + " failed: " + (s ? s : "CUDA error ") + " (" + std::to_string(r) + ")");
}

// PTX of kSource for compute capability `arch` (e.g. 90).
std::string compile(int arch) {
  nvrtcProgram prog = nullptr;
  nvrtcResult r = api.nvrtcCreateProgram(&prog, kSource, "idavlm_fused.cu", 0, nullptr, nullptr);
  if (r != 0) throw std::runtime_error(std::string("nvrtcCreateProgram: ") + api.nvrtcGetErrorString(r));
  std::string opt_arch = "--gpu-architecture=compute_" + std::to_string(arch);
  const char* opts[] = {opt_arch.c_str(), "--fmad=false", "-default-device"};
  r = api.nvrtcCompileProgram(prog, 3, opts);
  size_t log_size = 0;
  api.nvrtcGetProgramLogSize(prog, &log_size);
  std::string log(log_size, '\0');
  if (log_size > 1) api.nvrtcGetProgramLog(prog, &log[0]);
  if (r != 0) {
    api.nvrtcDestroyProgram(&prog);
    throw std::runtime_error(std::string("NVRTC compile of the fused kernels failed: ") + api.nvrtcGetErrorString(r) + "\n" + log);
  }
  size_t n = 0;
  api.nvrtcGetPTXSize(prog, &n);
  std::string ptx(n, '\0');
  api.nvrtcGetPTX(prog, &ptx[0]);
  api.nvrtcDestroyProgram(&prog);
  return ptx;
}

struct Kernels {
  CUcontext ctx = nullptr;
  CUfunction rope_bf16 = nullptr;
  CUfunction rope_f32 = nullptr;
  CUfunction adamw_f32 = nullptr;
  CUfunction accumulate_bf16_vec8 = nullptr;
  CUfunction accumulate_bf16 = nullptr;
  CUfunction ce_fwd_bf16 = nullptr, ce_fwd_f32 = nullptr, ce_bwd_bf16 = nullptr, ce_bwd_f32 = nullptr;
  CUfunction swiglu_fwd_bf16 = nullptr, swiglu_fwd_f32 = nullptr, swiglu_bwd_bf16 = nullptr, swiglu_bwd_f32 = nullptr;
  CUfunction swiglu_fwd_bf16_vec8 = nullptr, swiglu_bwd_bf16_vec8 = nullptr;
  // Every kernel of kSource with its name (looked up after loading; checked in the PTX by the build test).
  std::vector<std::pair<CUfunction*, const char*>> table() {
    return {{&rope_bf16, "rope_bf16"},
            {&rope_f32, "rope_f32"},
            {&adamw_f32, "adamw_f32"},
            {&accumulate_bf16_vec8, "accumulate_bf16_vec8"},
            {&accumulate_bf16, "accumulate_bf16"},
            {&ce_fwd_bf16, "ce_fwd_bf16"},
            {&ce_fwd_f32, "ce_fwd_f32"},
            {&ce_bwd_bf16, "ce_bwd_bf16"},
            {&ce_bwd_f32, "ce_bwd_f32"},
            {&swiglu_fwd_bf16, "swiglu_fwd_bf16"},
            {&swiglu_fwd_f32, "swiglu_fwd_f32"},
            {&swiglu_bwd_bf16, "swiglu_bwd_bf16"},
            {&swiglu_bwd_f32, "swiglu_bwd_f32"},
            {&swiglu_fwd_bf16_vec8, "swiglu_fwd_bf16_vec8"},
            {&swiglu_bwd_bf16_vec8, "swiglu_bwd_bf16_vec8"}};
  }
};
std::map<int, Kernels> per_device;

// The device's kernels (compiled and loaded on first use), its primary context made current by the caller.
const Kernels& kernels(int ordinal) {
  std::lock_guard<std::mutex> g(mu);
  auto it = per_device.find(ordinal);
  if (it != per_device.end()) return it->second;
  if (!api.nvrtc) throw std::runtime_error("fused kernels used before idavlm_fused_setup");
  load_driver();
  check_cu(api.cuInit(0), "cuInit");
  CUdevice dev = 0;
  check_cu(api.cuDeviceGet(&dev, ordinal), "cuDeviceGet");
  int major = 0, minor = 0;
  check_cu(api.cuDeviceGetAttribute(&major, kAttrCcMajor, dev), "cuDeviceGetAttribute");
  check_cu(api.cuDeviceGetAttribute(&minor, kAttrCcMinor, dev), "cuDeviceGetAttribute");
  std::string ptx = compile(major * 10 + minor);
  Kernels k;
  check_cu(api.cuDevicePrimaryCtxRetain(&k.ctx, dev), "cuDevicePrimaryCtxRetain");
  check_cu(api.cuCtxPushCurrent(k.ctx), "cuCtxPushCurrent");
  CUmodule module = nullptr;
  CUresult r = api.cuModuleLoadData(&module, ptx.c_str());
  for (const auto& e : k.table())
    if (r == 0) r = api.cuModuleGetFunction(e.first, module, e.second);
  CUcontext popped = nullptr;
  api.cuCtxPopCurrent(&popped);
  check_cu(r, "loading the fused kernels");
  return per_device.emplace(ordinal, k).first->second;
}

// Launches `f` as `blocks` blocks of `threads` on the device's legacy default stream (libtorch's stream).
void launch_grid(const Kernels& k, CUfunction f, long long blocks, unsigned threads, void** args, const char* what) {
  check_cu(api.cuCtxPushCurrent(k.ctx), "cuCtxPushCurrent");
  CUresult r = api.cuLaunchKernel(f, (unsigned)blocks, 1, 1, threads, 1, 1, 0, nullptr, args, nullptr);
  CUcontext popped = nullptr;
  api.cuCtxPopCurrent(&popped);
  check_cu(r, what);
}

// Launches `f` with one thread per item (n items), in blocks of 256.
void launch(const Kernels& k, CUfunction f, long long n, void** args, const char* what) {
  launch_grid(k, f, (n + 255) / 256, 256, args, what);
}

// y = RoPE(x) (backward = false) or the transposed rotation of a gradient (backward = true); x (B, S, H, Dh)
// bf16 or f32 with unit last stride, tables f32 (S, Dh) or (B, S, Dh). Returns y: a new contiguous tensor,
// or `into` (x's shape and dtype, unit last stride; x itself for an in-place rotation: each thread reads
// its pair of every head before writing it, and no other thread touches them).
at::Tensor rope_launch(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward,
                       const at::Tensor* into = nullptr) {
  if (!x_in.is_cuda() || x_in.dim() != 4) throw std::runtime_error("fused rope takes a CUDA (B, S, H, Dh) tensor");
  at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (!bf16 && x.scalar_type() != at::kFloat) throw std::runtime_error("fused rope takes bf16 or f32");
  at::Tensor cs = cos_in.to(x.device(), at::kFloat).contiguous();
  at::Tensor sn = sin_in.to(x.device(), at::kFloat).contiguous();
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  if (D % 2 != 0) throw std::runtime_error("fused rope needs an even head dim");
  const bool per_row = cs.dim() == 3;
  if ((per_row && (cs.size(0) != B || cs.size(1) != S || cs.size(2) != D)) || (!per_row && (cs.dim() != 2 || cs.size(0) != S || cs.size(1) != D)) ||
      !sn.sizes().equals(cs.sizes()))
    throw std::runtime_error("fused rope: tables do not match x");
  if (into && (!into->sizes().equals(x.sizes()) || into->scalar_type() != x.scalar_type() || into->stride(3) != 1 ||
               into->device() != x.device()))
    throw std::runtime_error("fused rope: the output must match x, with unit last stride");
  at::Tensor y = into ? *into : at::empty({B, S, H, D}, x.options());
  long long n = B * S * (D / 2);  // threads: one per (row, position, pair slot), each over all heads
  if (n == 0) return y;
  const Kernels& k = kernels(x.device().index());
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  const void* cp = cs.data_ptr();
  const void* sp = sn.data_ptr();
  int half = (int)(D / 2), heads = (int)H, seq = (int)S, bw = backward ? 1 : 0;
  long long sb = x.stride(0), ss = x.stride(1), sh = x.stride(2), tb = per_row ? S * D : 0;
  long long ysb = y.stride(0), yss = y.stride(1), ysh = y.stride(2);
  void* args[] = {&xp, &yp, &cp, &sp, &n, &half, &heads, &seq, &sb, &ss, &sh, &tb, &bw, &ysb, &yss, &ysh};
  launch(k, bf16 ? k.rope_bf16 : k.rope_f32, n, args, "launching the fused rope kernel");
  return y;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rope_launch(x, cos, sin, false);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto saved = ctx->get_saved_variables();
    return {rope_launch(grad[0], saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

// logits (N, V) contiguous bf16/f32 CUDA, targets (N,) int64 -> (row losses (N,) f32, lse (N,) f32).
std::pair<at::Tensor, at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& target) {
  if (!logits.is_cuda() || logits.dim() != 2 || !logits.is_contiguous())
    throw std::runtime_error("fused cross-entropy takes contiguous CUDA logits (N, V)");
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  if (!bf16 && logits.scalar_type() != at::kFloat) throw std::runtime_error("fused cross-entropy takes bf16 or f32 logits");
  at::Tensor t = target.to(logits.device(), at::kLong).contiguous();
  if (t.dim() != 1 || t.size(0) != logits.size(0)) throw std::runtime_error("fused cross-entropy: one target per row");
  const long long rows = logits.size(0);
  long long V = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  const Kernels& k = kernels(logits.device().index());
  const void* xp = logits.data_ptr();
  const void* tp = t.data_ptr();
  void* lp = loss.data_ptr();
  void* sp = lse.data_ptr();
  void* args[] = {&xp, &tp, &lp, &sp, &V};
  launch_grid(k, bf16 ? k.ce_fwd_bf16 : k.ce_fwd_f32, rows, 1024, args, "launching the fused cross-entropy");
  return {loss, lse};
}

at::Tensor ce_backward(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& grad_rows) {
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  at::Tensor t = target.to(logits.device(), at::kLong).contiguous();
  at::Tensor g = grad_rows.to(logits.device(), at::kFloat).contiguous();
  at::Tensor gx = at::empty_like(logits);
  const long long rows = logits.size(0);
  long long V = logits.size(1);
  if (rows == 0) return gx;
  const Kernels& k = kernels(logits.device().index());
  const void* xp = logits.data_ptr();
  const void* tp = t.data_ptr();
  const void* sp = lse.data_ptr();
  const void* gp = g.data_ptr();
  void* op = gx.data_ptr();
  void* args[] = {&xp, &tp, &sp, &gp, &op, &V};
  launch_grid(k, bf16 ? k.ce_bwd_bf16 : k.ce_bwd_f32, rows, 1024, args, "launching the fused cross-entropy backward");
  return gx;
}

struct CrossEntropyFn : public torch::autograd::Function<CrossEntropyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target) {
    auto r = ce_forward(logits, target);
    ctx->save_for_backward({logits, target, r.second});
    return r.first;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto s = ctx->get_saved_variables();
    return {ce_backward(s[0], s[1], s[2], grad[0]), at::Tensor()};
  }
};

// a and b: the MLP's two projections, same shape, contiguous, bf16 or f32 on one CUDA device.
void check_swiglu_pair(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cuda() || !a.is_contiguous() || !b.is_contiguous() || !a.sizes().equals(b.sizes()) ||
      a.scalar_type() != b.scalar_type() || a.device() != b.device() ||
      (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kFloat))
    throw std::runtime_error("fused SwiGLU takes two contiguous bf16 or f32 CUDA tensors of one shape");
}

// Whether the 8-wide bf16 kernels apply: bf16, n a multiple of 8, every pointer 16-byte aligned.
bool vec8(std::initializer_list<const void*> ptrs, const at::Tensor& a, long long n) {
  if (a.scalar_type() != at::kBFloat16 || n % 8 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// m = a * silu(b) (a, b contiguous after the call's copies, checked).
at::Tensor swiglu_forward(const at::Tensor& a_in, const at::Tensor& b_in) {
  at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  check_swiglu_pair(a, b);
  at::Tensor m = at::empty_like(a);
  long long n = a.numel();
  if (n == 0) return m;
  const Kernels& k = kernels(a.device().index());
  const void* ap = a.data_ptr();
  const void* bp = b.data_ptr();
  void* mp = m.data_ptr();
  void* args[] = {&ap, &bp, &mp, &n};
  if (vec8({ap, bp, mp}, a, n))
    launch(k, k.swiglu_fwd_bf16_vec8, n / 8, args, "launching the fused SwiGLU");
  else
    launch(k, a.scalar_type() == at::kBFloat16 ? k.swiglu_fwd_bf16 : k.swiglu_fwd_f32, n, args, "launching the fused SwiGLU");
  return m;
}

// (da, db) of m = a * silu(b) for the gradient g at m.
std::pair<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& g_in, const at::Tensor& a, const at::Tensor& b) {
  check_swiglu_pair(a, b);
  at::Tensor g = g_in.to(a.scalar_type()).contiguous();
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  long long n = a.numel();
  if (n == 0) return {da, db};
  const Kernels& k = kernels(a.device().index());
  const void* gp = g.data_ptr();
  const void* ap = a.data_ptr();
  const void* bp = b.data_ptr();
  void* dap = da.data_ptr();
  void* dbp = db.data_ptr();
  void* args[] = {&gp, &ap, &bp, &dap, &dbp, &n};
  if (vec8({gp, ap, bp, dap, dbp}, a, n))
    launch(k, k.swiglu_bwd_bf16_vec8, n / 8, args, "launching the fused SwiGLU backward");
  else
    launch(k, a.scalar_type() == at::kBFloat16 ? k.swiglu_bwd_bf16 : k.swiglu_bwd_f32, n, args,
           "launching the fused SwiGLU backward");
  return {da, db};
}

struct SwiGluFn : public torch::autograd::Function<SwiGluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a_in, const at::Tensor& b_in) {
    at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    ctx->save_for_backward({a, b});
    return swiglu_forward(a, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto saved = ctx->get_saved_variables();
    auto d = swiglu_backward(grad[0], saved[0], saved[1]);
    return {d.first, d.second};
  }
};

}  // namespace

using idavlm::guarded;

// For the explicit LLM block (block.cpp); see fused.h.
namespace idavlm {
void rope_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, const at::Tensor& y) {
  rope_launch(x, cos, sin, backward, &y);
}
at::Tensor swiglu(const at::Tensor& a, const at::Tensor& b) { return swiglu_forward(a, b); }
std::pair<at::Tensor, at::Tensor> swiglu_grad(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  return swiglu_backward(g, a, b);
}
}  // namespace idavlm

extern "C" {

// Opens libnvrtc at `nvrtc_path` (once). Returns null or a message.
char* idavlm_fused_setup(const char* nvrtc_path) {
  return guarded("opening libnvrtc", [&] {
    std::lock_guard<std::mutex> g(mu);
    load_nvrtc(nvrtc_path);
  });
}

// Compiles the kernels' source for compute capability `arch` without a GPU (a build check). Null or a message.
char* idavlm_fused_compile_check(const char* nvrtc_path, int arch) {
  return guarded("compiling the fused kernels", [&] {
    std::lock_guard<std::mutex> g(mu);
    load_nvrtc(nvrtc_path);
    std::string ptx = compile(arch);
    Kernels names;
    for (const auto& e : names.table())
      if (ptx.find(e.second) == std::string::npos) throw std::runtime_error(std::string("PTX lacks ") + e.second);
  });
}

// One AdamW step in place over contiguous f32 CUDA partitions p, g, m, v of equal length (g unchanged).
// The scalars come computed (optim.rs, AdamW::update_scaled); scaled = 0 skips the gradient's scaling.
char* idavlm_adamw(const at::Tensor* p, const at::Tensor* g, const at::Tensor* m, const at::Tensor* v, float scale,
                   int scaled, float decay, float w1, float beta2, float omb2, float step, float inv_bc2_sqrt, float eps) {
  return guarded("the fused AdamW", [&] {
    for (const at::Tensor* x : {p, g, m, v}) {
      if (!x->is_cuda() || x->scalar_type() != at::kFloat || !x->is_contiguous() || x->numel() != p->numel() ||
          x->device() != p->device())
        throw std::runtime_error("fused AdamW takes contiguous f32 tensors of one length on one CUDA device");
    }
    long long n = p->numel();
    if (n == 0) return;
    const Kernels& k = kernels(p->device().index());
    void* pp = p->data_ptr();
    void* gp = g->data_ptr();
    void* mp = m->data_ptr();
    void* vp = v->data_ptr();
    void* args[] = {&pp, &gp, &mp, &vp, &n, &scale, &scaled, &decay, &w1, &beta2, &omb2, &step, &inv_bc2_sqrt, &eps};
    launch(k, k.adamw_f32, n, args, "launching the fused AdamW kernel");
  });
}

// acc (contiguous f32 CUDA) = g (add = 0) or += g (add = 1), g contiguous bf16 of acc's length on its device.
char* idavlm_accumulate(const at::Tensor* acc, const at::Tensor* g, int add) {
  return guarded("the fused gradient accumulation", [&] {
    if (!acc->is_cuda() || acc->scalar_type() != at::kFloat || !acc->is_contiguous() || g->scalar_type() != at::kBFloat16 ||
        !g->is_contiguous() || g->numel() != acc->numel() || g->device() != acc->device())
      throw std::runtime_error("fused accumulate takes a contiguous f32 CUDA tensor and a contiguous bf16 one of its length");
    long long n = acc->numel();
    if (n == 0) return;
    const Kernels& k = kernels(acc->device().index());
    void* ap = acc->data_ptr();
    const void* gp = g->data_ptr();
    void* args[] = {&ap, &gp, &n, &add};
    const bool aligned = (reinterpret_cast<uintptr_t>(ap) % 16 == 0) && (reinterpret_cast<uintptr_t>(gp) % 16 == 0);
    if (aligned)
      launch(k, k.accumulate_bf16_vec8, (n + 7) / 8, args, "launching the fused accumulate kernel");
    else
      launch(k, k.accumulate_bf16, n, args, "launching the fused accumulate kernel");
  });
}

// Row losses (N,) f32 of cross-entropy over logits (N, V) with int64 targets (N,), differentiable in the
// logits (see the kernels). On success stores a new tensor in *out and returns null.
char* idavlm_cross_entropy_rows(const at::Tensor* logits, const at::Tensor* target, at::Tensor** out) {
  return guarded("the fused cross-entropy", [&] { *out = new at::Tensor(CrossEntropyFn::apply(*logits, *target)); });
}

// m = a * silu(b) through the fused kernels, differentiable in a and b. On success stores a new tensor in
// *out and returns null.
char* idavlm_swiglu(const at::Tensor* a, const at::Tensor* b, at::Tensor** out) {
  return guarded("the fused SwiGLU", [&] { *out = new at::Tensor(SwiGluFn::apply(*a, *b)); });
}

// RoPE through the fused kernels, differentiable (see the top of this file). On success stores a new
// tensor in *out and returns null.
char* idavlm_rope(const at::Tensor* x, const at::Tensor* cos, const at::Tensor* sin, at::Tensor** out) {
  return guarded("the fused rope", [&] { *out = new at::Tensor(RopeFn::apply(*x, *cos, *sin)); });
}


// A CPU tensor's copy on CUDA device `device` without a device synchronisation: staged through pinned
// memory (libtorch's caching host allocator keeps the staging block until the copy has run) and copied
// with non_blocking. A copy from pageable memory would first wait for everything queued on the stream.
char* idavlm_upload(const at::Tensor* cpu, int device, at::Tensor** out) {
  return guarded("the pinned upload", [&] {
    *out = new at::Tensor(cpu->contiguous().pin_memory().to(at::Device(at::kCUDA, device), /*non_blocking=*/true));
  });
}

}
