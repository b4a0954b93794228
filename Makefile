# Two commands do all set-up on a fresh machine:  make demo  |  make test
# torch 2.13.0 (CPU build) is installed first so that no multi-GB CUDA build is pulled.
VENV  ?= .venv
PY    := $(VENV)/bin/python
ENV   := TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,data]'
	touch $@

demo: setup
	$(ENV) $(PY) tools/quantize.py --demo

test: setup
	$(ENV) $(PY) -m pytest -q -n auto --dist worksteal --durations=25

test-fast: setup
	$(ENV) $(PY) -m pytest -q -n auto -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
