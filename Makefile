# Two commands do all the set-up: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Extra arguments for the scripts, e.g. DATA="--data-root /path/to/omniglot"
DATA   ?=
MODEL  := trained_anmls/256_112_2304_ANML-21678.pth
# The results table: every class count of the seed's table, rates chosen on 10 selection runs and
# reported on 10 other runs (README, Results).
CLASSES := 10 50 75 100 200 300 400 600
LRS     := 0.002 0.001 0.00085 0.0008 0.0005 0.0003

.PHONY: demo demo-train results plots test venv clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

venv: $(PY)

# The shipped ANML meta-tested with the seed's own command, on 10 and then 100 classes.
demo: $(PY)
	$(PY) eval_omni.py --model $(MODEL) --classes 10 --lr 0.001 --runs 10 $(DATA)
	@echo "seed README's table:  Classes 10 Accuracy 0.90"
	$(PY) eval_omni.py --model $(MODEL) --classes 100 --lr 0.001 --runs 10 $(DATA)
	@echo "seed README's table:  Classes 100 Accuracy 0.85"

# A short meta-training (a small network, 100 iterations) and a meta-test of its checkpoint.
demo-train: $(PY)
	$(PY) train_omni.py --rln 32 --nm 16 --mask 288 --epochs 100 --out-dir trained_anmls/demo $(DATA)
	$(PY) eval_omni.py --model trained_anmls/demo/32_16_288_ANML-99.pth --classes 10 --runs 5 $(DATA)

# The README's results table and its pictures (about an hour on a 2-core CPU, seconds on a GPU).
results: $(PY)
	$(PY) eval_omni.py --model $(MODEL) --classes $(CLASSES) --lr $(LRS) --runs 10 --selection-runs 10 \
		--json results/omniglot_eval.json $(DATA)
	$(MAKE) plots

plots: $(PY)
	$(PY) plot_results.py --results results/omniglot_eval.json --log trained_anmls/256_112_2304_train_log.csv

test: $(PY)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) trained_anmls/demo .pytest_cache
