"""Each corrected variant against the system it varies, seed by seed.

The options table (``dp-train ablation --tables options``) and the systems table are trained on
the same splits, the same stage I encoder and the same seeds, so a variant and its system can be
compared seed by seed: a difference that holds in every seed says more than two means whose
intervals overlap. A variant is named after its system ("Deep Pneumonia, Eq. 5 with detached
maps" varies "Deep Pneumonia").

    python benchmarks/paired_options.py runs/learning_tables/results.json \
        runs/learning_options/results.json > docs/results/learning_options/paired.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = (("balanced accuracy", lambda r: r["balanced_accuracy"]), ("macro ROC AUC", lambda r: r["macro_auc"]), ("loc. IoU > 0.1", lambda r: r["localization"][0] if r.get("localization") else float("nan")), ("normal recall", lambda r: r["extra"]["recall"][0]))


def load(paths: list[str]) -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in paths:
        for result in json.loads(Path(path).read_text())["results"]:
            rows[result["row"]][result["seed"]] = result
    return rows


def paired(rows: dict[str, dict[int, dict]]) -> str:
    lines = [
        "| variant | against | metric | per seed (variant − system) | mean difference | seeds better |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_seed in rows.items():
        system = name.split(",")[0]
        if name == system or system not in rows:
            continue
        seeds = sorted(set(by_seed) & set(rows[system]))
        if not seeds:
            continue
        for metric, value in METRICS:
            deltas = [value(by_seed[s]) - value(rows[system][s]) for s in seeds]
            each = ", ".join(f"{d:+.3f}" for d in deltas)
            better = sum(d > 0 for d in deltas)
            lines.append(f"| {name} | {system} | {metric} | {each} | {sum(deltas) / len(deltas):+.3f} | {better} of {len(seeds)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: paired_options.py RESULTS.json [RESULTS.json ...]", file=sys.stderr)
        return 2
    missing = [p for p in argv[1:] if not Path(p).is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    sys.stdout.write(paired(load(argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
