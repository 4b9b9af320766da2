#!/usr/bin/env python3
"""Sums an `ncu --csv --print-units base --metrics gpu__time_duration.sum` log by kernel class.

Usage: op-classes.py NCU.csv [OUT.json]. Classes come from kernel names (first rule that matches):
attention (flash/fmha), GEMM (cuBLAS/CUTLASS/nvjet), comm (NCCL), norm (layer/RMS norm),
softmax/CE (incl. the fused cross-entropy), copies/fills (in traces), and elementwise (the rest: pointwise, copies, casts, reductions, the optimizer's ops).
"""
import csv
import json
import re
import sys

RULES = [
    ("attention", r"flash|fmha|attention|sdpa"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|cublas|gemv|splitk"),
    ("comm", r"nccl"),
    ("norm", r"layer_norm|rms_norm|rmsnorm|norm_kernel"),
    ("softmax/CE", r"softmax|nll_loss|cross_entropy|ce_fwd|ce_bwd"),
    ("memcpy/memset", r"^memcpy|^memset"),
    ("elementwise", r""),
]


def classify(name):
    low = name.lower()
    for cls, pat in RULES:
        if re.search(pat, low):
            return cls
    return "elementwise"


def main():
    path = sys.argv[1]
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints its own notes before the table
    rows = list(csv.DictReader(lines))
    by_cls, top = {}, {}
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", ""))
        cls = classify(r["Kernel Name"])
        s = by_cls.setdefault(cls, [0.0, 0])
        s[0] += ns
        s[1] += 1
        k = (cls, r["Kernel Name"][:90])
        top[k] = top.get(k, 0.0) + ns
    total = sum(v[0] for v in by_cls.values()) or 1.0
    print(f"{'class':<12} {'kernels':>8} {'ms':>10} {'share':>7}")
    for cls, (ns, n) in sorted(by_cls.items(), key=lambda kv: -kv[1][0]):
        print(f"{cls:<12} {n:>8} {ns / 1e6:>10.2f} {100 * ns / total:>6.1f}%")
    print(f"{'total':<12} {sum(v[1] for v in by_cls.values()):>8} {total / 1e6:>10.2f}")
    print("\nlargest kernels:")
    for (cls, name), ns in sorted(top.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {ns / 1e6:9.2f} ms  {cls:<11} {name}")
    if len(sys.argv) > 2:
        out = {cls: {"ms": ns / 1e6, "kernels": n, "share": ns / total} for cls, (ns, n) in by_cls.items()}
        json.dump(out, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
