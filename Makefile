# Set-up for a fresh machine. TORCH_SPEC picks the torch build; empty keeps the torch already installed
# (e.g. a GPU machine's own CUDA build, with a venv that sees system site-packages).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
RECIPE ?= recipes/simclr_resnet18_synthetic.yaml
PYTEST_ARGS ?=

.PHONY: venv extras demo test test-fast clean FORCE

# The TORCH_SPEC the venv was built with: a different one (make test TORCH_SPEC=...) rebuilds it, instead of
# silently testing the torch installed before.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed: setup.cfg pyproject.toml $(VENV)/.torch-spec
	@if [ -z "$(TORCH_SPEC)" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Optional backends: DALI (CPU mode works without a GPU) and FFCV (needs apt packages; compiles).
extras: venv
	bash .ci/install_dali.sh $(VENV)
	bash .ci/install_ffcv.sh $(VENV)

$(DATA)/.complete: | venv
	$(PY) tools/make_synthetic.py $(DATA) --force
	touch $@

# Each demo run gets its own directory: the trainer refuses to overwrite an earlier run.
demo: venv $(DATA)/.complete
	$(PY) tools/train.py $(RECIPE) data.path=$(DATA)/train eval.knn_val_path=$(DATA)/val \
		output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# Tests of optional backends skip when the package is missing (`make extras` installs them). pytest exits 5
# when it collected nothing: that is a failure, never a pass.
test: venv
	$(PY) -m pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Build outputs only: runs/ holds trained checkpoints, which no command here can make again in seconds.
clean:
	rm -rf $(VENV) $(DATA)
