# make test [TESTS=tests/test_x.py] [PYTEST_ARGS=-x] | make lint | make test-sass-gpu-triton | make test-gpu-env | make demo | make wheel ARCHS="90a" | make sass
# make gpu-check [OUT=dir] [STAGES=tests,sanitize,benchmarks] | make profile OP=temporal_attention [BACKEND=triton] [OUT=dir]
#
# Each target sets itself up from a fresh clone (`make setup` does only that): a .venv in the
# repo; torch 2.13.0 where there is no GPU (the CPU build on our machines, which hold it on local disk;
# pip's default index gives the CUDA build), while a GPU machine
# uses the torch it has (the venv sees its site-packages); the build tools; then xjfast installed
# in place with its dev extras, which builds xjfast._C with nvcc when nvcc is found (for
# XJFAST_CUDA_ARCHS, default "90a;100a"). A stamp makes the install happen again only when
# pyproject.toml, setup.py, CMakeLists.txt or csrc/ change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS_STAMP := $(VENV)/.xjfast-tools
STAMP := $(VENV)/.xjfast-installed
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
EXTRAS ?= dev
TESTS ?= tests
ARCHS ?= 90a;100a
TRITON_VERSION ?= 3.9.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: setup venv test lint test-sass-gpu-triton test-gpu-env demo wheel sass gpu-check profile clean

setup venv: $(STAMP)

$(PY):
ifeq ($(HAS_GPU),yes)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@# a venv made from inside another venv (as a GPU image's python3 with torch may be) would see the
	@# base interpreter's packages, not that venv's: a .pth puts $(PYTHON)'s own on the path
	$(PYTHON) -c "import site; print(*site.getsitepackages(), sep='\n')" > \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/xjfast-outer-site-packages.pth"
else
	$(PYTHON) -m venv $(VENV)
endif

# torch, the build tools (setup.py runs without build isolation) and Triton (its CPU interpreter
# runs the kernel tests where there is no GPU; a GPU machine's torch brings its own).
$(TOOLS_STAMP): | $(PY)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q torch==2.13.0 "triton==$(TRITON_VERSION)"
endif
	$(PY) -m pip install -q "setuptools>=68" wheel pybind11 cmake ninja pytest
	touch $@

$(STAMP): $(TOOLS_STAMP) $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-build-isolation -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(TESTS) $(PYTEST_ARGS)

# Static checks of the Python (rules: pyproject.toml [tool.ruff.lint]).
RUFF_VERSION ?= 0.17.6
lint: $(STAMP)
	$(PY) -m ruff --version 2>/dev/null | grep -q "$(RUFF_VERSION)" || $(PY) -m pip install -q "ruff==$(RUFF_VERSION)"
	$(PY) -m ruff check --no-cache xjfast kernels bench tests

# The static SASS checks (tests/test_sass.py) again under Triton 3.6.0 (torch 2.11's, on our GPU machines),
# installed beside the venv's own (CI runs both: the kernels must compile on both versions).
GPU_TRITON_VERSION ?= 3.6.0
GPU_TRITON := $(VENV)/triton-$(GPU_TRITON_VERSION)
test-sass-gpu-triton: $(STAMP)
	test -d $(GPU_TRITON) || $(PY) -m pip install -q --no-deps --target $(GPU_TRITON) "triton==$(GPU_TRITON_VERSION)"
	PYTHONPATH=$(GPU_TRITON) $(PY) -c "import triton; assert triton.__version__ == '$(GPU_TRITON_VERSION)', triton.__version__"
	PYTHONPATH=$(GPU_TRITON) $(PY) -m pytest -q tests/test_sass.py

# The suite on this CPU under what our GPU machines run (Python 3.12, torch 2.11, its Triton 3.6, no
# PyAV), in .venv-gpu-env: a check before spending GPU time, not part of CI (torch 2.11's wheel
# and the CUDA libraries it pulls are several GB). NumPy < 2.4: Triton 3.6's interpreter fails
# beside newer ones (xjfast refuses that pair with the reason). GPU_ENV_TORCH=2.10.0 checks the
# oldest torch pyproject.toml allows.
GPU_ENV_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_ENV := .venv-gpu-env
GPU_ENV_TORCH ?= 2.11.0
test-gpu-env:
	test -x $(GPU_ENV)/bin/python || $(GPU_ENV_PYTHON) -m venv $(GPU_ENV)
	$(GPU_ENV)/bin/pip install -q torch==$(GPU_ENV_TORCH) "numpy<2.4" "setuptools>=68,<82" wheel pybind11 cmake ninja \
		pytest matplotlib "diffusers>=0.32"
	$(GPU_ENV)/bin/pip install -q --no-build-isolation -e .
	$(GPU_ENV)/bin/python -m pytest -q $(TESTS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/xjfast generate --preset tiny --frames 48 --out out/demo.mp4
	@echo "the video is at $(CURDIR)/out/demo.mp4"

sass: $(STAMP)
	$(PY) -m xjfast.tools.sass --candidates

# On a GPU machine: its own python3 (with torch), no .venv; see bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh $(OUT)

# Nsight Compute on one launch of OP at the stream shape (bench/profile.py), into OUT (default
# out/): OUT/profile-OP.ncu-rep, and the per-kernel summary on stdout. The clocks are left as found.
OP ?= temporal_attention
BACKEND ?= auto
PROFILE_OUT = $(or $(OUT),out)
profile:
	mkdir -p $(PROFILE_OUT)
	ncu --profile-from-start off --clock-control none --set full -f -o $(PROFILE_OUT)/profile-$(OP) \
		$(PYTHON) -m bench.profile $(OP) $(BACKEND)
	ncu --import $(PROFILE_OUT)/profile-$(OP).ncu-rep --print-summary per-kernel

# A wheel holding SASS for ARCHS only, into dist/. A clean build/ so that no file left there by
# an earlier build ends up in the wheel; the in-place install in .venv is left as it is.
wheel: $(TOOLS_STAMP)
	rm -rf build dist/xjfast-*.whl
	XJFAST_CUDA_ARCHS="$(ARCHS)" $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls -1 dist/*.whl

clean:
	rm -rf build dist *.egg-info $(VENV) xjfast/_C*.so
