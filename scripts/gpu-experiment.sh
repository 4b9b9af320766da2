#!/usr/bin/env bash
# Runs on a GPU machine from the repo root with the bundle in .carry (make gpu-bundle, plus
# .carry/qwen.tiktoken and .carry/fsdp2_qwenvl.py). Usage:
#   bash scripts/gpu-experiment.sh check            # devices, `idavlm-worker kernels` (fused paths vs reference),
#                                                   # tiny model: 2 GPUs x ZeRO-1/2/3 vs 1 GPU, resume on 2 GPUs
#                                                   # (PARTS: any of tiny medium all mpi lora packed explicit;
#                                                   # explicit: 20 steps of the 4-layer model, explicit vs autograd block)
#   bash scripts/gpu-experiment.sh w1 LAYERS [ZERO...]   # W1 (LAYERS LLM layers) for idavlm and the FSDP2 peer, same call
#                                                        # (PEER_FLAGS="--ac none --compile": the peer's fastest setting)
#   bash scripts/gpu-experiment.sh ckpt [ZERO...]        # checkpoint stall and write speed, 4-layer model, raw disk speed
#   bash scripts/gpu-experiment.sh lora [LAYERS]         # W1 with LoRA on one GPU (LAYERS LLM layers, default 32)
#   bash scripts/gpu-experiment.sh reduce LAYERS [ZERO]  # zero.reduce_dtype f32 vs bf16 on W1 and W2, with the peer
#   bash scripts/gpu-experiment.sh w2 LAYERS [ZERO...]   # W2 (.carry/w2_lengths.json): ours packed (--pack-tokens
#                                                        # 4096) against the peer's --lengths, same call
#   bash scripts/gpu-experiment.sh opclass LAYERS [ZERO] # one W1 micro-batch step under ncu, kernel time by class
#                                                        # (GEMM, attention, norm, softmax/CE, elementwise, comm)
#   bash scripts/gpu-experiment.sh trace w1|w2 LAYERS [ZERO] # one step as a timeline (libtorch's profiler): kernel time
#                                                        # by phase and class, GPU idle gaps and their host causes
#   bash scripts/gpu-experiment.sh demo-sweep FILE       # the demo's learning curve per design variant (FILE: lines
#                                                        # "NAME [ENV=VALUE ...] --set k=v ..."), all at once on GPU 0, f32, 1 rank
# STEPS: optimizer steps of both benchmarks (default 3, the first a warm-up). OURS_FLAGS: extra flags of `idavlm-worker bench` (e.g. "--ac auto"). Logs and a table go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
source .carry/gpu-env.sh
export IDAVLM_TOKENIZER=$PWD/.carry/qwen.tiktoken RUST_LOG=${RUST_LOG:-info}
ngpu=$(nvidia-smi -L | wc -l)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "machine: $ngpu x $gpu" | tee "$OUT/machine.txt"

