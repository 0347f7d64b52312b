# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Exact dev/CI pins; the library itself only declares ranges (pyproject.toml).
DEV_PINS := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEV_PINS)
	$(PY) -m pip install -q -e '.[test,bench,detection]' ruff
	touch $@

.PHONY: venv test bench lint
venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

bench: $(VENV)/.installed
	$(PY) -m bench

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# Baseline vs GRoIE for the GRoIE paper's four systems (Faster, Grid, Mask, GC-Net Mask R-CNN; resnet18-FPN from
# scratch) on the procedural shapes set, same seed, data and schedule; about 30-55 min per pair on 2 CPU cores
# (estimated), ~3 h in all, not in CI. Resumes: finished runs are skipped, interrupted ones continue from their
# checkpoints. Writes runs/detection/experiment/results.{json,md} (the paper's table layout).
# EXPERIMENT_ARGS narrows or widens it, e.g. EXPERIMENT_ARGS="--systems mask_rcnn --seeds 0 1 2".
EXPERIMENT_ARGS ?=
.PHONY: experiment
experiment: $(VENV)/.installed
	$(PY) -m groie_triton.detection experiment --out runs/detection/experiment $(EXPERIMENT_ARGS)

# `make gpu-check OUT=dir` on a fresh CUDA machine, in under 8 minutes on an H100/H200: tests/gpu on the compiled
# kernels, `python -m bench --quick --json` (every provider, the default case among the cases) and the registers
# of the autotuned configs -> OUT/summary.json, OUT/summary.md and the logs (bench/gpu_check.py; exit 1 on any
# failure, 2 without CUDA). Where $(PYTHON) already has torch, triton, torchvision and pytest (a GPU image with no
# package registry), the venv build/venv-gpu reuses them: its site-packages chain to $(PYTHON)'s, this package is
# installed editable into it, nothing is downloaded. Elsewhere the pinned dev venv ($(VENV)) is built and used.
OUT      ?= runs/gpu-check
GPU_VENV := build/venv-gpu
ifneq ($(filter gpu-check,$(MAKECMDGOALS)),)
HAVE_TORCH := $(shell $(PYTHON) -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'triton', 'torchvision', 'pytest')))" 2>/dev/null && echo yes)
endif
GPU_PY   := $(if $(HAVE_TORCH),$(GPU_VENV)/bin/python,$(PY))
GPU_ENV  := $(if $(HAVE_TORCH),$(GPU_VENV)/.installed,$(VENV)/.installed)

$(GPU_VENV)/.installed: pyproject.toml
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv --without-pip $(GPU_VENV)
	$(PYTHON) -c "import site; print('import site; ' + '; '.join(f'site.addsitedir({p!r})' for p in site.getsitepackages()))" > "$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_base_site.pth"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
	touch $@

.PHONY: gpu-check
gpu-check: $(GPU_ENV)
	TRITON_INTERPRET=0 $(GPU_PY) -m bench.gpu_check --out $(OUT)
