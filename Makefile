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

# Baseline vs GRoIE Mask R-CNN (resnet18-FPN, from scratch) on the procedural shapes set, same seed and
# schedule; roughly 15-35 min per model on 2 CPU cores (estimated), not in CI.
# Writes runs/detection/experiment/results.{json,md}.
.PHONY: experiment
experiment: $(VENV)/.installed
	$(PY) -m groie_triton.detection experiment --out runs/detection/experiment
