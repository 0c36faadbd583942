"""Out-of-distribution detectors of a trained bundle, on near- and far-OOD images.

    python benchmarks/ood_benchmark.py --bundle runs/ood/bundle --data runs/ood/data \
        --out runs/ood/bench --json docs/results/ood/learning.json

What it builds:

* in-distribution images: the bundle's own validation and test splits of ``--data``, and
  ``--fresh`` new phantoms per role from the data's own generator settings (another seed:
  new patients, the same distribution), so that rates near 1 % are measured on hundreds;
* near-OOD images (:mod:`dp_model.synth.shifts`): ``--per-shift`` images of each shift per
  role, from the data's generator settings, written as 8-bit PNG and read back as any image;
* far-OOD images: every distinct single-frame greyscale image of pydicom-data that the node's
  DICOM conversion decodes (CT, MR, NM, US, a CR of an extremity, ...), and RG1, a real PA
  chest CR, as its own category ("real vs phantom"). Test only: they are too few to choose by.

What it measures, for each detector of :mod:`dp_model.serving.ood` (the Mahalanobis ones with
Ledoit-Wolf and with OAS shrinkage), fitted on the bundle's training split:

* per category: AUROC (OOD positive) and FPR at 95 % TPR (the share of OOD images accepted
  when the threshold accepts 95 % of in-distribution images), and the share turned away at
  the certified threshold;
* the certified threshold (:func:`dp_model.serving.ood.certified_threshold` on the calibration split,
  as ``dp-train`` places it) and the in-distribution false-rejection rate there, with a
  Clopper-Pearson interval;
* whether the turned-away in-distribution images are those the classifier gets wrong: the
  AUROC of the score for a wrong class, and the error rate among rejected and accepted images.

The detector is chosen on the validation role by the rule in :func:`choose` (stated in
docs/decisions.md); the test role is measured once and reported, never used to choose.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dp_model.serving.bundle import load_bundle
from dp_model.serving.ood import DETECTORS, Seen, certified_threshold, fit_detector, observe
from dp_model.serving.served import clopper_pearson

logger = logging.getLogger("ood_benchmark")

#: The detectors measured: (name, kind, shrinkage method). The Mahalanobis kinds twice.
CANDIDATES = tuple(
    (kind if method == "ledoit-wolf" else f"{kind}+oas", kind, method)
    for kind in DETECTORS
    for method in (("ledoit-wolf", "oas") if "mahalanobis" in kind else ("ledoit-wolf",))
)
#: The roles: validation chooses, test reports.
ROLES = ("val", "test")
#: The promise the gate makes (dp_model.serving.ood.FALSE_REJECTION): the choice keeps detectors that keep it.
FALSE_REJECTION = 0.01
#: A challenger replaces the incumbent only by more than this mean AUROC.
MARGIN = 0.005
#: The in-distribution rate the FPR is read at.
TPR = 0.95
REAL_CHEST = "RG1_UNCR.dcm"


# --- images --------------------------------------------------------------------------------------


def synth_config(data: Path):
    """The generator settings of a synthetic dataset folder (its ``synth_config.yaml``)."""
    from dp_model.config import load_config
    from dp_model.synth import SynthConfig

    path = data / "synth_config.yaml"
    if not path.exists():
        raise SystemExit(
            f"{data}: no synth_config.yaml; the near-OOD sets are made from the data's own generator settings"
        )
    return load_config(SynthConfig, path)


def fresh_phantoms(config, out: Path, role: str, count: int, size: int):
    """``count`` new in-distribution phantoms (the data's settings, another seed), decoded."""
    from dp_model.datasets import read_dataset
    from dp_model.synth import generate
    from dp_model.training.config import DataConfig
    from dp_model.training.data import load_split

    root = out / f"fresh_{role}"
    seed = config.seed + (500_009 if role == "val" else 500_029)
    if not (root / "labels.csv").exists():
        generate(replace(config, seed=seed, num_images=count), root, progress=False)
    dataset = read_dataset(str(root))
    return load_split(
        dataset,
        tuple(range(len(dataset.records))),
        DataConfig(root=str(root), image_size=size, cache_dir=str(out / "cache")),
        f"decode fresh {role}",
    )


def _render_one(args) -> str:
    from PIL import Image

    from dp_model.synth.shifts import render_shifted

    config, index, shift, path = args
    if not Path(path).exists():
        pixels = render_shifted(config, index, shift)
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
    return path


def near_ood(config, out: Path, role: str, count: int, workers: int) -> dict[str, list[Path]]:
    """``count`` PNG images of each shift for ``role`` (validation: indices 0..count-1; test: the next ``count``)."""
    from dp_model.synth.shifts import SHIFTS

    first = 0 if role == "val" else 1_000_000
    jobs, found = [], {}
    for shift in SHIFTS:
        folder = out / "near" / role / shift
        folder.mkdir(parents=True, exist_ok=True)
        found[shift] = [folder / f"{i:05d}.png" for i in range(count)]
        jobs += [(config, first + i, shift, str(path)) for i, path in enumerate(found[shift])]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_render_one, jobs, chunksize=16))
    return found


