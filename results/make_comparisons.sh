#!/usr/bin/env bash
# The comparisons at full size: ANML (seq, iid, lstsq, ncm, slda, gaussian), first-order ANML (seq), OML (seq), the
# same network pretrained the ordinary way (seq, lstsq, ncm), with zapping (seq), by alternating sequential
# and batch learning with and without zapping (seq), and at its initialisation (seq, ncm); then ANML, the
# pretrained and the random network with every parameter learning (seq --no-freeze, the original ANML
# code's baseline: the whole network runs on every image, the costliest rows). For 10 50 100 200 600
# classes, each row's learning rate (ridge for lstsq, distance for ncm) chosen on separate selection runs
# and reported on other runs.
#
#   results/make_comparisons.sh                       # on a GPU machine (DEVICE=cuda)
#   results/make_comparisons.sh --data-root /path/to/omniglot --no-download
#   DEVICE=cpu RUNS=2 SEL=2 CLASSES="10 50" results/make_comparisons.sh   # a smaller run
#
# Extra arguments go to every script (data flags). Writes results/comparisons/{label}.json (one
# file per network and method, with a "method" key) and results/comparisons/comparisons.png.
# Re-running skips what is done: finished trainings and evaluations whose JSON exists are kept
# (FORCE=1 redoes the evaluations; one interrupted leaves its finished runs in {label}.partial.json and the
# finished {label}.json as it was), a stopped training is resumed, so the work can be split into
# calls of limited length (e.g. TIME_LIMIT=500 stops each training cleanly after 500 s; the script
# then stops and says to run it again).
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
ASB_EPISODES=${ASB_EPISODES:-9000}     # pretrain_omni.py --schedule asb's default (Frati et al.'s count)
FO_EPOCHS=${FO_EPOCHS:-30000}          # first-order ANML: the paper's iterations
FO_DIR=${FO_DIR:-trained_anml_first_order}
OML_SIZES=${OML_SIZES:-"--rln 256"}    # OML's network: six convolutions of 256 channels, 84x84 images
OML_NAME=${OML_NAME:-256}
OML_EPOCHS=${OML_EPOCHS:-30000}        # as many meta-iterations as the paper gives ANML
OML_DIR=${OML_DIR:-trained_oml}
OUT=${OUT:-results/comparisons}
RUNS=${RUNS:-10}                       # reported runs per row
SEL=${SEL:-10}                         # selection runs per row (other seeds)
CLASSES=${CLASSES:-"10 50 100 200 600"}
LRS=${LRS:-"0.01 0.003 0.001 0.0008 0.0005 0.0003 0.0001"}
RIDGES=${RIDGES:-"0.01 0.1 1 10 100 1000 10000"}
NF_LRS=${NF_LRS:-"0.001 0.0003 0.0001 0.00003 0.00001"}  # --no-freeze: the original ANML code's range (1e-3..1e-5)
# --no-freeze: the (run, rate) pairs learning at once (--lanes); all of a row's on a GPU, one at a time on a
# CPU, where lanes are slower (docs/comparisons.md)
if [ "$DEVICE" = cuda ]; then NF_LANES=${NF_LANES:-$(( (RUNS + SEL) * $(echo $NF_LRS | wc -w) ))}; else NF_LANES=${NF_LANES:-1}; fi

mkdir -p "$OUT"
RANDOM_INIT="$PRETRAIN_DIR/${NAME}_init.pth"

# (a) the trainings: each resumed if it stopped, skipped once its last checkpoint exists
train() {  # final-checkpoint resumable-glob script flags...
    local final=$1 resumables=$2
    shift 2
    if [ -f "$final" ]; then return 0; fi
    local resume=() limit=()
    if ls $resumables >/dev/null 2>&1; then resume=(--resume latest); fi
    if [ -n "${TIME_LIMIT:-}" ]; then limit=(--time-limit "$TIME_LIMIT"); fi
    $PY "$@" -d "$DEVICE" "${resume[@]}" "${limit[@]}" "${DATA_ARGS[@]}"
    if [ ! -f "$final" ]; then echo "a training stopped early: run this script again to resume it"; exit 0; fi
}
DATA_ARGS=("$@")
PRETRAINED="$PRETRAIN_DIR/${NAME}_pretrain-$((EPOCHS - 1)).pth"
ZAPPED="$PRETRAIN_DIR/iid_zap/${NAME}_pretrain-$((EPOCHS - 1)).pth"
ASB="$PRETRAIN_DIR/asb/${NAME}_asb-$((ASB_EPISODES - 1)).pth"
ASB_ZAP="$PRETRAIN_DIR/asb_zap/${NAME}_asb-$((ASB_EPISODES - 1)).pth"
FIRST_ORDER="$FO_DIR/${NAME}_ANML-$((FO_EPOCHS - 1)).pth"
OML="$OML_DIR/${OML_NAME}_OML-$((OML_EPOCHS - 1)).pth"
# In the order to follow when GPU time is short: the i.i.d. pretraining (seconds on a GPU), first-order
# ANML, ASB with zapping, OML, then ASB without zapping and the i.i.d. pretraining with it.
train "$PRETRAINED" "$PRETRAIN_DIR/${NAME}_pretrain-*_resume.pt" pretrain_omni.py $SIZES --epochs "$EPOCHS" \
    --batch-size "$BATCH" --out-dir "$PRETRAIN_DIR"
