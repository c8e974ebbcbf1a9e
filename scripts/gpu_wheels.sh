#!/usr/bin/env bash
# Wheels of the benchmark peers for a GPU machine without PyPI access (its image has torch,
# transformers, peft and accelerate, but not trl or datasets; datasets may need a newer pyarrow and fsspec than it has): run here, then carry .whl/ there.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for p in "trl==$(python -c 'import trl; print(trl.__version__)')" "datasets==$(python -c 'import datasets; print(datasets.__version__)')" dill multiprocess "pyarrow==$(python -c "import pyarrow; print(pyarrow.__version__)")" "fsspec==$(python -c "import fsspec; print(fsspec.__version__)")"; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$p"
done
ls -la .whl
