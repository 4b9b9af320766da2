# The stem's attention shapes under libtorch's SDPA backends (bf16, H200): the frozen ViT's self-attention
# (N images x 16 heads x 1024 x 104, forward only), the resampler's pool (N x 32 heads, 256 queries over
# 1024 keys, head dim 128, forward + backward) and the ID-Former (t test images, 1024 queries over R x 256
# keys). For each: steady time per backend, and the first call at a new image count (cuDNN builds a plan
# per shape). Run on a GPU machine: `python3 scripts/stem-attention-probe.py`.
import time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev, dt = "cuda", torch.bfloat16


def qkv(n, h, lq, lk, d, grad):
    mk = lambda l: torch.randn(n, l, h, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(grad)
    return mk(lq), mk(lk), mk(lk)


def run(backend, q, k, v, grad):
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(q, k, v)
        if grad:
            o.backward(torch.ones_like(o))
    return o


def timed(f, reps=10):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


cases = [
    ("vit", lambda n: qkv(n, 16, 1024, 1024, 104, False), False, [8, 29, 31]),
    ("pool", lambda n: qkv(n, 32, 256, 1024, 128, True), True, [8, 17, 19]),
    ("idformer R=3", lambda n: qkv(n, 32, 1024, 3 * 256, 128, True), True, [2, 3, 5]),
]
for name, make, grad, ns in cases:
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        row = []
        try:
            for n in ns:
                q, k, v = make(n)
                torch.cuda.synchronize()
                t = time.perf_counter()
                run(be, q, k, v, grad)
                torch.cuda.synchronize()
                first = (time.perf_counter() - t) * 1e3
                steady = timed(lambda: run(be, q, k, v, grad))
                row.append(f"N={n}: first {first:7.1f} ms, steady {steady:6.2f} ms")
        except RuntimeError as e:
            row.append(f"unsupported: {str(e).splitlines()[0][:80]}")
        print(f"{name:<13} {be.name:<20} " + " | ".join(row), flush=True)
