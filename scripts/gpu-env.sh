# Sourced on a GPU machine (no cargo there): libtorch from the machine's own python3 torch, NCCL
# multicast off (see the device notes), and the carried binaries on PATH.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
torch_dir="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)"
if [ -z "$torch_dir" ]; then
  echo "gpu-env.sh: python3 has no torch: install torch==2.11.0 (libtorch and NCCL come from it)" >&2
  return 1 2>/dev/null || exit 1
fi
site="$(dirname "$torch_dir")"
nv=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export IDAVLM_TORCH_LIB="$torch_dir/lib"
export LD_LIBRARY_PATH="$torch_dir/lib:${nv}${LD_LIBRARY_PATH:-}"
export PATH="$here/bin:$PATH"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