# Driver-level memory of every GPU, sampled every 200 ms while a run lasts (the same measure for both
# trainers: total - free, i.e. allocator pools, NCCL buffers and the CUDA context included).
mem_start() { nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$1" 2>/dev/null & MEM_PID=$!; }
mem_stop() { # file label
  kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null
  awk -F', *' -v label="$2" '$2+0 > m {m = $2+0} END {printf "%-34s peak driver memory per GPU: %.1f GiB\n", label, m/1024}' "$1" | tee -a "$OUT/memory.txt"
}

bench_ours() { # world layers zero [alloc-conf]
  local w=$1 layers=$2 zero=$3 alloc=${4:-} port=$((29600 + RANDOM % 1000)) pids=() tag="ours${TAG:-}-w$1-l$2-z$3${4:+-fixed}"
  mem_start "$OUT/$tag.mem"
  for ((r = 0; r < w; r++)); do
    env ${alloc:+PYTORCH_CUDA_ALLOC_CONF=$alloc} RANK=$r WORLD_SIZE=$w LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      idavlm-worker bench --layers "$layers" --zero "$zero" --steps "${STEPS:-3}" ${OURS_FLAGS:-} >"$OUT/$tag.r$r.json" 2>"$OUT/$tag.r$r.log" &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  mem_stop "$OUT/$tag.mem" "idavlm ZeRO-$zero ${alloc:-expandable segments}"
  tail -3 "$OUT/$tag.r0.log"
  cat "$OUT/$tag.r0.json"
  return $rc
}

bench_peer() { # world layers zero
  local w=$1 layers=$2 zero=$3 flag="" tag="peer${TAG:-}-w$1-l$2-z$3"
  [ "$zero" = 2 ] && flag=--zero2
  mem_start "$OUT/$tag.mem"
  # PEER_FLAGS: the peer's settings (its fastest: "--ac none --compile").
  torchrun --nproc-per-node "$w" --master-port $((30600 + RANDOM % 1000)) .carry/fsdp2_qwenvl.py --layers "$layers" $flag ${PEER_FLAGS:-} --steps "${STEPS:-3}" \
    >"$OUT/$tag.json" 2>"$OUT/$tag.log"
  local rc=$?
  mem_stop "$OUT/$tag.mem" "peer FSDP2 ZeRO-$zero-like${TAG:-}"
  tail -1 "$OUT/$tag.json"
  return $rc
}

# check: PARTS (default "tiny medium all mpi") picks the experiments. Outputs are also packed into
# $OUT/check.tar.gz (the device tool returns a few files only).
case "${1:-check}" in
check)
  parts=" ${PARTS:-tiny medium all mpi} "
  has() { [[ "$parts" == *" $1 "* ]]; }
  idavlm-worker info --size 8192 2>&1 | tee "$OUT/info.txt"
  # The block's GPU formulations (fused RMS norm, RoPE kernels) against the reference, bf16 and f32.
  idavlm-worker kernels 2>&1 | tee "$OUT/kernels.txt"
  data=/tmp/idavlm-data
  idavlm-shards synth $data --id-samples 240 --general-samples 40 --eval-per-type 2 >/dev/null 2>&1
  mk() { # name stage accum steps [model-config-json]; a fresh checkpoint folder each time
    rm -rf "/tmp/ck-$1"
    sed -e "s|runs/demo/data|$data|g" -e "s|runs/demo/ckpt|/tmp/ck-$1|" -e "s|runs/demo/metrics.jsonl|$OUT/m-$1.jsonl|" \
      -e "s|  stage: 2|  stage: $2|" -e "s|  accum: 2|  accum: $3|" -e "s|  steps: 100|  steps: $4|" \
      -e "s|  every_steps: 50|  every_steps: 3|" -e "s|  inject_probability: 0.1|  inject_probability: 0.0|" \
      -e "s|plot: .*|plot: null|" ${5:+-e "s|  preset: tiny|  config: $PWD/$5|"} ${5:+-e "s|  lr: 1.0e-3|  lr: 1.0e-5|"} \
      recipes/demo.yaml >/tmp/r-$1.yaml
    echo /tmp/r-$1.yaml
  }
  if has tiny; then
  idavlm-launch --nproc-per-node 1 "$(mk g1 2 4 6)" --resume none >"$OUT/g1.log" 2>&1; echo "1 GPU rc=$?"
  for z in 1 2 3; do
    idavlm-launch --nproc-per-node 2 "$(mk g2z$z $z 2 6)" --resume none >"$OUT/g2z$z.log" 2>&1; echo "2 GPUs ZeRO-$z rc=$?"
  done
  # ZeRO-3 with every block's graph kept: reshard after forward frees and re-gathers (NCCL) each block's
  # and the stem's parameters.
  idavlm-launch --nproc-per-node 2 "$(mk g2z3keep 3 2 6)" --resume none --set activation_checkpointing=none >"$OUT/g2z3keep.log" 2>&1
  echo "2 GPUs ZeRO-3, every block kept rc=$?"
  # Resume on 2 GPUs: stop at step 3 (checkpoint), continue to 6, compare with the straight run.
  r=$(mk res 3 2 3); idavlm-launch --nproc-per-node 2 "$r" --resume none >"$OUT/res-a.log" 2>&1
  sed -i "s|  steps: 3|  steps: 6|" "$r"; idavlm-launch --nproc-per-node 2 "$r" --resume auto >"$OUT/res-b.log" 2>&1; echo "resume rc=$?"
  fi
  # LoRA (r 8, no dropout) on the tiny model: 2 GPUs x ZeRO-2/3 (ZeRO-3 partitions the frozen block
  # weights too) against 1 GPU.
  if has lora; then
  lora=(--set lora.r=8 --set lora.dropout=0.0)
  idavlm-launch --nproc-per-node 1 "$(mk l1 2 4 6)" --resume none "${lora[@]}" >"$OUT/l1.log" 2>&1; echo "LoRA 1 GPU rc=$?"
  for z in 2 3; do
    idavlm-launch --nproc-per-node 2 "$(mk l2z$z $z 2 6)" --resume none "${lora[@]}" >"$OUT/l2z$z.log" 2>&1; echo "LoRA 2 GPUs ZeRO-$z rc=$?"
  done
  fi
  # Packing (issue #15), tiny model in bf16 (varlen flash attention): a window of 4 samples packed into
  # one micro-batch against the same 4 samples padded (token-mean loss both), then real packing (2048
  # tokens, windows of 16) on 2 GPUs under ZeRO-3 against 1 GPU.
  if has packed; then
  pad=(--set batch.micro=4 --set batch.accum=1 --set batch.loss_mean=tokens)
  pk=(--set batch.micro=1 --set batch.accum=1 --set batch.packing.tokens=8192 --set data.pack_window=4)
  idavlm-launch --nproc-per-node 1 "$(mk p1pad 2 1 6)" --resume none "${pad[@]}" >"$OUT/p1pad.log" 2>&1; echo "padded 1 GPU rc=$?"
  idavlm-launch --nproc-per-node 1 "$(mk p1pk 2 1 6)" --resume none "${pk[@]}" >"$OUT/p1pk.log" 2>&1; echo "packed 1 GPU rc=$?"
  real=(--set batch.micro=1 --set batch.packing.tokens=2048 --set data.pack_window=16)
  idavlm-launch --nproc-per-node 1 "$(mk q1 2 2 6)" --resume none "${real[@]}" >"$OUT/q1.log" 2>&1; echo "packed 1 GPU accum 2 rc=$?"
  idavlm-launch --nproc-per-node 2 "$(mk q2z3 3 1 6)" --resume none "${real[@]}" >"$OUT/q2z3.log" 2>&1; echo "packed 2 GPUs ZeRO-3 rc=$?"
  fi
  # Medium: 4 LLM layers at full width (recipes/models/qwen-vl-4layers.json), 1 GPU vs 2 GPUs x ZeRO-1/2/3.
  # No checkpoints here: each would write ~28 GB of optimizer state.
  med=recipes/models/qwen-vl-4layers.json nock=(--set checkpoint.every_steps=0 --set checkpoint.at_end=false)
  if has medium; then
  for z in ${MEDIUM_ZEROS:-1 2 3}; do
    [ -s "$OUT/m-m1.jsonl" ] || { idavlm-launch --nproc-per-node 1 "$(mk m1 2 4 4 $med)" --resume none "${nock[@]}" >"$OUT/m1.log" 2>&1; echo "medium 1 GPU rc=$?"; }
    idavlm-launch --nproc-per-node 2 "$(mk m2z$z $z 2 4 $med)" --resume none "${nock[@]}" >"$OUT/m2z$z.log" 2>&1; echo "medium 2 GPUs ZeRO-$z rc=$?"
  done
  idavlm-launch --nproc-per-node 2 "$(mk m2z3keep 3 2 4 $med)" --resume none "${nock[@]}" --set activation_checkpointing=none \
    >"$OUT/m2z3keep.log" 2>&1
  echo "medium 2 GPUs ZeRO-3, every block kept rc=$?"
  fi
  # The explicit LLM block (csrc/block.cpp) against the autograd block: 20 steps of the 4-layer
  # full-width model on 1 GPU, each way (kernels.explicit_block: false is the autograd block).
  if has explicit; then
  for e in 0 1; do
    eb=$([ "$e" = 1 ] && echo true || echo false)
    idavlm-launch --nproc-per-node 1 "$(mk x$e 2 2 20 $med)" --resume none "${nock[@]}" --set kernels.explicit_block=$eb >"$OUT/x$e.log" 2>&1
    echo "medium 1 GPU, explicit block $e: rc=$?"
  done
  fi
  # Every GPU of the machine: stop at step 3 with a checkpoint, resume to 6 (tiny model, accum 1).
  if has all && [ "$ngpu" -ge 4 ]; then
    r=$(mk all 2 1 3); idavlm-launch --nproc-per-node "$ngpu" "$r" --resume none >"$OUT/all-a.log" 2>&1
    sed -i "s|  steps: 3|  steps: 6|" "$r"; idavlm-launch --nproc-per-node "$ngpu" "$r" --resume auto >"$OUT/all-b.log" 2>&1
    echo "$ngpu GPUs resume rc=$?"; grep -h "resumed from" "$OUT/all-b.log" | tail -1
    # The same 6 steps straight through, for comparison.
    r=$(mk allref 2 1 6); idavlm-launch --nproc-per-node "$ngpu" "$r" --resume none >"$OUT/allref.log" 2>&1
  fi
  # Under mpirun (MPI carries the NCCL unique id when the build has MPI).
  if has mpi; then
  r=$(mk mpi 2 2 3)
  mpirun --allow-run-as-root -np 2 -x PATH -x LD_LIBRARY_PATH -x IDAVLM_TOKENIZER -x NCCL_NVLS_ENABLE \
    -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS idavlm-launch "$r" --resume none >"$OUT/mpi.log" 2>&1
  echo "mpirun 2 GPUs rc=$?"; grep -h "NCCL id broadcast with MPI\|backend=" "$OUT/mpi.log" | head -3
  fi
  python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def losses(n):
    p = os.path.join(out, f"m-{n}.jsonl")
    return [json.loads(l)["loss"] for l in open(p)] if os.path.exists(p) else []
