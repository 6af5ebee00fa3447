#!/usr/bin/env bash
# The device check: every GPU path of the system once, on a fresh GPU machine with no network.
#
#   cluster/device-check.sh [bench device flags]     e.g. --quick, --steps search,fit,
#                                                    --set fit_iters=10
#
# Run it from a copy of the repository that carries the wheels of .whl/ (fetched beforehand
# on a machine with PyPI by cluster/device-wheels.sh). It installs them into /tmp/site (no
# index, no dependencies resolved: the image's own torch, Triton and CUDA stay), records the
# GPU, then runs `dpmot bench device --device cuda` (dpmot_dist/benchmarks/device.py), whose
# steps each have their own time limit (search 150 s, fit 120 s, sample 75 s, the CUDA-marked
# tests 105 s; 450 s in all) so that one failure does not stop the others. It writes, into
# ${OUT:-device-out}/:
#   device-report.json   the merged report (rewritten after every step)
#   search.json fit.json sample.json tests.json   one per step
#   commands.log         the end of every command's output
#   device-check.log     this script's output (the table at its end)
# Settings (environment): OUT, PYTHON (python3), SITE (/tmp/site), CHECK_TIMEOUT (480 s, the
# whole bench device run), DEVICE (cuda; cpu rehearses the script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-device-out}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-480}
DEVICE=${DEVICE:-cuda}
mkdir -p "${OUT}"
LOG=${OUT}/device-check.log
: >"${LOG}"

say() { echo "== $*" | tee -a "${LOG}"; }

say "device check of $(git rev-parse --short HEAD 2>/dev/null || echo 'an unversioned copy'), $(date -u +%FT%TZ)"
{ timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv || echo "nvidia-smi: not available"; } 2>&1 | tee -a "${LOG}"

export PYTHONPATH=${PWD}${PYTHONPATH:+:${PYTHONPATH}}
wheels=(.whl/*.whl)
if [[ -e ${wheels[0]} ]]; then
  say "installing ${#wheels[@]} wheels from .whl/ into ${SITE}"
  if timeout 180 "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "${SITE}" "${wheels[@]}" 2>&1 | tee -a "${LOG}"; then
    export PYTHONPATH=${SITE}:${PYTHONPATH}
  else
    say "wheel install failed: going on with what the image has (steps that need more fail alone)"
  fi
else
  say "no wheels in .whl/ (cluster/device-wheels.sh fetches them): the image's packages only"
fi

say "dpmot bench device --device ${DEVICE} --out ${OUT} $*"
PYTHONUNBUFFERED=1 timeout --kill-after=10 "${CHECK_TIMEOUT}" \
  "${PYTHON}" -m dpmot_dist.cli bench device --device "${DEVICE}" --out "${OUT}" "$@" 2>&1 \
  | tee -a "${LOG}"
status=${PIPESTATUS[0]}
case ${status} in
  0) say "every step ran" ;;
  1) say "some steps failed: their errors are in ${OUT}/device-report.json" ;;
  124 | 137) say "bench device was stopped after ${CHECK_TIMEOUT} s: the steps done so far are in ${OUT}" ;;
  *) say "bench device exited with ${status}" ;;
esac
exit "${status}"
