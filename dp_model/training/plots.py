"""Pictures of a training run: curves, confusion matrix, ROC curves, and where the model looks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..explain import grad_cam  # noqa: E402
from ..metrics import Report, roc_curve  # noqa: E402
from torch import nn  # noqa: E402
from .data import Resident  # noqa: E402
from .engine import History  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves(history: History, path: Path) -> Path:
    """Stage I loss and pair accuracy; stage II losses and validation metrics, per epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    if history.pretrain:
        epochs = np.arange(1, len(history.pretrain) + 1)
        axes[0].plot(epochs, [r["loss"] for r in history.pretrain], label="NT-Xent loss")
        twin = axes[0].twinx()
        twin.plot(epochs, [r["top1"] for r in history.pretrain], color="tab:orange", label="pair accuracy")
        twin.set_ylim(0, 1)
        twin.set_ylabel("pair accuracy")
        axes[0].legend(loc="center right")
    axes[0].set(title="stage I: contrastive pre-training", xlabel="epoch", ylabel="loss")
    epochs = np.arange(1, len(history.finetune) + 1)
    for key, label in (("loss", "total"), ("cls", "classification"), ("att_pos", "L_att+"), ("att_neg", "L_att-"), ("feat_cr", "L_feat_cr")):
        if history.finetune and key in history.finetune[0]:
            axes[1].plot(epochs, [r[key] for r in history.finetune], label=label)
    axes[1].set(title="stage II: training losses", xlabel="epoch", yscale="log")
    axes[1].legend(fontsize=8)
    for key in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_macro_auc"):
        if history.finetune and key in history.finetune[0]:
            axes[2].plot(epochs, [r[key] for r in history.finetune], label=key[4:].replace("_", " "))
    axes[2].set(title="stage II: validation", xlabel="epoch", ylim=(0, 1))
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
        ax.text(j, i, f"{int(count)}\n{rates[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
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
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC curves", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def attention_gallery(model: nn.Module, data: Resident, classes: tuple[str, ...], path: Path, count: int = 6) -> Path:
    """Test images with their radiologist boxes, the Grad-CAM of the predicted class and,
    when the model has MGACR heads, its learned ``map+`` (the paper's Fig. 9)."""
    boxed = torch.nonzero(data.has_boxes.cpu()).flatten()[:count]
    chosen = boxed if len(boxed) else torch.arange(min(count, len(data)))
    device = next(model.parameters()).device
    x = data.images[chosen.to(data.images.device)].float().div(255).to(device)
    cam = grad_cam(model, x, model.cam_layer).cpu()
    maps = model.attention_map(x).cpu() if getattr(model, "attention_stages", ()) else None
    with torch.no_grad():
        probabilities = model.eval()(x).softmax(dim=1).cpu()
    rows = 3 if maps is not None else 2
    fig, axes = plt.subplots(rows, len(chosen), figsize=(2.4 * len(chosen), 2.5 * rows), squeeze=False)
    for col, index in enumerate(chosen.tolist()):
        image = x[col, 0].cpu().numpy()
        predicted = int(probabilities[col].argmax())
        axes[0, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        for x0, y0, x1, y1 in data.boxes[index].cpu().tolist():
            if x1 > x0:
                axes[0, col].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1))
        axes[0, col].set_title(f"true {classes[int(data.labels[index])]}", fontsize=8)
        axes[1, col].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[1, col].imshow(cam[col, 0].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[1, col].set_title(f"Grad-CAM: {classes[predicted]} {float(probabilities[col, predicted]):.2f}", fontsize=8)
        if maps is not None:
            axes[2, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[2, col].imshow(maps[col, 0].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[2, col].set_title("learned map+ (MGACR)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)