def table(ref_name, names, title):
    ref = losses(ref_name)
    print(f"{title:22s}", " ".join(f"{x:.5f}" for x in ref))
    for n in names:
        l = losses(n)
        rel = max((abs(a - b) / abs(b) for a, b in zip(l, ref)), default=float("nan"))
        print(f"{n:22s}", " ".join(f"{x:.5f}" for x in l), f"  max rel diff {rel:.2e} over {min(len(l), len(ref))} steps")
table("g1", ["g2z1", "g2z2", "g2z3", "g2z3keep", "res", "mpi"], "tiny, 1 GPU (accum 4):")
table("m1", ["m2z1", "m2z2", "m2z3", "m2z3keep"], "medium, 1 GPU:")
table("x0", ["x1"], "medium, autograd block:")
table("l1", ["l2z2", "l2z3"], "LoRA tiny, 1 GPU:")
table("p1pad", ["p1pk"], "padded (4 samples):")
table("q1", ["q2z3"], "packed 1 GPU accum 2:")
if losses("allref"):
    table("allref", ["all"], "all GPUs, straight:")
PY
  tar -czf "$OUT/check.tar.gz" -C "$OUT" --exclude check.tar.gz . 2>/dev/null
  ;;
lora)
  # W1 with LoRA (the original Qwen-VL LoRA script's settings) on GPU 0 alone: speed and driver-level peak.
  layers=${2:-32}
  mem_start "$OUT/lora.mem"
  CUDA_VISIBLE_DEVICES=0 idavlm-worker bench --layers "$layers" --zero 2 --steps 3 --lora >"$OUT/lora-l$layers.json" 2>"$OUT/lora-l$layers.log"
  echo "LoRA W1 rc=$?"
  mem_stop "$OUT/lora.mem" "idavlm LoRA W1 ($layers layers), 1 GPU"
  tail -4 "$OUT/lora-l$layers.log"; cat "$OUT/lora-l$layers.json"
  ;;