def pydicom_data() -> Path:
    """The folder of pydicom-data's files (``data_store/data`` in site-packages)."""
    import data_store

    return Path(data_store.__file__).parent / "data"


def far_ood(size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every distinct pydicom-data image that decodes (one per image: the uncompressed copy),
    RG1 aside; and, for every file left out, why."""
    from dp_transforms import ImageError, load_letterboxed

    canvases, left_out = {}, {}
    for path in sorted(pydicom_data().glob("*.dcm")):
        if re.search(r"_(J2KI|J2KR|UNCI)\.dcm$", path.name) or path.name.startswith("RG1_"):
            left_out[path.name] = (
                "another encoding of an image used"
                if not path.name.startswith("RG1_")
                else "RG1: its own category"
            )
            continue
        try:
            canvas = load_letterboxed(path, size)[0]
        except ImageError as exc:
            left_out[path.name] = str(exc).split(": ", 1)[-1].split(";")[0][:80]
            continue
        same = [name for name, seen in canvases.items() if (seen - canvas).abs().mean() < 0.01]
        if same:
            left_out[path.name] = f"the same image as {same[0]}"
            continue
        canvases[path.name] = canvas
    return canvases, left_out


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    from dp_transforms import load_letterboxed

    return torch.stack([_as_resident(load_letterboxed(p, size)[0]) for p in paths])


def _as_resident(canvas: torch.Tensor) -> torch.Tensor:
    """The canvas as a resident split holds it (uint8, as dp-train decodes), back in [0, 1]."""
    return torch.round(canvas * 255.0) / 255.0


def batches(images: torch.Tensor, size: int = 128):
    for start in range(0, len(images), size):
        yield images[start : start + size].float()


# --- measures ------------------------------------------------------------------------------------


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an OOD score exceeds an in-distribution score), ties counting half."""
    from scipy.stats import rankdata

    if not len(inside) or not len(outside):
        return float("nan")
    ranks = rankdata(np.concatenate([inside, outside]))
    return float(
        (ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2)
        / (len(inside) * len(outside))
    )


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, tpr: float = TPR) -> float:
    """The share of OOD images accepted by the lowest threshold that accepts ``tpr`` of the in-distribution ones."""
    cut = np.sort(inside)[int(np.ceil(tpr * len(inside))) - 1]
    return float((outside <= cut).mean())


def rate(count: int, total: int) -> dict:
    low, high = clopper_pearson(count, total)
    return {
        "count": int(count),
        "total": int(total),
        "rate": count / total if total else float("nan"),
        "low": low,
        "high": high,
    }


def measure(
    scores: dict[str, np.ndarray],
    inside: str,
    categories: list[str],
    cut: float,
    errors: np.ndarray,
) -> dict:
    """One detector on one role: per-category AUROC, FPR at 95 % TPR and share turned away at
    ``cut``; the in-distribution false rejections; the misclassification view."""
    ind = scores[inside]
    rejected = ind > cut
    found = {
        "categories": {
            c: {
                "auroc": auroc(ind, scores[c]),
                "fpr95": fpr_at_tpr(ind, scores[c]),
                "turned_away": float((scores[c] > cut).mean()),
                "images": len(scores[c]),
            }
            for c in categories
        },
        "false_rejection": rate(int(rejected.sum()), len(ind)),
        "misclassified_auroc": auroc(ind[~errors], ind[errors]),
        "error_rejected": rate(int(errors[rejected].sum()), int(rejected.sum())),
        "error_accepted": rate(int(errors[~rejected].sum()), int((~rejected).sum())),
    }
    return found


