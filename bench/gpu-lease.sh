#!/usr/bin/env bash
# What one GPU lease runs: the full `report` study (every trial to its 100 epochs, all 40,000 training
# images, one seed) as plain `tune train --record` processes, then a short gpu-packing benchmark (about 3 minutes).
# Needs python3 with torch and numpy, and no Ray or MLflow. Run from the repository root:
#
#   ARCHIVE=path/to/cifar10-jpg.tar.gz OUT=results-folder bash bench/gpu-lease.sh
#
# The study stops after STUDY_SECONDS and a second call continues it (finished records are skipped,
# cut ones resume from their last saved state), so leases shorter than the study add up.
# SKIP_BENCH=1 runs the study only; STUDY_ARGS adds options (a dry run: "--smoke --limit-trials 2"). Records land in runs/gpu-study/ (git-ignored) and, packed, in $OUT.
set -u
PY=${PY:-python3}
OUT=${OUT:?set OUT to a folder for the results}
DATA=imagefolder:${ARCHIVE:?set ARCHIVE to the CIFAR-10 JPEG archive}
STUDY_SECONDS=${STUDY_SECONDS:-390}
PER_GPU=${PER_GPU:-16}
RECORDS=runs/gpu-study
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RECORDS"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt"
# Decode once here; every trial then reads the cache instead of decoding the archive 16 times at once.
$PY -c "from tune.data import load; load('$DATA', 'data')" || exit 2

# Its own session, so the time limit stops the trials too, not just their launcher.
setsid $PY -m tune study report --record "$RECORDS" --data "$DATA" --per-gpu "$PER_GPU" --checkpoint-every 5 ${STUDY_ARGS:-} \
    >>"$OUT/study.log" 2>&1 &
study=$!
for _ in $(seq "$STUDY_SECONDS"); do kill -0 "$study" 2>/dev/null || break; sleep 1; done
if kill -0 "$study" 2>/dev/null; then
    echo "stopped after $STUDY_SECONDS s; run again to continue" >>"$OUT/study.log"
    kill -TERM -- -"$study"; sleep 3; kill -KILL -- -"$study" 2>/dev/null
fi
tar czf "$OUT/gpu-study-records.tar.gz" --exclude='*.state.pt' -C "$RECORDS" .

if [ -z "${SKIP_BENCH:-}" ]; then
    $PY -m bench gpu-packing --prepare --data "$DATA" --data-dir data >"$OUT/bench.log" 2>&1 &&
        timeout "${BENCH_SECONDS:-240}" $PY -m bench gpu-packing --short --out "$OUT" >>"$OUT/bench.log" 2>&1
fi
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >>"$OUT/gpu.txt" 2>&1
tail -3 "$OUT/study.log"