ckpt)
  # The 4-layer full-width model (29 GB per checkpoint at world 2) on the demo data, a save every 100 steps:
  # stall per save, background write speed against the disk's raw speed (same call, same folder),
  # and step time while a write runs against step time without one.
  shift || true
  data=/tmp/idavlm-data ck=${CKPT_DIR:-/tmp/idavlm-ckpt} CK_STEPS=${CK_STEPS:-250} CK_EVERY=${CK_EVERY:-120}
  idavlm-shards synth $data --id-samples 480 --general-samples 40 --eval-per-type 2 >/dev/null 2>&1
  mkdir -p "$ck"
  df -h "$ck" | tee "$OUT/disk.txt"
  # Raw sequential write: 8 GiB in 64 MiB blocks, flushed to the disk before dd reports.
  dd if=/dev/zero of="$ck/raw.bin" bs=64M count=128 conv=fdatasync 2>&1 | tail -1 | tee -a "$OUT/disk.txt"
  rm -f "$ck/raw.bin"
  for z in ${*:-2 3}; do
    rm -rf "$ck/z$z"
    sed -e "s|runs/demo/data|$data|g" -e "s|runs/demo/ckpt|$ck/z$z|" -e "s|runs/demo/metrics.jsonl|$OUT/ck-z$z.jsonl|" \
      -e "s|plot: .*|plot: null|" -e "s|  preset: tiny|  config: $PWD/recipes/models/qwen-vl-4layers.json|" \
      recipes/demo.yaml >/tmp/r-ck$z.yaml
    set_ck=(--set zero.stage=$z --set length.steps=$CK_STEPS --set checkpoint.every_steps=$CK_EVERY --set checkpoint.keep=1
      --set checkpoint.at_end=false --set logging.every_steps=1 --set optimizer.lr=1.0e-5)
    echo "== checkpoints, ZeRO-$z, 2 GPUs, 4-layer model"
    idavlm-launch --nproc-per-node 2 /tmp/r-ck$z.yaml --resume none "${set_ck[@]}" >"$OUT/ck-z$z.log" 2>&1
    echo "rc=$?"; grep -h "stalled\|complete:\|checkpoint part" "$OUT/ck-z$z.log" | sed 's/^.*Z //' | tee -a "$OUT/ckpt.txt"
    du -sh "$ck/z$z"/step-* | tee -a "$OUT/ckpt.txt"
    python3 - "$OUT/ck-z$z.log" "$OUT/ck-z$z.jsonl" "$CK_EVERY" <<'PY' | tee -a "$OUT/ckpt.txt"