def choose(
    validation: dict[str, dict], near: list[str], incumbent: str = "mahalanobis"
) -> tuple[str, str]:
    """The rule: among the detectors whose validation false-rejection at the certified threshold
    is consistent with the gate's 1 % (Clopper-Pearson lower bound at most 1 %), the highest
    mean validation AUROC over the near-OOD categories; the incumbent stays unless beaten by
    more than :data:`MARGIN`. Returns the name and the reason in words."""
    kept = {n: r for n, r in validation.items() if r["false_rejection"]["low"] <= FALSE_REJECTION}
    if not kept:
        # a calibration split too small to keep 1 % with any detector: the AUROC alone decides, and
        # says so
        return choose(
            {
                n: r | {"false_rejection": r["false_rejection"] | {"low": 0.0}}
                for n, r in validation.items()
            },
            near,
            incumbent,
        )[0], (
            "no detector's validation false rejection is consistent with 1 % at this calibration size; chosen on the AUROC alone"
        )
    mean = {n: float(np.mean([r["categories"][c]["auroc"] for c in near])) for n, r in kept.items()}
    best = max(mean, key=mean.get)
    if incumbent in mean and mean[best] - mean[incumbent] <= MARGIN:
        best = incumbent
    dropped = sorted(set(validation) - set(kept))
    reason = f"mean near-OOD validation AUROC {mean[best]:.3f}" + (
        f"; left out for false rejections above 1 %: {', '.join(dropped)}" if dropped else ""
    )
    return best, reason


