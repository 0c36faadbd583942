"""Heat maps that show where a classifier looked: Grad-CAM (the paper's Fig. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grad_cam(model: nn.Module, images: Tensor, target_layer: nn.Module, classes: Tensor | None = None) -> Tensor:
    """Grad-CAM of ``classes`` (default: the predicted ones) at ``target_layer``.

    Args:
        model: a classifier whose ``forward`` returns logits.
        images: ``(B, C, H, W)`` inputs.
        target_layer: the module whose output is weighted by its gradients (for a ResNet,
            the last residual stage).
        classes: ``(B,)`` class per image.

    Returns:
        ``(B, 1, H, W)`` maps in [0, 1], each normalised by its own maximum.
    """
    activations: list[Tensor] = []
    handle = target_layer.register_forward_hook(lambda _m, _i, output: activations.append(output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = model(x)
            chosen = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
            score = logits.gather(1, chosen[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, activations[0])
    finally:
        handle.remove()
        model.train(was_training)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations[0]).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return cam / peak


def finding_index(labels: Tensor, normal: int) -> Tensor:
    """A multi-label network's output index of each class label (the normal class has none)."""
    return labels - (labels > normal).long()


def finding_maps(maps: Tensor, finding: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, 1, H, W)``: map ``finding[i]`` of each image's ``(K, h, w)`` maps, resized to ``size``."""
    chosen = maps[torch.arange(len(maps), device=maps.device), finding.to(maps.device)][:, None]
    return F.interpolate(chosen.float(), size=tuple(size), mode="bilinear", align_corners=False)


#: The residual stage whose MGACR ``map+`` the node draws and reports regions from.
HEATMAP_STAGE = 3


def localization_maps(model: nn.Module, images: Tensor, labels: Tensor, normal: int = 0) -> Tensor:
    """Each model's own answer to "where is the finding of class ``labels``?", ``(B, 1, H, W)`` in [0, 1].

    * multi-label variants (:meth:`class_maps`): the map of the image's finding (CIA-Net's
      grid probabilities; class attention scaled to its peak);
    * networks with MGACR heads: the learned ``map+`` of the stage the node draws (3, or the
      nearest with a head);
    * any other classifier: the Grad-CAM of the class, scaled to its peak.

    Thresholded at 0.5, these are the regions the node reports.
    """
    labels = labels.to(images.device)
    if hasattr(model, "class_maps"):
        _, maps = model.class_maps(images)
        return finding_maps(maps, finding_index(labels, normal).clamp_min(0), images.shape[-2:]).clamp(0, 1)
    if getattr(model, "attention_stages", ()):
        return model.attention_map(images, model.nearest_stage(HEATMAP_STAGE)).clamp(0, 1)
    return grad_cam(model, images, model.cam_layer, labels)
