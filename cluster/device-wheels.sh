#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that cluster/device-check.sh installs on the GPU
# machine, which has no network. Not run in CI.
#
#   cluster/device-wheels.sh              the packages the GPU image lacks, into .whl/
#   WITH_FAISS=1 cluster/device-wheels.sh  + faiss-gpu-cu12 and the CUDA 12 libraries it loads
#   WITH_RAY=1 cluster/device-wheels.sh    + ray (the shard and sampler actor tests)
#
# The GPU image (Python 3.12, x86-64) holds torch (CUDA 13), Triton, numpy, scipy, numba,
# pyarrow, fsspec, pyyaml, tqdm, matplotlib, pillow, huggingface-hub, safetensors, pytest and
# pytest-timeout; it lacks pydantic (and its pydantic-core, annotated-types,
# typing-inspection, a recent typing-extensions), diffusers (and importlib-metadata), ray,
# s3fs and faiss. s3fs is needed only by S3 tests, which the device check does not run.
#
# What travels with the repository to that machine may be limited in size (LIMIT_MB, 64 by
# default: the tracked tree and the wheels together): the default set is about 10 MB. faiss-gpu-cu12 alone is 48 MB and needs the CUDA 12 runtime
# and cuBLAS 12 (hundreds of MB; the image's torch brings CUDA 13's), ray is 79 MB: each
# fits only where the limit allows, so both are opt-in, and without them the faiss-gpu
# backend is reported as not available and the Ray actor tests skip.
# Versions: the ones the project's tests run with; override one with e.g. PYDANTIC=2.12.0
# (pydantic-core must then be the version that pydantic pins).
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.whl}
LIMIT_MB=${LIMIT_MB:-64}
packages=(
  "pydantic==${PYDANTIC:-2.14.4}"
  "pydantic-core==${PYDANTIC_CORE:-2.50.5}"
  "annotated-types==${ANNOTATED_TYPES:-0.8.0}"
  "typing-inspection==${TYPING_INSPECTION:-0.4.5}"
  "typing-extensions==${TYPING_EXTENSIONS:-4.16.0}"
  "diffusers==${DIFFUSERS:-0.42.1}"
  "importlib-metadata==${IMPORTLIB_METADATA:-10.2.0}"
)
if [[ ${WITH_FAISS:-0} == 1 ]]; then
  packages+=("faiss-gpu-cu12==${FAISS_GPU:-1.14.1.post1}" nvidia-cuda-runtime-cu12 nvidia-cublas-cu12)
fi
if [[ ${WITH_RAY:-0} == 1 ]]; then
  packages+=("ray==${RAY:-2.60.0}")
fi

mkdir -p "${DEST}"
grep -qxF "/${DEST}/" .gitignore 2>/dev/null || echo "note: add /${DEST}/ to .gitignore"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "${DEST}" "${packages[@]}"

# One version of each package: two of one name stop the whole install there.
dupes=$(ls "${DEST}"/*.whl | sed -E 's#.*/##; s#-[0-9].*##' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n ${dupes} ]]; then
  echo "error: ${DEST}/ holds two versions of: ${dupes}; remove the older ones" >&2
  exit 1
fi
wheels_mb=$(($(cat "${DEST}"/*.whl | wc -c) / 1048576))
tree_mb=$(($(git ls-files -z | xargs -0 cat | wc -c) / 1048576))
echo "${DEST}/: ${wheels_mb} MB of wheels; the tracked tree: ${tree_mb} MB; limit ${LIMIT_MB} MB"
if ((wheels_mb + tree_mb > LIMIT_MB)); then
  echo "warning: more than ${LIMIT_MB} MB would travel; drop WITH_FAISS / WITH_RAY" >&2
fi