def paired_difference(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    role: str,
    near: list[str],
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Mean near-OOD AUROC of detector ``a`` less ``b`` on ``role``, with a 95 % paired
    bootstrap interval: each resample draws the in-distribution images and each category's
    images with replacement, the same draw for both detectors."""
    rng = np.random.default_rng(seed)
    inside = f"id_{role}"

    def mean_auroc(scores: dict[str, np.ndarray], pick: dict[str, np.ndarray]) -> float:
        return float(
            np.mean(
                [auroc(scores[inside][pick[inside]], scores[f"{role}:{c}"][pick[c]]) for c in near]
            )
        )

    whole = {inside: np.arange(len(a[inside]))} | {
        c: np.arange(len(a[f"{role}:{c}"])) for c in near
    }
    draws = []
    for _ in range(resamples):
        pick = {key: rng.integers(0, len(index), len(index)) for key, index in whole.items()}
        draws.append(mean_auroc(a, pick) - mean_auroc(b, pick))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "difference": mean_auroc(a, whole) - mean_auroc(b, whole),
        "low": float(low),
        "high": float(high),
        "resamples": resamples,
    }


# --- the run -------------------------------------------------------------------------------------


def collect(args) -> tuple[dict[str, Seen], dict[str, np.ndarray], dict, torch.nn.Module]:
    """What the model shows of every set (``Seen`` by set name), the class labels of the
    in-distribution sets, and a description of the sets."""
    from dp_model.training.calibrate import observed, resident_splits

    model, contract = load_bundle(args.bundle)
    size = contract.image_size
    splits = resident_splits(args.bundle, args.data)
    config = synth_config(args.data)
    seen, labels, sets = (
        {},
        {},
        {"image_size": size, "near_ood": {}, "splits": {k: len(v) for k, v in splits.items()}},
    )
    for part, data in splits.items():
        seen[part], labels[part] = observed(model, data, stages=True), data.labels.numpy()
    for role in ROLES:
        fresh = fresh_phantoms(config, args.out, role, args.fresh, size) if args.fresh else None
        if fresh is not None:
            own = seen[role]
            extra = observed(model, fresh, stages=True)
            seen[f"id_{role}"], labels[f"id_{role}"] = (
                Seen.cat([own, extra]),
                np.concatenate([labels[role], fresh.labels.numpy()]),
            )
        else:
            seen[f"id_{role}"], labels[f"id_{role}"] = seen[role], labels[role]
        sets[f"id_{role}"] = {"bundle_split": len(labels[role]), "fresh_phantoms": args.fresh}
        for shift, paths in near_ood(config, args.out, role, args.per_shift, args.workers).items():
            seen[f"{role}:{shift}"] = observe(model, batches(load_images(paths, size)), stages=True)
            sets["near_ood"][shift] = len(paths)
    canvases, left_out = far_ood(size)
    seen["test:far_ood"] = observe(
        model, batches(_as_resident(torch.stack(list(canvases.values())))), stages=True
    )
    seen["test:rg1"] = observe(
        model, batches(load_images([pydicom_data() / REAL_CHEST], size)), stages=True
    )
    sets |= {"far_ood": sorted(canvases), "far_ood_left_out": left_out, "real_chest": REAL_CHEST}
    return seen, labels, sets, model


def evaluate(seen: dict[str, Seen], labels: dict[str, np.ndarray], model) -> dict:
    from dp_model.serving.ood import classifier_layer
    from dp_model.synth.shifts import SHIFTS

    near = list(SHIFTS)
    held = "calibration" if "calibration" in seen else "val"
    results, scores_out = {}, {}
    for name, kind, method in CANDIDATES:
        detector = fit_detector(
            kind, seen["train"], labels["train"], classifier_layer(model), method
        )
        scores = {key: detector.score(value) for key, value in seen.items() if key != "train"}
        cut, rank, bound = certified_threshold(scores[held])
        entry = {
            "kind": kind,
            "shrinkage": method if "mahalanobis" in kind else None,
            "threshold": cut,
            "rank": rank,
            "held_out": len(scores[held]),
            "bound": bound,
            "threshold_split": held,
        }
        for role in ROLES:
            errors = seen[f"id_{role}"].logits.argmax(1).numpy() != labels[f"id_{role}"]
            categories = [f"{role}:{c}" for c in near] + (
                ["test:far_ood", "test:rg1"] if role == "test" else []
            )
            found = measure(scores, f"id_{role}", categories, cut, errors)
            found["categories"] = {k.split(":", 1)[1]: v for k, v in found["categories"].items()}
            entry[role] = found
        entry["rg1_score"] = float(scores["test:rg1"][0])
        entry["rg1_percentile"] = float((scores["id_test"] < scores["test:rg1"][0]).mean())
        results[name] = entry
        scores_out[name] = scores
    chosen, reason = choose({n: r["val"] for n, r in results.items()}, near)
    against = (
        {
            role: paired_difference(scores_out[chosen], scores_out["mahalanobis"], role, near)
            for role in ROLES
        }
        if chosen != "mahalanobis"
        else {}
    )
    return {
        "detectors": results,
        "chosen": chosen,
        "rule": reason,
        "near_ood": near,
        "chosen_minus_mahalanobis": against,
        "scores": scores_out,
    }


def table(result: dict, role: str) -> str:
    """A markdown table of one role: mean near-OOD AUROC, each category's AUROC / FPR95, the
    false-rejection rate, and the misclassification view."""
    near = result["near_ood"]
    extra = ["far_ood", "rg1"] if role == "test" else []
    head = [
        "detector",
        "near mean AUROC",
        *near,
        *extra,
        "ID false rejection [95 % CI]",
        "AUROC for errors",
        "errors: rejected / accepted",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in result["detectors"].items():
        r = entry[role]
        cat = r["categories"]
        mean = np.mean([cat[c]["auroc"] for c in near])
        cells = [f"{cat[c]['auroc']:.3f} / {cat[c]['fpr95']:.2f}" for c in near]
        cells += (
            [f"{cat['far_ood']['auroc']:.3f} / {cat['far_ood']['fpr95']:.2f}"]
            if role == "test"
            else []
        )
        cells += (
            [
                ("rejected" if cat["rg1"]["turned_away"] else "accepted")
                + f" (above {entry['rg1_percentile']:.0%} of ID)"
            ]
            if role == "test"
            else []
        )
        fr, rej, acc = r["false_rejection"], r["error_rejected"], r["error_accepted"]
        label = f"**{name}**" if name == result["chosen"] else name
        lines.append(
            f"| {label} | {mean:.3f} | "
            + " | ".join(cells)
            + f" | {fr['count']}/{fr['total']} = {fr['rate']:.1%} [{fr['low']:.1%}, {fr['high']:.1%}] | "
            f"{r['misclassified_auroc']:.3f} | {rej['count']}/{rej['total']} / {acc['count']}/{acc['total']} = {rej['rate']:.0%} / {acc['rate']:.0%} |"
        )
    return "\n".join(lines)


def turned_away_table(result: dict) -> str:
    """Share of each test category turned away at the certified threshold, per detector."""
    cats = [*result["near_ood"], "far_ood"]
    lines = [
        "| detector | threshold (rank of n, calibration) | " + " | ".join(cats) + " |",
        "|" + "---|" * (len(cats) + 2),
    ]
    for name, entry in result["detectors"].items():
        cat = entry["test"]["categories"]
        lines.append(
            f"| {name} | {entry['threshold']:.4g} ({entry['rank']} of {entry['held_out']}) | "
            + " | ".join(f"{cat[c]['turned_away']:.0%}" for c in cats)
            + " |"
        )
    return "\n".join(lines)


def save_seen(path: Path, seen: dict[str, Seen], labels: dict[str, np.ndarray], sets: dict) -> None:
    """The forward passes of a run, as tensors only (``--reuse`` reads them back)."""
    state = {"sets": torch.tensor(list(json.dumps(sets).encode()), dtype=torch.uint8)}
    for name, found in seen.items():
        state |= {f"{name}/logits": found.logits, f"{name}/features": found.features} | {
            f"{name}/stage{i}": x for i, x in enumerate(found.stages)
        }
    state |= {
        f"{name}/labels": torch.from_numpy(np.asarray(value)) for name, value in labels.items()
    }
    torch.save(state, path)


def load_seen(path: Path) -> tuple[dict[str, Seen], dict[str, np.ndarray], dict]:
    state = torch.load(path, weights_only=True)
    names = {key.rsplit("/", 1)[0] for key in state if key.endswith("/logits")}
    seen = {
        n: Seen(
            state[f"{n}/logits"],
            state[f"{n}/features"],
            tuple(state[f"{n}/stage{i}"] for i in range(4) if f"{n}/stage{i}" in state),
        )
        for n in names
    }
    labels = {
        key.rsplit("/", 1)[0]: value.numpy()
        for key, value in state.items()
        if key.endswith("/labels")
    }
    return seen, labels, json.loads(bytes(state["sets"].tolist()).decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="the synthetic dataset the bundle was trained from"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/ood/bench"), help="where the generated images go"
    )
    parser.add_argument(
        "--json", type=Path, help="write the results here (and per-image scores beside it, .npz)"
    )
    parser.add_argument(
        "--per-shift", type=int, default=200, help="near-OOD images per shift and role"
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=500,
        help="new in-distribution phantoms per role (0: the bundle's splits only)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the forward passes of the last run into --out (same bundle and data)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1,
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "seen.pt"
    if args.reuse and cache.exists():
        seen, labels, sets = load_seen(cache)
        model = load_bundle(args.bundle)[0]
    else:
        seen, labels, sets, model = collect(args)
        save_seen(cache, seen, labels, sets)
    result = evaluate(seen, labels, model)
    scores = result.pop("scores")
    _, contract = load_bundle(args.bundle)
    shipped = contract.ood.kind if contract.ood is not None else None
    report = {
        "bundle": str(args.bundle),
        "data": str(args.data),
        "date": datetime.date.today().isoformat(),
        "sets": sets,
        "shipped_kind": shipped,
        "shipped_threshold": None if contract.ood is None else contract.ood.threshold,
    } | result
    for role, d in result["chosen_minus_mahalanobis"].items():
        print(
            f"{role}: {result['chosen']} - mahalanobis, mean near-OOD AUROC {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (paired bootstrap)"
        )
    print(
        f"chosen on validation: {result['chosen']} ({result['rule']})\n\n## validation\n\n{table(result, 'val')}\n\n## test\n\n{table(result, 'test')}\n\n"
        f"## turned away at the certified threshold (test)\n\n{turned_away_table(result)}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        np.savez_compressed(
            args.json.with_suffix(".npz"),
            **{
                f"{d}/{k}": v.astype(np.float32)
                for d, by_set in scores.items()
                for k, v in by_set.items()
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
