#!/bin/sh
# The GPU table of benchmarks/README.md in one call of at most 9 minutes on a machine with one NVIDIA GPU whose
# Python has jax (CUDA), flax, optax, chex, scikit-learn, scipy, pyyaml and PyTorch; dp-accounting (pure Python)
# may come as a wheel in .whl/ (installed to /tmp/site). Each benchmark runs under its own time limit and
# writes its table to OUT_DIR/<name>.txt: at the limit it gets SIGTERM, finishes the repeat under way and prints
# its tables from the repeats it finished (it is killed 30 s later if it has not ended).
#
#   sh benchmarks/gpu_figures.sh [OUT_DIR]        # default: $OUT, else /tmp/gpu_figures
set -u
out=${1:-${OUT:-/tmp/gpu_figures}}
cd "$(dirname "$0")/.."
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

run() {  # name, seconds, script and arguments
  name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s): $*"
  timeout -k 30 "$limit" python3 "$@" > "$out/$name.txt" 2>&1
  echo "exit $?" >> "$out/$name.txt"
  cat "$out/$name.txt"
}

run engine 300 benchmarks/bench_engine.py --repeats 3 --mlp-clients 5000 --cnn-clients 1000
run defenses 90 benchmarks/bench_defenses.py --model cnn --clients 100 --steps 5 --rounds 5
run dpsgd_mlp 60 benchmarks/bench_dpsgd.py --repeats 10
run dpsgd_cnn 90 benchmarks/bench_dpsgd.py --model cnn --clients 100 --steps 5 --repeats 5
