#!/usr/bin/env bash
# The right PyTorch build for this machine's GPUs, before the project is installed.
#
#   scripts/install_torch.sh PYTHON [--check]
#
# PyPI's torch 2.13.0 is a CUDA 13.0 build with no kernels for Volta (V100, sm_70): on a
# V100 the first kernel fails with "no kernel image is available". The CUDA 12.6 build
# carries sm_70 to sm_90 (Volta to Hopper), so on such a machine this installs it from
# PyTorch's index. Without nvidia-smi (a CPU machine) it does nothing: the project's own
# install takes the CPU wheel. --check installs nothing: it exits 1, printing the command
# to run, when the build installed is not the one this machine needs.
# TORCH_VERSION and TORCH_INDEX override the version and the CUDA 12.6 index.
set -euo pipefail

PY=${1:?usage: scripts/install_torch.sh PYTHON [--check]}
MODE=${2:-install}
VERSION=${TORCH_VERSION:-2.13.0}
INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}
CUDA_TAG=cu126

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo ">> no NVIDIA GPU (nvidia-smi not found): torch $VERSION from the package index"
  exit 0
fi

# One line per GPU: "<name>, <compute capability>, <driver version>".
if ! gpus=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null) \
   || [ -z "$gpus" ]; then
  echo "nvidia-smi found but it lists no GPU (driver not loaded?); on a Volta-to-Hopper GPU install:" >&2
  echo "  $PY -m pip install torch==$VERSION --index-url $INDEX" >&2
  exit 2
fi
# awk alone reads the whole list: `| head` would close the pipe early, and under pipefail
# the writer's SIGPIPE (exit 141) would end the script.
field() { awk -F', *' -v f="$1" -v which="$2" '
  NR == 1 { lo = $f; hi = $f; first = $f }
  $f + 0 < lo + 0 { lo = $f }
  $f + 0 > hi + 0 { hi = $f }
  END { print (which == "lowest" ? lo : which == "highest" ? hi : first) }' <<<"$gpus"; }
lowest=$(field 2 lowest)
highest=$(field 2 highest)
driver=$(field 3 first)
name=$(field 1 first)
count=$(awk 'END { print NR }' <<<"$gpus")
echo ">> $count NVIDIA GPU(s): $name, compute capability $lowest-$highest, driver $driver"

below() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 < b + 0) }'; }
if below "$lowest" 7.0; then
  echo "compute capability $lowest: torch $VERSION has no kernels below 7.0 (Volta); use a V100 or newer GPU" >&2
  exit 2
fi
if ! below "$highest" 10.0; then  # Blackwell: not in the 12.6 build, in the index's CUDA 13.0 one
  INDEX=https://download.pytorch.org/whl/cu130
  CUDA_TAG=cu130
fi
if below "${driver%%.*}" 560 && [ "$CUDA_TAG" = cu126 ]; then
  echo "driver $driver is older than the R560 branch that CUDA 12.6 needs: update the NVIDIA driver (R560-R580 for V100)" >&2
  exit 2
fi

command="$PY -m pip install torch==$VERSION --index-url $INDEX"
installed=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ "$installed" = "$VERSION+$CUDA_TAG" ]; then
  echo ">> torch $installed is installed: the $CUDA_TAG build this GPU needs"
  exit 0
fi
if [ "$MODE" = --check ]; then
  echo "torch ${installed:-(none)} is installed, but this GPU needs the $CUDA_TAG build; run:" >&2
  echo "  $command" >&2
  exit 1
fi
echo ">> installing torch $VERSION+$CUDA_TAG: $command"
if ! $command; then
  echo "could not install torch's $CUDA_TAG build; run, where the index can be reached:" >&2
  echo "  $command" >&2
  exit 2
fi
