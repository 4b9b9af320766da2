# Sourced by the Makefile and scripts: the build and run environment (after scripts/setup.sh).
# tch links against the libtorch inside the project venv's torch==2.11.0.
_idavlm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_idavlm_root/.venv/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=0
_torch_dir="$("$_idavlm_root/.venv/bin/python" -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)"
export IDAVLM_TORCH_LIB="$_torch_dir/lib"
export LD_LIBRARY_PATH="$_torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export IDAVLM_TOKENIZER="$_idavlm_root/.deps/qwen.tiktoken"
export IDAVLM_PYTHON="$_idavlm_root/.venv/bin/python"
# mpirun as root (CI and these machines run as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
unset _torch_dir
