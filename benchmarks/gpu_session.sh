#!/usr/bin/env bash
# Everything the GPU path is measured and checked with, in one run on a machine with a CUDA
# GPU (a lent machine's time is short: one prepared command, not many small ones):
#   1. a smoke run: one TimeMatch trial on the fast path, its step path printed;
#   2. the CUDA tests (tests/test_gpu.py: graph = eager per method, resume on either path, ...);
#   3. benchmarks/training_step.py: every method's step, eager and fast path;
#   4. benchmarks/gpu_sharing.py: K = 1..16 trials per GPU (processes, streams, MPS), curve saved;
#   5. benchmarks/quality.py --sections precision: TimeMatch in fp32 and bf16 over 3 seeds;
#   6. benchmarks/data_loading.py: batches built with the tile on the GPU;
#   7. benchmarks/trial_arrays.py: K = 1..32 trials as one fused model (fp32, bf16) next to K processes.
# Each section has its own time limit, so one that hangs does not cost the others. Logs go to
# $OUT/session.log, the sharing curve to $OUT/gpu_curves.json. SECTIONS picks some of them.
#
#   OUT=results/gpu bash benchmarks/gpu_session.sh            (PYTHON=python3 by default)
#   SECTIONS="training-step gpu-sharing" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TIMEMATCH_CACHE=${TIMEMATCH_CACHE:-/tmp/timematch-cache} MLFLOW_DISABLE_TELEMETRY=true
exec > >(tee -a "$OUT/session.log") 2>&1

SECTIONS=${SECTIONS:-smoke cuda-tests training-step training-step-bf16 gpu-sharing precision data-loading array}
section() {  # section NAME SECONDS COMMAND...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ " $SECTIONS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit} s, $(date +%T))"
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - started)) s"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu,clocks.sm,driver_version --format=csv
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"

section smoke 60 $PY - <<'PY'
import time
from pathlib import Path
from timematch.data.embedded import ensure_embedded_dataset
from timematch.data.dataset import DataConfig
from timematch.experiment import ExperimentSpec, pretrain_source, run_experiment
root = ensure_embedded_dataset(progress=print)
tiny = {"epochs": 2, "steps_per_epoch": 20, "batch_size": 128}
spec = ExperimentSpec(data_root=root, source="DK", target="FR1", method="source_only", pretrain_config=tiny,
                      data=DataConfig(min_parcels=50), cache_dir=Path("/tmp/smoke-cache"))
started = time.perf_counter()
source = pretrain_source(spec)
print("pretrain", source.step_path, f"{time.perf_counter() - started:.1f} s")
for name in ("timematch", "dann", "jumbot"):
    started = time.perf_counter()
    result = run_experiment(spec.replace(method=name, method_config={**tiny, "sample_size": 2} if name == "timematch" else tiny), source)
    sps = [round(h.metrics["samples_per_second"]) for h in result.history]
    print(name, result.step_path, "samples/s per epoch", sps, f"F1 {result.metrics['test_macro_f1']:.3f}",
          f"{time.perf_counter() - started:.1f} s")
PY

section cuda-tests 150 $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -rfE --timeout 90
section training-step 60 $PY benchmarks/training_step.py --device cuda --steps 60
section training-step-bf16 25 $PY benchmarks/training_step.py --device cuda --steps 60 --precision bf16 \
    --competitors none --no-shift
section gpu-sharing 170 $PY benchmarks/gpu_sharing.py --paths "${SHARING_PATHS:-eager,graph}" --streams --mps \
    --save "$OUT/gpu_curves.json"
section precision 100 $PY benchmarks/quality.py --sections precision --seeds 3
section data-loading 40 $PY benchmarks/data_loading.py --device cuda --epochs 1 --zarr-batches 2
section array 240 $PY benchmarks/trial_arrays.py --device cuda --processes
echo "=== done ($(date +%T))"
