#!/usr/bin/env bash
# The GPU checks of the compiled step (issue 14) in one run of about 10 minutes, on a machine
# with a CUDA GPU whose python3 has torch, Triton, JAX, NumPyro and pytest but neither the
# toolkit nor pyro-ppl nor arviz (the image of the project's device machine: Python 3.12).
#
# Prepare once, in the checkout's root, on a machine with pip (the folder .gpu_carry is
# ignored by git and travels as a carried path; rebuild the toolkit's wheel after every
# change to the tree: step 0 below refuses a stale one):
#
#   mkdir -p .git/info .gpu_carry/wheels .gpu_carry/fashion-mnist
#   grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo /.gpu_carry/ >> .git/info/exclude
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_carry/wheels \
#     pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2
#   rm -f .gpu_carry/wheels/vi_toolkit-*.whl && .venv/bin/pip wheel -q --no-deps -w .gpu_carry/wheels .
#   cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu_carry/fashion-mnist/   # dataset-fashion-mnist
#
# (about 33 MB in all), then run it there with the device tool: command
# "bash benchmarks/gpu_check.sh", carry [".gpu_carry"], timeout_s 600. Each part has its own
# time limit, so the script ends inside the call and returns what it has: four logs and two
# metrics files under $OUT (the device tool returns at most 8 files).
#
#   0. install the wheels under /tmp/site (PYTHONPATH), check the toolkit's wheel is this tree;
#   1. the gpu-marked tests (tests/test_compiled.py's CUDA test, tests/test_fit.py's);
#   2. benchmarks/vae_speed.py --device cuda: fit eager and compiled (CUDA graphs), Pyro's
#      loop, plain and compiled PyTorch, NumPyro on the same GPU, at batch 128 and 1024;
#   3. benchmarks/small_models.py --device cuda.
set -uo pipefail
OUT=${OUT:-out/gpu_check}
WORK=/tmp/gpu_check
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_carry/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  for part in vi_toolkit:vi_toolkit models:vi_toolkit/models guides:vi_toolkit/guides; do
    diff -rq -x __pycache__ "${part%%:*}" "/tmp/site/${part#*:}" | grep -v "^Only in /tmp/site/vi_toolkit: \(models\|guides\)$" \
      && { echo "the toolkit's wheel is stale: rebuild it (see the header)"; exit 1; }
  done
  python3 -c "import torch, triton, jax, numpyro, pyro, vi_toolkit; print('torch', torch.__version__, \
'triton', triton.__version__, 'jax', jax.__version__, jax.devices(), 'numpyro', numpyro.__version__, \
'pyro', pyro.__version__, 'vi_toolkit', vi_toolkit.__version__)"
} 2>&1 | tee "$OUT/setup.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
export PYTHONPATH=/tmp/site

timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compiled.py tests/test_fit.py 2>&1 \
  | tee "$OUT/gpu_tests.log"

timeout 300 python3 benchmarks/vae_speed.py --device cuda --data-root .gpu_carry/fashion-mnist \
  --out "$WORK/vae_speed" 2>&1 | tee "$OUT/vae_speed.log"
cp "$WORK/vae_speed/metrics.json" "$OUT/vae_speed_metrics.json"

timeout 120 python3 benchmarks/small_models.py --device cuda --steps 1000 --out "$WORK/small_models" 2>&1 \
  | tee "$OUT/small_models.log"
cp "$WORK/small_models/metrics.json" "$OUT/small_models_metrics.json"
