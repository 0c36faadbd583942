"""Paired comparisons of the comparison tables' rows.

Two modes:

* ``--protocol RESULTS.json``: the selection protocol (dp_model/training/compare.py) on a run
  of ``dp-train ablation`` that saved per-image scores (``--tables plain,standing,I,search``):
  every choice made on validation, then every paired difference on test with its interval over
  seeds and images and its verdict at the margin. Writes ``protocol.json`` and ``protocol.md``
  beside RESULTS.json and prints the markdown.

      python benchmarks/paired_options.py --protocol runs/protocol/results.json

  With ``--pair A B`` (repeatable) it compares those rows instead, each pair on every seed
  the two rows share (a run stopped part-way leaves some rows with more seeds than the
  report's common ones), and writes ``pairs.json`` and ``pairs.md``.

      python benchmarks/paired_options.py --protocol docs/results/protocol/results.json \\
          --pair "Plain ResNet18, light augmentation, cosine" "Block statistics (16 x 16 mean and SD, gradient boosting)"

* ``RESULTS.json [RESULTS.json ...]``: each corrected variant against the system it varies,
  seed by seed, from the scalars of older runs that saved no per-image scores ("Deep Pneumonia,
  Eq. 5 with detached maps" varies "Deep Pneumonia"). It shows per-seed differences only: it
  cannot give an interval, so it cannot decide.

      python benchmarks/paired_options.py runs/learning_tables/results.json \\
          runs/learning_options/results.json > docs/results/learning_options/paired.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = (
    ("balanced accuracy", lambda r: r["balanced_accuracy"]),
    ("macro ROC AUC", lambda r: r["macro_auc"]),
    ("loc. IoU > 0.1", lambda r: r["localization"][0] if r.get("localization") else float("nan")),
    ("normal recall", lambda r: r["extra"]["recall"][0]),
)


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
            lines.append(
                f"| {name} | {system} | {metric} | {each} | {sum(deltas) / len(deltas):+.3f} | {better} of {len(seeds)} |"
            )
    return "\n".join(lines) + "\n"


def protocol(results: Path, margin: float, resamples: int, min_seeds: int) -> str:
    from dp_model.training.ablation import PROTOCOL
    from dp_model.training.compare import protocol_markdown, protocol_report

    report = protocol_report(results, PROTOCOL, margin, resamples, min_seeds)
    (results.parent / "protocol.json").write_text(json.dumps(report, indent=1) + "\n")
    text = protocol_markdown(report)
    (results.parent / "protocol.md").write_text(text)
    return text


def pairs(
    results: Path, named: list[list[str]], margin: float, resamples: int, min_seeds: int
) -> str:
    from dp_model.training.compare import pairs_markdown, pairs_report

    report = pairs_report(results, [tuple(pair) for pair in named], margin, resamples, min_seeds)
    (results.parent / "pairs.json").write_text(json.dumps(report, indent=1) + "\n")
    text = pairs_markdown(report)
    (results.parent / "pairs.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paired_options.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="*", help="results.json of older runs (per-seed differences only)"
    )
    parser.add_argument("--protocol", type=Path, help="results.json of a run with per-image scores")
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="with --protocol: compare row A with row B on every seed both have",
    )
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--min-seeds", type=int, default=5)
    args = parser.parse_args(argv[1:])
    paths = [str(args.protocol)] if args.protocol else args.results
    if not paths:
        parser.print_usage(sys.stderr)
        return 2
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.protocol:
        try:
            if args.pair:
                sys.stdout.write(
                    pairs(args.protocol, args.pair, args.margin, args.resamples, args.min_seeds)
                )
            else:
                sys.stdout.write(
                    protocol(args.protocol, args.margin, args.resamples, args.min_seeds)
                )
        except (KeyError, ValueError) as exc:
            print(f"paired_options.py: {args.protocol} cannot be compared: {exc}", file=sys.stderr)
            return 2
        return 0
    sys.stdout.write(paired(load(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
