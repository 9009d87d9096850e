# Two commands do all the set-up: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Extra arguments for the demo, e.g. DATA="--data-root /path/to/omniglot"
DATA   ?=

.PHONY: demo test venv clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

venv: $(PY)

# A short meta-training (a small network, 100 iterations) and a meta-test of its checkpoint.
demo: $(PY)
	$(PY) train_omni.py --rln 32 --nm 16 --mask 288 --epochs 100 --out-dir trained_anmls/demo $(DATA)
	$(PY) eval_omni.py --model trained_anmls/demo/32_16_288_ANML-99.pth --classes 10 --runs 5 $(DATA)

test: $(PY)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) trained_anmls/demo .pytest_cache
