#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Rust: everything the build, the demo and the tests need.
#   - OpenMPI + clang (Debian) for the `mpi` feature (rsmpi's bindgen needs libclang)
#   - a project-local venv .venv with torch==2.11.0 (libtorch for tch, and the PyTorch oracle of the tests)
#   - qwen.tiktoken extracted from the dashscope==2.0.2 wheel into .deps/ (never committed)
#   - with --test (the test suite; --slurm is the old name): Debian's slurmctld, slurmd, slurm-client and
#     munge, for the live single-node Slurm of tests/tests/slurm.rs (scripts/slurm-local.sh starts it),
#     and peft + transformers (the oracle of the LoRA export, tests/python/peft_check.py) and tensorboard
#     (its event reader checks logging.tensorboard) in .venv
set -euo pipefail
with_slurm=0
for a in "$@"; do
  case "$a" in
    --test | --slurm) with_slurm=1 ;;
    *) echo "setup.sh: unknown argument $a (known: --test)" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { echo "[setup] $*" >&2; }

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/include/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need_apt+=(libopenmpi-dev)
command -v clang >/dev/null 2>&1 || need_apt+=(clang)
if [ "$with_slurm" -eq 1 ]; then
  for p in slurmctld slurmd; do PATH="/usr/sbin:/sbin:$PATH" command -v "$p" >/dev/null 2>&1 || need_apt+=("$p"); done
  command -v sbatch >/dev/null 2>&1 || need_apt+=(slurm-client)
  PATH="/usr/sbin:/sbin:$PATH" command -v munged >/dev/null 2>&1 || need_apt+=(munge)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/tmp/idavlm-apt.log 2>&1 || { cat /tmp/idavlm-apt.log >&2; exit 1; }
  apt-get install -y -qq "${need_apt[@]}" >>/tmp/idavlm-apt.log 2>&1 || { tail -30 /tmp/idavlm-apt.log >&2; exit 1; }
fi

py=python3
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  $py -m venv .venv
fi
# Pillow is pinned: the resize reproduces its pass order (13.0 changed it; shards/src/preprocess.rs).
if ! .venv/bin/python -c 'import torch, numpy, PIL, safetensors; assert torch.__version__.startswith("2.11.0"); assert PIL.__version__ == "13.0.0"' 2>/dev/null; then
  log "installing torch==2.11.0 numpy pillow==13.0.0 safetensors into .venv (a few minutes, ~4.6 GB)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.11.0 numpy pillow==13.0.0 safetensors >&2
fi

# The LoRA tests compare the adapter layout and merge with PEFT's own (pinned: its file layout is the
# contract).
# TensorBoard's own event reader checks the event files (tests/tests/train.rs).
# tiktoken: the Qwen3-VL template's oracle (tests/python/qwen3vl_template.py).
if [ "$with_slurm" -eq 1 ] && ! .venv/bin/python -c 'import peft, tensorboard, tiktoken; assert peft.__version__ == "0.21.2"; assert tensorboard.__version__ == "2.21.0"; assert tiktoken.__version__ == "0.12.0"' 2>/dev/null; then
  log "installing peft==0.21.2 transformers==5.24.0 tensorboard==2.21.0 tiktoken==0.12.0 into .venv (test oracles)"
  .venv/bin/pip install -q --disable-pip-version-check peft==0.21.2 transformers==5.24.0 tensorboard==2.21.0 tiktoken==0.12.0 >&2
fi

if [ ! -s .deps/qwen.tiktoken ]; then
  log "extracting qwen.tiktoken from dashscope==2.0.2"
  mkdir -p .deps/wheel
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d .deps/wheel dashscope==2.0.2 >&2
  .venv/bin/python - <<'PY'
import zipfile, glob
whl = glob.glob(".deps/wheel/dashscope-2.0.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("dashscope/resources/qwen.tiktoken")
open(".deps/qwen.tiktoken.part", "wb").write(data)
PY
  mv .deps/qwen.tiktoken.part .deps/qwen.tiktoken
fi
log "ok"
