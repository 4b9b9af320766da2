#!/usr/bin/env bash
# `idavlm-shards build vcr` on a VCR-like release of N records (default 10,000 over N/5 640x360 JPEG
# scenes, 2-5 referenced people each), on one core, beside the data path's own images/s per core
# (`idavlm-shards bench`, decode + PIL-exact resize + normalise) on the same machine.
#   bash scripts/build-bench.sh [N]      (release build: cargo build --release -p idavlm-shards)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
BIN=${BIN:-target/release/idavlm-shards}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
trap 'rm -rf "$WORK"' EXIT
echo "== a VCR-like release of $N records in $WORK"
"$PY" - "$WORK/release" "$N" <<'PY'
import json, os, random, sys
import numpy as np
from PIL import Image
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
os.makedirs(f"{root}/vcr1images/bench", exist_ok=True)
os.makedirs(f"{root}/vcr1annots", exist_ok=True)
scenes = max(1, n // 5)
for k in range(scenes):
    y, x = np.mgrid[0:360, 0:640]
    base = np.stack([(x * 0.3 + k) % 256, (y * 0.5 + 2 * k) % 256, ((x + y) * 0.2) % 256], -1)
    noise = np.random.default_rng(k).normal(0, 18, (360, 640, 3))
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"{root}/vcr1images/bench/{k}.jpg", quality=75)
    boxes = [[rng.uniform(0, 300), rng.uniform(0, 150), 0, 0, 0.9] for _ in range(6)]
    for b in boxes:
        b[2], b[3] = b[0] + rng.uniform(170, 330), b[1] + rng.uniform(120, 200)
    json.dump({"boxes": boxes, "names": ["person"] * 6, "width": 640, "height": 360},
              open(f"{root}/vcr1images/bench/{k}.json", "w"))
with open(f"{root}/vcr1annots/train.jsonl", "w") as f:
    for i in range(n):
        people = rng.sample(range(1, 7), rng.randint(2, 5))
        q = "Why is " + " and ".join(map(str, people)) + " here ?"
        f.write(json.dumps({"img_fn": f"bench/{i % scenes}.jpg", "metadata_fn": f"bench/{i % scenes}.json",
                            "objects": ["person"] * 6, "question_orig": q, "answer_orig": f"{people[0]} called them .",
                            "rationale_orig": f"{people[-1]} looks at {people[0]} ."}) + "\n")
PY
echo "== build, one core"
"$BIN" build vcr "$WORK/release" "$WORK/out" --workers 1
echo "== the data path on the same core (decode + resize + normalise of 640x360 JPEGs)"
"$BIN" bench "$WORK/out" 2>&1 | grep -i "images/s" || true
