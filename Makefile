# Two commands do all the set-up: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Extra arguments for the scripts, e.g. DATA="--data-root /path/to/omniglot"
DATA   ?=
MODEL  := trained_anmls/256_112_2304_ANML-21678.pth
# The results table: every class count of higherANML's table, rates chosen on 10 selection runs and
# reported on 10 other runs (docs/results.md).
CLASSES := 10 50 75 100 200 300 400 600
LRS     := 0.002 0.001 0.00085 0.0008 0.0005 0.0003

.PHONY: demo demo-train results plots test gpu-check venv clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

venv: $(PY)

# The shipped ANML against the shipped pretrained network and the random initialisation, 10 and 100 classes.
demo: $(PY)
	$(PY) demo.py $(DATA)

# A small ANML meta-trained now (runs/demo), against its initialisation.
demo-train: $(PY)
	$(PY) demo.py --train $(DATA)

# The README's results table and its pictures (about an hour on a 2-core CPU, a minute on a GPU).
results: $(PY)
	$(PY) eval_omni.py --model $(MODEL) --classes $(CLASSES) --lr $(LRS) --runs 10 --selection-runs 10 \
		--json results/omniglot_eval.json $(DATA)
	$(MAKE) plots

plots: $(PY)
	$(PY) plot_results.py --results results/omniglot_eval.json --log trained_anmls/256_112_2304_train_log.csv

# Every test but the slow end-to-end script runs (-m slow), which gpu-check runs.
test: $(PY)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

# Every CUDA path once, on a machine with one NVIDIA GPU (at most 10 minutes on an H200): one line per
# check, exit 1 on any failure. DEVICE=cpu runs the same steps at tiny sizes (CI does).
DEVICE ?= cuda
gpu-check: $(PY)
	$(PY) tools/gpu_check.py --device $(DEVICE) $(DATA)

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