import json, re, sys
log, metrics = sys.argv[1], sys.argv[2]
steps = {json.loads(l)["step"]: json.loads(l)["step_s"] for l in open(metrics)}
# Steps that ran while a background write was in flight: after a save at step k up to the step whose
# poll reported it complete.
busy, start = set(), None
for line in open(log):
    m = re.search(r"step (\d+) loss", line)
    if m:
        cur = int(m.group(1))
    if "written in the background" in line and "stalled" in line:
        start = cur
    if "complete:" in line and start is not None:
        busy.update(range(start + 1, cur + 1)); start = None
warm = [s for s in steps if s > 3]
on = [steps[s] for s in warm if s in busy]
every = int(sys.argv[3])
off = [steps[s] for s in warm if s not in busy and s % every != 0]
med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")
print(f"steps during a background write: {len(on)}, median {med(on):.3f} s; other steps: {len(off)}, median {med(off):.3f} s; slowdown {100 * (med(on) / med(off) - 1):.1f}%")
PY
    rm -rf "$ck/z$z"
  done
  tar -czf "$OUT/ckpt.tar.gz" -C "$OUT" --exclude ckpt.tar.gz . 2>/dev/null
  ;;
w1)
  layers=${2:-32}; shift 2 || true
  zs=${*:-"2 3"}
  for z in $zs; do
    echo "== idavlm ZeRO-$z, $ngpu GPUs, $layers layers"; bench_ours "$ngpu" "$layers" "$z"
    # FIXED_TOO=1: also ours with libtorch's default (fixed-size) allocator segments, same call.
    if [ "${FIXED_TOO:-0}" = 1 ]; then
      echo "== idavlm ZeRO-$z, fixed segments"; bench_ours "$ngpu" "$layers" "$z" expandable_segments:False
    fi
    [ "${PEER:-1}" = 0 ] && continue  # PEER=0: ours only
    echo "== peer FSDP2 (ZeRO-$z-like)"; bench_peer "$ngpu" "$layers" "$z"
  done
  cat "$OUT/memory.txt"
  tar -czf "$OUT/w1.tar.gz" -C "$OUT" --exclude w1.tar.gz --exclude '*.mem' . 2>/dev/null
  ;;
