#!/usr/bin/env python3
"""Where the GPU waits: reads a Chrome trace of `idavlm-worker bench --trace-step FILE` (libtorch's
Kineto profiler) and splits the step's GPU time into busy time (kernels, copies, by class and phase)
and idle gaps, each gap put down to what the host was doing when the kernel after it was launched.

Usage: trace-gaps.py TRACE.json[.gz] [OUT.json]

A gap is a stretch with no kernel, copy or memset on any stream. Causes:
  host-late   the kernel after the gap was launched after the GPU had gone idle: the host was busy
              (the phase and the CPU op around that launch are listed: outermost and innermost);
  host-sync   a synchronising call (stream/device synchronise, a blocking copy) was waiting when the gap
              began: the host waited for the GPU, then had to refill the queue;
  queued      the kernel after the gap had been launched before the gap: a wait on another stream or
              event (communication), or the launch latency of a drained queue.
The profiler adds a little host time to every op, so a traced step is slower than an untraced one;
compare the trace's step with the bench's step times.
"""
import bisect
import gzip
import importlib.util
import json
import os
import re
import sys
from collections import defaultdict

# The kernel classes are op-classes.py's (the ncu split), so both splits name kernels alike.
_spec = importlib.util.spec_from_file_location("op_classes", os.path.join(os.path.dirname(os.path.abspath(__file__)), "op-classes.py"))
_op_classes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_op_classes)
classify = _op_classes.classify

SYNC_CALLS = re.compile(r"Synchronize|cudaMemcpy$|cuMemcpyDtoH|cudaMemcpyAsync|cudaStreamWaitEvent|cuStreamSynchronize")


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


class Spans:
    """Intervals of one thread, with lookup of the outermost and innermost ones around a time."""

    def __init__(self, events):
        self.ev = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.ev]
        # outermost: ops not inside an earlier one
        self.top, end = [], -1.0
        for e in self.ev:
            if e["ts"] >= end:
                self.top.append(e)
                end = e["ts"] + e["dur"]
        self.top_starts = [e["ts"] for e in self.top]

    def outer(self, t):
        i = bisect.bisect_right(self.top_starts, t) - 1
        if i >= 0 and self.top[i]["ts"] + self.top[i]["dur"] >= t:
            return self.top[i]
        return None

    def inner(self, t):
        i = bisect.bisect_right(self.starts, t) - 1
        best = None
        # walk back over a bounded number of candidates (nesting is shallow)
        for j in range(i, max(-1, i - 400), -1):
            e = self.ev[j]
            if e["ts"] + e["dur"] >= t and (best is None or e["dur"] < best["dur"]):
                best = e
        return best


def main():
    path = sys.argv[1]
    ev = [e for e in load(path) if e.get("ph") == "X" and "ts" in e]
    for e in ev:
        e["ts"] = float(e["ts"])
        e["dur"] = float(e.get("dur", 0.0))
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not gpu:
        sys.exit(f"{path}: no GPU activity in the trace (a CPU run, or CUPTI missing)")
    launches = {}
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    by_tid = defaultdict(list)
    for e in ev:
        if e.get("cat") == "cpu_op":
            by_tid[e["tid"]].append(e)
    ops = {tid: Spans(es) for tid, es in by_tid.items()}
    phases = Spans([e for e in ev if e.get("cat") == "user_annotation"])
    syncs = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver") and SYNC_CALLS.search(e["name"])]
    sync_spans = Spans(syncs) if syncs else None

    def phase_of(t):
        p = phases.inner(t) if phases.ev else None
        return p["name"] if p else "outside phases"

    def launch_of(k):
        return launches.get(k.get("args", {}).get("correlation"))

    # Busy time by class and phase (phase: where the kernel was launched).
    busy = defaultdict(float)
    for k in gpu:
        l = launch_of(k)
        cls = "memcpy/memset" if k["cat"] != "kernel" else classify(k["name"])
        busy[(phase_of(l["ts"]) if l else "unknown", cls)] += k["dur"]

    # Gaps in the union of GPU activity.
    gaps, end = [], gpu[0]["ts"]
    for k in gpu:
        if k["ts"] > end:
            gaps.append((end, k["ts"], k))
        end = max(end, k["ts"] + k["dur"])
    t0, t1 = gpu[0]["ts"], end
    idle = defaultdict(float)
    idle_ops = defaultdict(float)
    for g0, g1, k in gaps:
        d = g1 - g0
        l = launch_of(k)
        if l is None:
            idle[("unknown", "no launch record")] += d
            continue
        s = sync_spans.outer(g0) if sync_spans else None
        if s is not None and s["ts"] <= g0 <= s["ts"] + s["dur"]:
            cause = "host-sync"
            where = s
        elif l["ts"] >= g0:
            cause = "host-late"
            where = l
        else:
            cause = "queued"
            where = l
        ph = phase_of(where["ts"])
        idle[(ph, cause)] += d
        if cause != "queued":
            sp = ops.get(where["tid"])
            o = sp.outer(where["ts"]) if sp else None
            i = sp.inner(where["ts"]) if sp else None
            key = (ph, cause, o["name"] if o else "-", i["name"] if i else where["name"])
            idle_ops[key] += d

    span = t1 - t0
    total_busy = sum(busy.values())
    total_idle = sum(idle.values())
    print(f"trace {path}")
    print(f"GPU span {span / 1e3:.1f} ms: busy {total_busy / 1e3:.1f} ms (kernel time, streams may overlap), "
          f"idle {total_idle / 1e3:.1f} ms ({100 * total_idle / span:.1f}%) in {len(gaps)} gaps")
    print("\nkernel time by phase and class (ms):")
    per_phase = defaultdict(float)
    for (ph, _), v in busy.items():
        per_phase[ph] += v
    for ph in sorted(per_phase, key=lambda p: -per_phase[p]):
        parts = sorted(((c, v) for (p, c), v in busy.items() if p == ph), key=lambda cv: -cv[1])
        print(f"  {ph:<22} {per_phase[ph] / 1e3:9.1f}  " + ", ".join(f"{c} {v / 1e3:.1f}" for c, v in parts))
    print("\nidle GPU time by phase and cause (ms):")
    for (ph, cause), v in sorted(idle.items(), key=lambda kv: -kv[1]):
        print(f"  {ph:<22} {cause:<10} {v / 1e3:9.2f}")
    print("\nlargest host causes (phase, cause, outermost op, innermost op at the launch or sync): ms")
    for (ph, cause, o, i), v in sorted(idle_ops.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {v / 1e3:8.2f}  {ph:<20} {cause:<9} {o[:40]:<40} {i[:50]}")
    if len(sys.argv) > 2:
        out = {
            "span_ms": span / 1e3,
            "busy_ms": total_busy / 1e3,
            "idle_ms": total_idle / 1e3,
            "gaps": len(gaps),
            "busy_by_phase_class_ms": {f"{p}/{c}": v / 1e3 for (p, c), v in busy.items()},
            "idle_by_phase_cause_ms": {f"{p}/{c}": v / 1e3 for (p, c), v in idle.items()},
            "idle_by_op_ms": {" | ".join(k): v / 1e3 for k, v in sorted(idle_ops.items(), key=lambda kv: -kv[1])[:100]},
        }
        with open(sys.argv[2], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
