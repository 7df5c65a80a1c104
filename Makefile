# Two commands do all set-up on a fresh machine with Python >= 3.10:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulled in by a dependency is a multi-GB CUDA build.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m gfnalign demo --out runs/demo

# Fast unit tests first, tiny-model integration next, CLI / multi-process end-to-end last.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests/unit || [ $$? -eq 5 ]
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests/integration || [ $$? -eq 5 ]
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests/e2e || [ $$? -eq 5 ]

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/unit

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
