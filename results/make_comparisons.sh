#!/usr/bin/env bash
# The comparisons at full size: ANML (seq, iid, lstsq), the same network pretrained the
# ordinary way (seq, lstsq) and at its initialisation (seq), for 10 50 100 200 600 classes, each row's
# learning rate (ridge for lstsq) chosen on separate selection runs and reported on other runs.
#
#   results/make_comparisons.sh                       # on a GPU machine (DEVICE=cuda)
#   results/make_comparisons.sh --data-root /path/to/omniglot --no-download
#   DEVICE=cpu RUNS=2 SEL=2 CLASSES="10 50" results/make_comparisons.sh   # a smaller run
#
# Extra arguments go to every script (data flags). Writes results/comparisons/{label}.json (one
# file per network and method, with a "method" key) and results/comparisons/comparisons.png.
# Re-running skips what is done: a finished pretraining and evaluations whose JSON exists are kept
# (FORCE=1 redoes the evaluations), a stopped pretraining is resumed, so the work can be split into
# calls of limited length (e.g. TIME_LIMIT=500 stops the pretraining cleanly after 500 s).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
ANML=${ANML:-trained_anmls/256_112_2304_ANML-21678.pth}
SIZES=${SIZES:-"--rln 256 --nm 112 --mask 2304"}
NAME=${NAME:-256_112_2304}
EPOCHS=${EPOCHS:-6}                    # pretrain_omni.py's defaults (docs/comparisons.md gives the times)
BATCH=${BATCH:-128}
PRETRAIN_DIR=${PRETRAIN_DIR:-trained_pretrain}
OUT=${OUT:-results/comparisons}
RUNS=${RUNS:-10}                       # reported runs per row
SEL=${SEL:-10}                         # selection runs per row (other seeds)
CLASSES=${CLASSES:-"10 50 100 200 600"}
LRS=${LRS:-"0.01 0.003 0.001 0.0008 0.0005 0.0003 0.0001"}
RIDGES=${RIDGES:-"0.01 0.1 1 10 100 1000 10000"}

mkdir -p "$OUT"
PRETRAINED="$PRETRAIN_DIR/${NAME}_pretrain-$((EPOCHS - 1)).pth"
RANDOM_INIT="$PRETRAIN_DIR/${NAME}_init.pth"

# (a) the same architecture pretrained on i.i.d. minibatches of the background classes
if [ ! -f "$PRETRAINED" ]; then
    resume=()
    if ls "$PRETRAIN_DIR/${NAME}"_pretrain-*_resume.pt >/dev/null 2>&1; then resume=(--resume latest); fi
    limit=()
    if [ -n "${TIME_LIMIT:-}" ]; then limit=(--time-limit "$TIME_LIMIT"); fi
    $PY pretrain_omni.py $SIZES --epochs "$EPOCHS" --batch-size "$BATCH" -d "$DEVICE" --out-dir "$PRETRAIN_DIR" \
        "${resume[@]}" "${limit[@]}" "$@"
    if [ ! -f "$PRETRAINED" ]; then echo "pretraining stopped early: run this script again to resume it"; exit 0; fi
fi

# (b) the network at its initialisation (seed 1: where train_omni.py and pretrain_omni.py start)
$PY pretrain_omni.py $SIZES --init-only --seed 1 --out-dir "$PRETRAIN_DIR" "$@"

# (c) the evaluations: same runs (seed 0), same selection-then-report protocol
evaluate() {  # label model method-flags...
    local label=$1 model=$2
    shift 2
    if [ -f "$OUT/$label.json" ] && [ -z "${FORCE:-}" ]; then echo "== $label: done ($OUT/$label.json; FORCE=1 redoes it)"; return; fi
    echo "== $label"
    $PY eval_omni.py -m "$model" -d "$DEVICE" -c $CLASSES -r "$RUNS" --selection-runs "$SEL" \
        --json "$OUT/$label.json" "${@}" "${DATA_ARGS[@]}"
}
DATA_ARGS=("$@")
evaluate anml_seq      "$ANML"        --method seq   -l $LRS
evaluate anml_iid      "$ANML"        --method iid   -l $LRS
evaluate anml_lstsq    "$ANML"        --method lstsq --ridge $RIDGES
evaluate pretrain_seq  "$PRETRAINED"  --method seq   -l $LRS
evaluate pretrain_lstsq "$PRETRAINED" --method lstsq --ridge $RIDGES
evaluate random_seq    "$RANDOM_INIT" --method seq   -l $LRS

# (d) one picture, one line per method
$PY plot_comparisons.py "$OUT"/*.json -o "$OUT/comparisons.png"
