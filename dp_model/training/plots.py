"""Pictures of a training run: curves, confusion matrix, ROC curves, and where the model looks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from torch import nn

from ..metrics import Report, roc_curve
from ..networks.architectures import class_scores, output_probabilities
from ..networks.explain import finding_index, finding_maps, grad_cam
from ..serving.calibration import BINS, Reliability
from .checkpoints import History
from .data import Resident
from .objectives import findings


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves(history: History, path: Path) -> Path:
    """Stage I loss and pair accuracy; stage II losses and validation metrics, per epoch; with
    MGACR, its terms at each residual stage and its weight against the classification loss."""
    stages = sorted(
        {k.split("@")[1] for k in (history.finetune[0] if history.finetune else {}) if "@" in k}
    )
    fig, axes = plt.subplots(
        1, 4 if stages else 3, figsize=(20 if stages else 15, 4.6 if stages else 3.8)
    )
    if history.pretrain:
        epochs = np.arange(1, len(history.pretrain) + 1)
        axes[0].plot(epochs, [r["loss"] for r in history.pretrain], label="NT-Xent loss")
        twin = axes[0].twinx()
        twin.plot(
            epochs, [r["top1"] for r in history.pretrain], color="tab:orange", label="pair accuracy"
        )
        twin.set_ylim(0, 1)
        twin.set_ylabel("pair accuracy")
        axes[0].legend(loc="center right")
    axes[0].set(title="stage I: contrastive pre-training", xlabel="epoch", ylabel="loss")
    epochs = np.arange(1, len(history.finetune) + 1)
    for key, label in (
        ("loss", "total"),
        ("cls", "classification"),
        ("att_pos", "L_att+"),
        ("att_neg", "L_att-"),
        ("feat_cr", "L_feat_cr"),
    ):
        if history.finetune and key in history.finetune[0]:
            axes[1].plot(epochs, [r[key] for r in history.finetune], label=label)
    axes[1].set(title="stage II: training losses", xlabel="epoch", yscale="log")
    axes[1].legend(fontsize=8)
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_macro_auc"):
        if history.finetune and key in history.finetune[0]:
            axes[2].plot(
                epochs, [r[key] for r in history.finetune], label=key[4:].replace("_", " ")
            )
    axes[2].set(title="stage II: validation", xlabel="epoch", ylim=(0, 1))
    if axes[2].lines:
        axes[2].legend(fontsize=8)
    if stages:
        for colour, stage in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], stages):
            attention = [
                r.get(f"att_pos@{stage}", np.nan) + r.get(f"att_neg@{stage}", np.nan)
                for r in history.finetune
            ]
            axes[3].plot(epochs, attention, color=colour, label=f"{stage}: L_att+ + L_att-")
            axes[3].plot(
                epochs,
                [r.get(f"feat_cr@{stage}", np.nan) for r in history.finetune],
                color=colour,
                linestyle="--",
                label=f"{stage}: L_feat_cr",
            )
        axes[3].set(title="stage II: MGACR at each residual stage", xlabel="epoch", yscale="log")
        handles, labels = axes[3].get_legend_handles_labels()
        if "mgacr" in history.finetune[0]:
            share = axes[3].twinx()
            share.plot(
                epochs,
                [r["mgacr"] / max(r["cls"], 1e-8) for r in history.finetune],
                color="black",
                linestyle=":",
                label="weighted MGACR / classification loss",
            )
            share.set_ylabel("weighted MGACR / classification loss")
            more, names = share.get_legend_handles_labels()
            handles, labels = handles + more, labels + names
        # Below the panel, in columns: with heads on four stages, nine entries hide the curves.
        axes[3].legend(
            handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2
        )
    return _save(fig, path)


def reliability(
    before: Reliability,
    after: Reliability,
    path: Path,
    scores: tuple[np.ndarray, np.ndarray] | None = None,
    gate: float | None = None,
) -> Path:
    """Reliability diagrams of the test images before and after calibration; with ``scores``
    (in-distribution, other) and the ``gate``, the out-of-distribution scores beside them."""
    fig, axes = plt.subplots(
        1, 3 if scores is not None else 2, figsize=(15 if scores is not None else 10, 4)
    )
    edges = np.linspace(0, 1, BINS + 1)
    for ax, found, title in (
        (axes[0], before, "before calibration"),
        (axes[1], after, "after temperature scaling"),
    ):
        which = np.minimum((found.confidence * BINS).astype(int), BINS - 1)
        accuracy = [
            found.correct[which == b].mean() if (which == b).any() else np.nan for b in range(BINS)
        ]
        counts = np.bincount(which, minlength=BINS)
        ax.bar(
            edges[:-1],
            accuracy,
            width=1 / BINS,
            align="edge",
            edgecolor="black",
            alpha=0.7,
            label="accuracy in the bin",
        )
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        for b in np.nonzero(counts)[0]:
            ax.text(edges[b] + 0.5 / BINS, 0.02, str(counts[b]), ha="center", fontsize=7)
        ax.set(
            title=f"{title}: ECE {found.ece:.3f} [{found.low:.3f}, {found.high:.3f}]",
            xlabel="confidence",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(loc="upper left", fontsize=8)
    if scores is not None:
        inside, outside = scores
        every = np.concatenate([inside, outside, [gate] if gate else []])
        bins = np.geomspace(max(1e-3, every.min() / 1.5), every.max() * 1.5, 40)
        axes[2].hist(inside, bins=bins, alpha=0.6, label="held-out test images")
        if len(outside):
            axes[2].hist(outside, bins=bins, alpha=0.6, label="other images")
        if gate is not None:
            axes[2].axvline(gate, color="red", label="gate")
        axes[2].set(
            xscale="log",
            title="out-of-distribution score",
            xlabel="Mahalanobis distance",
            ylabel="images",
        )
        axes[2].legend(fontsize=8)
    return _save(fig, path)


def confusion(report: Report, path: Path) -> Path:
    """The confusion matrix, normalised by row (recall on the diagonal), with counts."""
    matrix = np.asarray(report.confusion, np.float64)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(report.classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{int(count)}\n{rates[i, j]:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if rates[i, j] > 0.5 else "black",
        )
    ax.set_xticks(range(len(report.classes)), report.classes, rotation=35, ha="right")
    ax.set_yticks(range(len(report.classes)), report.classes)
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def roc(labels: np.ndarray, probabilities: np.ndarray, report: Report, path: Path) -> Path:
    """One-versus-rest ROC curve of each class."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(report.classes):
        if 0 < (labels == c).sum() < len(labels):
            fpr, tpr = roc_curve(labels == c, probabilities[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {report.per_class['auc'][c]:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="test ROC curves",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def attention_gallery(
    model: nn.Module,
    data: Resident,
    classes: tuple[str, ...],
    path: Path,
    count: int = 6,
    normal: int = 0,
    offsets: tuple[float, ...] = (),
) -> Path:
    """Test images with their radiologist boxes, the Grad-CAM of the predicted class and the
    model's own map: the supervised lesion head's, MGACR's learned ``map+``, or a multi-label
    variant's map of the image's true finding (the paper's Fig. 9). The predicted class is
    the most probable with the contract's logit adjustment (``offsets``) taken off."""
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()[:count]
    chosen = boxed if len(boxed) else torch.arange(min(count, len(data)))
    device = next(model.parameters()).device
    x = data.images[chosen.to(data.images.device)].float().div(255).to(device)
    labels = data.labels[chosen.to(data.labels.device)].cpu()
    multi_label = model.multi_label
    with torch.no_grad():
        scores = class_scores(
            output_probabilities(model, model.eval()(x), offsets), multi_label, normal
        ).cpu()
    # Grad-CAM of the predicted output (for a multi-label model: the most probable finding).
    outputs = torch.tensor(findings(classes, normal)) if multi_label else torch.arange(len(classes))
    target = scores[:, outputs].argmax(dim=1)
    cam = grad_cam(model, x, model.cam_layer, target).cpu()
    maps, caption = _learned_maps(model, x, labels, normal)
    rows = 3 if maps is not None else 2
    fig, axes = plt.subplots(
        rows, len(chosen), figsize=(2.4 * len(chosen), 2.5 * rows), squeeze=False
    )
    for col, index in enumerate(chosen.tolist()):
        image = x[col, 0].cpu().numpy()
        predicted = int(scores[col].argmax())
        axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        for x0, y0, x1, y1 in data.boxes[index].cpu().tolist():
            if x1 > x0:
                axes[0, col].add_patch(
                    Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1)
                )
        axes[0, col].set_title(f"true {classes[int(data.labels[index])]}", fontsize=8)
        axes[1, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(cam[col, 0].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[1, col].set_title(
            f"Grad-CAM: {classes[predicted]} {float(scores[col, predicted]):.2f}", fontsize=8
        )
        if maps is not None:
            axes[2, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[2, col].imshow(maps[col, 0].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[2, col].set_title(caption, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


def _learned_maps(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, normal: int
) -> tuple[torch.Tensor | None, str]:
    """The model's own map of each image at the input size, and what it is."""
    if model.lesion_stage:
        return model.lesion_map(x).cpu(), "lesion head (box-supervised)"
    if model.attention_stages:
        return model.attention_map(x).cpu(), "learned map+ (MGACR)"
    if not model.has_class_maps:
        return None, ""
    _, maps = model.class_maps(x)
    # The map of the image's own finding; a normal image shows the most active one.
    finding = torch.where(
        labels == normal,
        maps.flatten(2).amax(dim=2).argmax(dim=1).cpu(),
        finding_index(labels, normal),
    )
    return (
        finding_maps(maps, finding, x.shape[-2:]).cpu(),
        "class-aware grid of the true finding"
        if model.maps_are_detections
        else "class attention of the true finding",
    )


def class_attention_maps(
    model: nn.Module, data: Resident, classes: tuple[str, ...], path: Path, normal: int = 0
) -> Path:
    """Per-finding maps of a multi-label model (the class attention paper's Fig. 2 and 3).

    Row ``c`` shows a test image of finding ``c`` and the map of every finding on it: a
    class-specific model lights up its own finding's map. The last row averages each
    finding's map over the test images whose label is that finding.
    """
    outputs = findings(classes, normal)
    device = next(model.parameters()).device
    examples, averages = [], []
    for c in outputs:
        members = torch.nonzero(data.labels.cpu() == c).flatten()
        if not len(members):
            examples.append(None)
            averages.append(None)
            continue
        x = data.images[members.to(data.images.device)].float().div(255).to(device)
        _, maps = model.class_maps(x)
        maps = torch.nn.functional.interpolate(
            maps.float(), size=x.shape[-2:], mode="bilinear", align_corners=False
        ).cpu()
        examples.append((x[0, 0].cpu().numpy(), maps[0].numpy()))
        averages.append(
            (x[:, 0].mean(dim=0).cpu().numpy(), maps[:, outputs.index(c)].mean(dim=0).numpy())
        )
    k = len(outputs)
    fig, axes = plt.subplots(k + 1, k + 1, figsize=(1.9 * (k + 1), 2.0 * (k + 1)), squeeze=False)
    for row, c in enumerate(outputs):
        axes[row, 0].set_title(f"a {classes[c]} image", fontsize=8)
        if examples[row] is None:
            continue
        image, maps = examples[row]
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        for col in range(k):
            axes[row, col + 1].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col + 1].imshow(
                maps[col], cmap="jet", alpha=0.45, vmin=0, vmax=max(1e-6, float(maps.max()))
            )
            axes[row, col + 1].set_title(
                f"map: {classes[outputs[col]]}",
                fontsize=8,
                fontweight="bold" if col == row else "normal",
            )
    axes[k, 0].set_title("average maps", fontsize=8)
    for col, entry in enumerate(averages):
        if entry is not None:
            image, mean_map = entry
            axes[k, col + 1].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[k, col + 1].imshow(mean_map, cmap="jet", alpha=0.45)
            axes[k, col + 1].set_title(
                f"mean {classes[outputs[col]]} map\non {classes[outputs[col]]} images", fontsize=7
            )
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)
