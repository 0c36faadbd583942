#!/usr/bin/env bash
# The learning-regime tables of docs/results.md.
#
# By default, Table I under the selection protocol: the plain ResNet18 with the system's search
# (light and strong augmentation, cosine, the same epochs), the standing rows (majority, chance,
# block statistics, prior map), Table I under the default light augmentation and the system's
# other recipe, seed after seed (seeds 0-9; a stopped run keeps whole seeds), each row saving
# its validation and test scores per image; then the protocol's report (choices on validation,
# paired intervals on test, verdicts at the margin). About 15-17 minutes a seed on two CPU cores.
#
#   benchmarks/learning_regime.sh                        # the protocol, seeds 0-9
#   SEEDS="0 1 2" benchmarks/learning_regime.sh          # fewer seeds
#   REPORT_ONLY=1 benchmarks/learning_regime.sh          # the report of the rows written so far
#
# The superseded three-seed tables (test-selected, strong augmentation, 1,500 phantoms at 128 px):
#   CONFIG=configs/learning_ladder/0_full_recipe.yaml SYNTH=configs/synth_learning.yaml DATA=runs/learning_data \
#     OUT=runs/learning_tables DOCS=docs/results/learning TABLES=baselines,I,systems,options SEEDS="0 1 2" EPOCHS=8 BY_ROW=1 \
#     benchmarks/learning_regime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
config=${CONFIG:-configs/protocol.yaml}
synth=${SYNTH:-configs/synth_protocol.yaml}
data=${DATA:-runs/protocol_data}
out=${OUT:-runs/protocol}
docs=${DOCS:-docs/results/protocol}
[ -f "$data/labels.csv" ] || "$python" -m dp_model.synth.cli --config "$synth" --out "$data"
if [ -z "${REPORT_ONLY:-}" ]; then
    extra=()
    [ -n "${EPOCHS:-}" ] && extra+=(--finetune-epochs "$EPOCHS")
    [ -z "${BY_ROW:-}" ] && extra+=(--by-seed)
    # shellcheck disable=SC2086
    "$python" -m dp_model.training.cli ablation --config "$config" --data "$data" --out "$out" \
        --tables "${TABLES:-plain,standing,I,search}" --seeds ${SEEDS:-0 1 2 3 4 5 6 7 8 9} "${extra[@]}"
fi
mkdir -p "$docs"
if [ -d "$out/scores" ]; then
    "$python" benchmarks/paired_options.py --protocol "$out/results.json"
    cp "$out"/protocol.md "$out"/protocol.json "$docs"/
    rm -rf "$docs/scores" && cp -r "$out/scores" "$docs"/
fi
cp "$out"/results.md "$out"/results.json "$docs"/
for picture in results.png systems.png; do
    if [ -f "$out/$picture" ]; then cp "$out/$picture" "$docs"/; fi
done
echo "copied to $docs/"