w2)
  # W2: ours packs the 585 MM-ID-shaped samples into micro-batches of W2_PACK tokens (default 8192, accum
  # 2: ~15 samples per GPU and step, as the peer's 2 x 8; 8192 packs to 97.3%, 4096 x accum 4 to 96.1%);
  # the peer pads each to 2048 (--lengths). Real tokens/s/GPU.
  layers=${2:-32}; shift 2 || true
  zs=${*:-"2 3"}
  for z in $zs; do
    echo "== idavlm ZeRO-$z, W2 packed, $ngpu GPUs, $layers layers"
    TAG=-w2${TAG:-} OURS_FLAGS="--lengths .carry/w2_lengths.json --pack-tokens ${W2_PACK:-8192} --grad-accum ${W2_ACCUM:-2} ${OURS_FLAGS:-}" bench_ours "$ngpu" "$layers" "$z"
    [ "${PEER:-1}" = 0 ] && continue  # PEER=0: ours only (e.g. a second packing budget in the same call)
    echo "== peer FSDP2 (ZeRO-$z-like), W2 padded"
    TAG=-w2${TAG:-} PEER_FLAGS="--lengths .carry/w2_lengths.json ${PEER_FLAGS:-}" bench_peer "$ngpu" "$layers" "$z"
  done
  cat "$OUT/memory.txt"
  ;;
opclass)
  # One W1 step of OPCLASS_ACCUM micro-batches (default 1), ZeRO stage $3 (default 2), on one GPU, its kernels timed by
  # ncu (no cache flush, no clock lock: the GPU's own speed), then summed by class.
  layers=${2:-4}; z=${3:-2}
  export PATH=/usr/local/cuda/bin:$PATH
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + RANDOM % 1000)) \
    ncu --profile-from-start off --metrics gpu__time_duration.sum --cache-control none --clock-control none \
      --csv --print-units base --log-file "$OUT/ncu-l$layers-z$z.csv" \
      idavlm-worker bench --layers "$layers" --zero "$z" --steps "${STEPS:-3}" --grad-accum "${OPCLASS_ACCUM:-1}" --cuda-profiler-step \
      ${OURS_FLAGS:-} >"$OUT/opclass-l$layers-z$z.json" 2>"$OUT/opclass-l$layers-z$z.log"
  echo "rc $?"; tail -4 "$OUT/opclass-l$layers-z$z.log"; cat "$OUT/opclass-l$layers-z$z.json"
  python3 scripts/op-classes.py "$OUT/ncu-l$layers-z$z.csv" "$OUT/opclass-l$layers-z$z.classes.json" | tee "$OUT/opclass-l$layers-z$z.txt"
  tar czf "$OUT/opclass.tar.gz" -C "$OUT" --exclude opclass.tar.gz . 2>/dev/null
  ;;
trace)
  # One W1 or W2 step ($2) at LAYERS ($3) and ZeRO stage $4 (default 2) on one GPU recorded as a timeline by
  # libtorch's profiler (--trace-step), then split into kernel time and idle gaps by scripts/trace-gaps.py.
  what=${2:-w1}; layers=${3:-8}; z=${4:-2}
  flags=""
  [ "$what" = w2 ] && flags="--lengths .carry/w2_lengths.json --pack-tokens ${W2_PACK:-8192} --grad-accum ${W2_ACCUM:-2}"
  tag=trace${TAG:-}-$what-l$layers-z$z
  # shellcheck disable=SC2086
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + RANDOM % 1000)) \
    idavlm-worker bench --layers "$layers" --zero "$z" --steps "${STEPS:-3}" $flags --trace-step "$OUT/$tag" \
      ${OURS_FLAGS:-} >"$OUT/$tag.json" 2>"$OUT/$tag.log"
  echo "rc $?"; tail -4 "$OUT/$tag.log"; cat "$OUT/$tag.json"
  python3 scripts/trace-gaps.py "$OUT/$tag.r0.json" "$OUT/$tag.gaps.json" | tee "$OUT/$tag.txt"
  gzip -f "$OUT/$tag.r0.json"
  ;;