# ANML meta-trained with the first-order meta-gradient (what the original ANML code computed)
train "$FIRST_ORDER" "$FO_DIR/${NAME}_ANML-*_resume.pt" train_omni.py $SIZES --first-order --epochs "$FO_EPOCHS" \
    --out-dir "$FO_DIR"
# alternating sequential and batch learning, zapping the episode's class, on Frati et al.'s network: the RLN
# and last layer alone (--open-gate; with a gate to learn, ASB closes it: docs/comparisons.md), its
# convolutions drawn as theirs (--conv-init kaiming)
train "$ASB_ZAP" "$PRETRAIN_DIR/asb_zap/${NAME}_asb-*_resume.pt" pretrain_omni.py $SIZES --schedule asb --zap \
    --open-gate --conv-init kaiming --episodes "$ASB_EPISODES" --out-dir "$PRETRAIN_DIR/asb_zap"
# OML (its network, its inner loop over the last layer, its rates), on ANML's episodes
train "$OML" "$OML_DIR/${OML_NAME}_OML-*_resume.pt" train_omni.py --arch oml $OML_SIZES --epochs "$OML_EPOCHS" \
    --out-dir "$OML_DIR"
# ASB without zapping, and the i.i.d. pretraining with the whole last layer zapped every epoch
train "$ASB" "$PRETRAIN_DIR/asb/${NAME}_asb-*_resume.pt" pretrain_omni.py $SIZES --schedule asb --open-gate \
    --conv-init kaiming --episodes "$ASB_EPISODES" --out-dir "$PRETRAIN_DIR/asb"
train "$ZAPPED" "$PRETRAIN_DIR/iid_zap/${NAME}_pretrain-*_resume.pt" pretrain_omni.py $SIZES --epochs "$EPOCHS" \
    --batch-size "$BATCH" --zap --out-dir "$PRETRAIN_DIR/iid_zap"

# (b) the network at its initialisation (seed 1: where train_omni.py and pretrain_omni.py start)
$PY pretrain_omni.py $SIZES --init-only --seed 1 --out-dir "$PRETRAIN_DIR" "$@"

# (c) the evaluations: same runs (seed 0), same selection-then-report protocol
finished() {  # a whole report, not the partial one an interrupted evaluation leaves
    $PY -c "import sys; from harness.results import read_results; read_results(sys.argv[1])" "$1" 2>/dev/null
}
evaluate() {  # label model method-flags...
    local label=$1 model=$2
    shift 2
    if [ -f "$OUT/$label.json" ] && [ -z "${FORCE:-}" ] && finished "$OUT/$label.json"; then
        echo "== $label: done ($OUT/$label.json; FORCE=1 redoes it)"; return
    fi
    echo "== $label"
    $PY eval_omni.py -m "$model" -d "$DEVICE" -c $CLASSES -r "$RUNS" --selection-runs "$SEL" \
        --json "$OUT/$label.json" "${@}" "${DATA_ARGS[@]}"
}
evaluate anml_seq      "$ANML"        --method seq   -l $LRS
evaluate anml_iid      "$ANML"        --method iid   -l $LRS
evaluate anml_lstsq    "$ANML"        --method lstsq --ridge $RIDGES
evaluate pretrain_seq  "$PRETRAINED"  --method seq   -l $LRS
evaluate pretrain_lstsq "$PRETRAINED" --method lstsq --ridge $RIDGES
evaluate random_seq    "$RANDOM_INIT" --method seq   -l $LRS
evaluate anml_ncm      "$ANML"        --method ncm
evaluate pretrain_ncm  "$PRETRAINED"  --method ncm
evaluate random_ncm    "$RANDOM_INIT" --method ncm
evaluate anml_slda     "$ANML"        --method slda      # streaming LDA, its shrinkage chosen as ncm's distance
evaluate anml_gaussian "$ANML"        --method gaussian --prediction map  # GeMCL's Gaussian classes, their MAP
evaluate anml_first_order_seq "$FIRST_ORDER" --method seq -l $LRS
evaluate pretrain_zap_seq "$ZAPPED"   --method seq   -l $LRS
evaluate asb_seq       "$ASB"         --method seq   -l $LRS
evaluate asb_zap_seq   "$ASB_ZAP"     --method seq   -l $LRS
evaluate oml_seq       "$OML"         --method seq   -l $LRS
# every parameter learns: a full-network step per image (hours per row on a CPU, docs/comparisons.md)
evaluate pretrain_seq_no_freeze "$PRETRAINED"  --method seq --no-freeze --lanes "$NF_LANES" -l $NF_LRS
evaluate random_seq_no_freeze   "$RANDOM_INIT" --method seq --no-freeze --lanes "$NF_LANES" -l $NF_LRS
evaluate anml_seq_no_freeze     "$ANML"        --method seq --no-freeze --lanes "$NF_LANES" -l $NF_LRS

# (d) one picture, one line per method (the partial reports of interrupted evaluations left out)
reports=()
for report in "$OUT"/*.json; do [[ $report == *.partial.json ]] || reports+=("$report"); done
$PY plot_comparisons.py "${reports[@]}" -o "$OUT/comparisons.png"
