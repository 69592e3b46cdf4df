#!/usr/bin/env bash
# Saves into .whl/ (git-ignored) the wheels the GPU machine lacks: diffusers (the drop-in benchmark
# and tests) and what it needs beyond that machine's packages (it has torch, numpy, filelock,
# huggingface-hub 1.33, regex, requests, safetensors 0.8, Pillow; not importlib_metadata), and
# PyAV (MP4 writing, which `xjfast generate`'s tests need; its wheel bundles FFmpeg with x264).
# gpu_check.sh installs them into /tmp/site there (no internet on that machine). Run here, with pip:
#   bash bench/fetch_wheels.sh            (about 42 MB, 36 of them PyAV; the run carries .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# One version of each (two would stop the install), for the machine's Python 3.12: pure-Python
# wheels, and PyAV's abi3 manylinux_2_28 one.
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2 av==18.1.0)
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
