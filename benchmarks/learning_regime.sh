#!/usr/bin/env bash
# The learning-regime tables of docs/results.md: the baselines, the paper's Table I, the four
# seed systems and the corrected variants, three seeds each, on 1,500 phantoms at 128 px.
# About 2 h 15 min on two CPU cores (a few minutes per row and seed); results are written
# after every row, so a stopped run keeps the rows it finished.
#
#   benchmarks/learning_regime.sh                 # all four tables, seeds 0 1 2
#   TABLES=I SEEDS="0" benchmarks/learning_regime.sh
#   TABLES=options OUT=runs/learning_options DOCS=docs/results/learning_options benchmarks/learning_regime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
data=${DATA:-runs/learning_data}
out=${OUT:-runs/learning_tables}
docs=${DOCS:-docs/results/learning}
[ -f "$data/labels.csv" ] || "$python" -m dp_model.synth.cli --config configs/synth_learning.yaml --out "$data"
# shellcheck disable=SC2086
"$python" -m dp_model.train_cli ablation --config configs/learning_ladder/0_full_recipe.yaml --data "$data" --out "$out" \
    --tables "${TABLES:-baselines,I,systems,options}" --seeds ${SEEDS:-0 1 2} --finetune-epochs "${EPOCHS:-8}"
mkdir -p "$docs"
cp "$out"/results.md "$out"/results.json "$out"/results.png "$docs"/
if [ -f "$out/systems.png" ]; then cp "$out/systems.png" "$docs"/; fi
echo "copied to $docs/"
