# Set-up for a fresh machine. TORCH_SPEC picks the torch build; empty keeps the torch already installed
# (e.g. a GPU machine's own CUDA build, with a venv that sees system site-packages).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
RECIPE ?= recipes/simclr_resnet18_synthetic.yaml
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ -z "$(TORCH_SPEC)" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(DATA)/.complete: venv
	$(PY) tools/make_synthetic.py $(DATA)
	touch $@

demo: venv $(DATA)/.complete
	$(PY) tools/train.py $(RECIPE) data.path=$(DATA)/train eval.knn_val_path=$(DATA)/val output_dir=runs/demo --overwrite

# Optional backends (DALI CPU mode, FFCV) are installed by .ci/install_extras.sh; their tests skip cleanly
# when the package is missing and CI fails if they were expected but skipped (FASTSSL_REQUIRE_EXTRAS).
test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs $(DATA)
