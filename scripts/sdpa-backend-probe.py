# Which attention kernels libtorch's scaled_dot_product_attention runs on this GPU (causal, bf16,
# 2 x 32 heads x 2048 x 128, forward + backward), with their device time: run on a GPU machine with
# `python3 scripts/sdpa-backend-probe.py`. On an H200 with torch 2.11 it lists cuDNN's sm90 kernels
# (docs/bench/2026-11-29-explicit-block-h200/), which is why the explicit block uses cuDNN attention.
import torch
from torch.profiler import profile, ProfilerActivity
q,k,v=[torch.randn(2,32,2048,128,device='cuda',dtype=torch.bfloat16,requires_grad=True) for _ in range(3)]
for _ in range(2):
    torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True).sum().backward()
with profile(activities=[ProfilerActivity.CUDA]) as p:
    torch.nn.functional.scaled_dot_product_attention(q,k,v,is_causal=True).sum().backward()
    torch.cuda.synchronize()
for e in p.key_averages():
    if e.device_time_total > 50: print(f"{e.key[:110]:110s} {e.device_time_total/1e3:.3f} ms")
