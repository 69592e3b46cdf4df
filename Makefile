# make test | make demo | make wheel ARCHS="90a" | make sass | make gpu-check [OUT=dir]
# Each target sets itself up from a fresh clone: a .venv in the repo, torch 2.13.0 (a CPU build
# from local disk) where there is no GPU, then xjfast installed in place (building xjfast._C with
# nvcc when it is found).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xjfast-installed
ARCHS ?= 90a;100a
TRITON_VERSION ?= 3.9.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)

.PHONY: test demo wheel sass gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q pybind11 cmake ninja wheel pytest "triton==$(TRITON_VERSION)"
	XJFAST_CUDA_ARCHS="$(ARCHS)" $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/xjfast generate --preset tiny --frames 48 --out out/demo.mp4
	@echo "the video is at out/demo.mp4"

sass: $(STAMP)
	$(PY) -m xjfast.tools.sass

# On a GPU machine: its own python3 (with torch), no .venv; see bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh $(OUT)

wheel: $(STAMP)
	rm -rf build/cmake
	XJFAST_CUDA_ARCHS="$(ARCHS)" $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info $(VENV) xjfast/_C*.so