demo-sweep)
  # Each variant trains recipes/demo.yaml (data regenerated here) with its overrides as one f32 rank on
  # GPU 0, accum doubled so that the global batch is the CPU demo's; evaluations as the recipe says.
  # Lines "@data NAME SYNTH-ARGS..." generate runs/sweep/NAME with `idavlm-shards synth SYNTH-ARGS` first
  # (all at once); a variant trains on one with --set data.sources.0.path=runs/sweep/NAME/id. SWEEP_LIMIT:
  # seconds each variant may train (its evaluations so far are kept); SWEEP_INFER=0 skips idavlm-infer on
  # the last checkpoints.
  file=$2
  idavlm-shards synth runs/sweep/data >"$OUT/synth.log" 2>&1 || { cat "$OUT/synth.log"; exit 1; }
  pids=()
  while read -r tag name args; do
    [ "$tag" = "@data" ] || continue
    # shellcheck disable=SC2086
    idavlm-shards synth "runs/sweep/$name" $args >"$OUT/synth-$name.log" 2>&1 &
    pids+=($!)
  done <"$file"
  for p in "${pids[@]}"; do wait "$p" || { cat "$OUT"/synth-*.log; exit 1; }; done
  pids=()
  while read -r name sets; do
    [ -z "$name" ] || [ "${name:0:1}" = "#" ] || [ "$name" = "@data" ] && continue
    mkdir -p "$OUT/$name"
    # Leading KEY=VALUE words of the line are the variant's environment.
    envs=()
    # shellcheck disable=SC2086
    set -- $sets
    while [ $# -gt 0 ] && [[ "$1" == *=* && "$1" != --* ]]; do envs+=("$1"); shift; done
    sets="$*"
    # shellcheck disable=SC2086
    env "${envs[@]}" timeout -s INT "${SWEEP_LIMIT:-3600}" idavlm-launch --nproc-per-node 1 recipes/demo.yaml --resume none --set model.dtype=f32 \
      --set data.sources.0.path=runs/sweep/data/id --set data.general.path=runs/sweep/data/general \
      --set eval.data=runs/sweep/data/heldout --set eval.mmid=runs/sweep/data/eval/mmid.json \
      --set checkpoint.dir=runs/sweep/$name/ckpt --set logging.metrics_file="$OUT/$name/metrics.jsonl" \
      --set logging.plot="$OUT/$name/loss.svg" $sets >"$OUT/$name/log" 2>&1 &
    pids+=($!)
  done <"$file"
  for p in "${pids[@]}"; do wait "$p"; done
  for d in "$OUT"/*/; do
    n=$(basename "$d"); last=$(ls -d runs/sweep/$n/ckpt/step-* 2>/dev/null | sort | tail -1)
    [ -n "$last" ] && [ "${SWEEP_INFER:-1}" = 1 ] && idavlm-infer --checkpoint "$last" --bench runs/sweep/data/eval/mmid.json --out "$d/preds.jsonl" \
      --max-new-tokens 32 --limit 80 >"$d/infer.log" 2>&1
    echo "== $n"; grep -h "eval:" "$d/log" | sed 's/.*report: //'
  done | tee "$OUT/sweep.txt"
  tar czf "$OUT/sweep.tar.gz" -C "$OUT" --exclude sweep.tar.gz . 2>/dev/null
  ;;
reduce)
  # zero.reduce_dtype f32 against bf16 on W1 and W2 (ZeRO stage $3, default 2), each beside the peer's
  # PEER_FLAGS setting, one call.
  layers=${2:-32}; z=${3:-2}
  for wl in w1 w2; do
    ours="" peer=""
    [ "$wl" = w2 ] && ours="--lengths .carry/w2_lengths.json --grad-accum ${W2_ACCUM:-4}" peer="--lengths .carry/w2_lengths.json"
    for rd in f32 bf16; do
      echo "== idavlm ZeRO-$z, $wl, reduce_dtype $rd"
      TAG=-$wl-$rd OURS_FLAGS="$ours --reduce-dtype $rd ${OURS_FLAGS:-}" bench_ours "$ngpu" "$layers" "$z"
    done
    echo "== peer FSDP2 (ZeRO-$z-like), $wl"; TAG=-$wl PEER_FLAGS="$peer ${PEER_FLAGS:-}" bench_peer "$ngpu" "$layers" "$z"
  done
  cat "$OUT/memory.txt"
  ;;
esac
