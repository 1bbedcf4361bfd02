#!/usr/bin/env bash
# GPU check of sld_minimal against diffusers: run from anywhere in the checkout, on a machine
# with one CUDA GPU and no network. Needs torch, transformers, safetensors, accelerate (and their dependencies)
# installed; diffusers travels as a wheel in .whl/ (git-ignored through .git/info/exclude), made on a networked
# machine with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1
# The package itself is imported from the checkout (PYTHONPATH), not installed. Arguments go to gpu_check.py
# (e.g. --runs 2, --dtypes fp16, --budget 200); figures land in $OUT/gpu_check.json (else ./gpu_check.json).
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3; else PY=python3; fi
fi

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if compgen -G ".whl/*.whl" > /dev/null; then
  mkdir -p /tmp/site
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  then  # e.g. a venv without pip: the wheels are pure Python, so unpacking them is enough to import them
    echo "gpu_check.sh: pip install failed; unpacking .whl/*.whl into /tmp/site instead"
    "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sorted(glob.glob('.whl/*.whl'))]"
  fi
else
  echo "gpu_check.sh: no wheels in .whl/ (diffusers must then be installed already)"
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "gpu_check.sh: python $PY, PYTHONPATH=$PYTHONPATH"

exec "$PY" -u tests/benchmarks/gpu_check.py "$@"
