#!/usr/bin/env bash
# The README's main job: synthetic ID data -> 2 CPU ranks train the tiny model (stage-2 setting,
# ZeRO-2, ID-Former on) -> the checkpoint. Run through `make demo`, which sets up and builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug
if [ ! -f runs/demo/data/heldout/index.json ]; then
  echo "== generating the synthetic ID dataset into runs/demo/data"
  rm -rf runs/demo/data
  $BIN/idavlm-shards synth runs/demo/data
fi
$BIN/idavlm-shards inspect runs/demo/data/id
echo "== training: 2 ranks on this machine (idavlm-launch --nproc-per-node 2 recipes/demo.yaml)"
rm -rf runs/demo/ckpt runs/demo/metrics.jsonl runs/demo/preds.jsonl.partial
$BIN/idavlm-launch --nproc-per-node 2 recipes/demo.yaml --resume none
last=$(ls -d runs/demo/ckpt/step-* | sort | tail -1)
echo "== held-out evaluation of $last on the synthetic MM-ID split (matching chance: 0.25)"
$BIN/idavlm-infer --checkpoint "$last" --bench runs/demo/data/eval/mmid.json --out runs/demo/preds.jsonl --max-new-tokens 32 --limit 80  # the matching and location items (scored here)
echo "== done: metrics in runs/demo/metrics.jsonl, loss curve in runs/demo/loss.svg, checkpoints in runs/demo/ckpt"
