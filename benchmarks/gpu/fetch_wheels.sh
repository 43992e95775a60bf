#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels in .whl/ (git-ignored) for `run` to carry.
# Versions are this venv's, so the GPU runs use what CI tests. See benchmarks/gpu/README.md.
# Arguments name more packages of this venv to fetch (e.g. transformers huggingface-hub tokenizers).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-3.12}  # the GPU image's python3
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
pin() { for name in "$@"; do echo "$name==$(python -c "from importlib.metadata import version; print(version('$name'))")"; done; }
# No wheel on PyPI: build pure-Python ones here (DeepSpeed without compiled ops; it JIT-builds on use).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl $(pin deepspeed rouge-score)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $(pin hjson pydantic pydantic-core annotated-types typing-inspection nltk sqlalchemy tensorboardX "$@")
ls -1 .whl && du -sh .whl
