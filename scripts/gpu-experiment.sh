#!/usr/bin/env bash
# Runs on a GPU machine from the repo root with the bundle in .carry (make gpu-bundle, plus
# .carry/qwen.tiktoken and .carry/fsdp2_qwenvl.py). Usage:
#   bash scripts/gpu-experiment.sh check            # devices, tiny model: 2 GPUs x ZeRO-1/2/3 vs 1 GPU, resume on 2 GPUs
#   bash scripts/gpu-experiment.sh w1 LAYERS [ZERO...]   # W1 (LAYERS LLM layers) for idavlm and the FSDP2 peer, same call
# Logs and a table go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
source .carry/gpu-env.sh
export IDAVLM_TOKENIZER=$PWD/.carry/qwen.tiktoken RUST_LOG=${RUST_LOG:-info}
ngpu=$(nvidia-smi -L | wc -l)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "machine: $ngpu x $gpu" | tee "$OUT/machine.txt"

bench_ours() { # world layers zero
  local w=$1 layers=$2 zero=$3 port=$((29600 + RANDOM % 1000)) pids=()
  for ((r = 0; r < w; r++)); do
    RANK=$r WORLD_SIZE=$w LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      idavlm-worker bench --layers "$layers" --zero "$zero" --steps 3 >"$OUT/ours-w$w-l$layers-z$zero.r$r.json" 2>"$OUT/ours-w$w-l$layers-z$zero.r$r.log" &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  tail -3 "$OUT/ours-w$w-l$layers-z$zero.r0.log"
  cat "$OUT/ours-w$w-l$layers-z$zero.r0.json"
  return $rc
}

bench_peer() { # world layers zero
  local w=$1 layers=$2 zero=$3 flag=""
  [ "$zero" = 2 ] && flag=--zero2
  torchrun --nproc-per-node "$w" --master-port $((30600 + RANDOM % 1000)) .carry/fsdp2_qwenvl.py --layers "$layers" $flag --steps 3 \
    >"$OUT/peer-w$w-l$layers-z$zero.json" 2>"$OUT/peer-w$w-l$layers-z$zero.log"
  local rc=$?
  tail -1 "$OUT/peer-w$w-l$layers-z$zero.json"
  return $rc
}

case "${1:-check}" in
check)
  idavlm-worker info --size 8192 2>&1 | tee "$OUT/info.txt"
  data=/tmp/idavlm-data
  idavlm-shards synth $data --id-samples 240 --general-samples 40 --eval-per-type 2 >/dev/null 2>&1
  mk() { # name stage accum steps
    sed -e "s|runs/demo/data|$data|g" -e "s|runs/demo/ckpt|/tmp/ck-$1|" -e "s|runs/demo/metrics.jsonl|$OUT/m-$1.jsonl|" \
      -e "s|  stage: 2|  stage: $2|" -e "s|  accum: 2|  accum: $3|" -e "s|  steps: 100|  steps: $4|" \
      -e "s|  every_steps: 50|  every_steps: 3|" -e "s|  inject_probability: 0.1|  inject_probability: 0.0|" \
      -e "s|plot: .*|plot: null|" recipes/demo.yaml >/tmp/r-$1.yaml
    echo /tmp/r-$1.yaml
  }
  idavlm-launch --nproc-per-node 1 "$(mk g1 2 4 6)" --resume none >"$OUT/g1.log" 2>&1; echo "1 GPU rc=$?"
  for z in 1 2 3; do
    idavlm-launch --nproc-per-node 2 "$(mk g2z$z $z 2 6)" --resume none >"$OUT/g2z$z.log" 2>&1; echo "2 GPUs ZeRO-$z rc=$?"
  done
  # Resume on 2 GPUs: stop at step 3 (checkpoint), continue to 6, compare with the straight run.
  r=$(mk res 3 2 3); idavlm-launch --nproc-per-node 2 "$r" --resume none >"$OUT/res-a.log" 2>&1
  sed -i "s|  steps: 3|  steps: 6|" "$r"; idavlm-launch --nproc-per-node 2 "$r" --resume auto >"$OUT/res-b.log" 2>&1; echo "resume rc=$?"
  python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def losses(n):
    p = os.path.join(out, f"m-{n}.jsonl")
    return [json.loads(l)["loss"] for l in open(p)] if os.path.exists(p) else []
ref = losses("g1")
print("1 GPU (accum 4):      ", " ".join(f"{x:.5f}" for x in ref))
for n in ["g2z1", "g2z2", "g2z3", "res"]:
    l = losses(n)
    rel = max((abs(a - b) / abs(b) for a, b in zip(l, ref)), default=float("nan"))
    print(f"{n:22s}", " ".join(f"{x:.5f}" for x in l), f"  max rel diff vs 1 GPU {rel:.2e}")
PY
  ;;
w1)
  layers=${2:-32}; shift 2 || true
  zs=${*:-"2 3"}
  for z in $zs; do
    echo "== idavlm ZeRO-$z, $ngpu GPUs, $layers layers"; bench_ours "$ngpu" "$layers" "$z"
    echo "== peer FSDP2 (ZeRO-$z-like)"; bench_peer "$ngpu" "$layers" "$z"
  done
  ;;
esac
