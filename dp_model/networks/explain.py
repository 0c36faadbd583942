"""Heat maps that show where a classifier looked: Grad-CAM (the paper's Fig. 9), CAM, and the
networks' own maps, each a named *map source* that training measures and a bundle's contract
names (:data:`MAP_SOURCES`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..serving.sources import CAM, CLASS_MAPS, GRAD_CAM, HEATMAP_STAGE, MAP_SOURCES

__all__ = [
    "CAM",
    "CLASS_MAPS",
    "GRAD_CAM",
    "HEATMAP_STAGE",
    "MAP_SOURCES",
    "cam",
    "cam_maps",
    "default_source",
    "finding_index",
    "finding_maps",
    "grad_cam",
    "localization_maps",
    "map_sources",
    "output_maps",
    "same_pass_maps",
    "source_maps",
    "source_stage",
    "stage_map",
]


def grad_cam(
    model: nn.Module, images: Tensor, target_layer: nn.Module, classes: Tensor | None = None
) -> Tensor:
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
    if model.has_class_maps:
        _, maps = model.class_maps(images)
        return finding_maps(
            maps, finding_index(labels, normal).clamp_min(0), images.shape[-2:]
        ).clamp(0, 1)
    if model.attention_stages:
        return model.attention_map(images, model.nearest_stage(HEATMAP_STAGE)).clamp(0, 1)
    return grad_cam(model, images, model.cam_layer, labels)


# --- map sources: every map a network offers, by name ----------------------------------------------


def map_sources(model: nn.Module) -> tuple[str, ...]:
    """The map sources ``model`` offers, in :data:`MAP_SOURCES` order.

    CAM (Zhou et al. 2016) is offered only where it is exact: a network that declares
    ``cam_exact``, whose logits are one linear layer over the global average of
    ``cam_layer``'s output, so that the class map is that layer's weights applied pixel by pixel.
    """
    found = [f"map+:{s}" for s in sorted(model.attention_stages)]
    if model.lesion_stage:
        found.append(f"lesion:{model.lesion_stage}")
    if model.has_class_maps:
        found.append(CLASS_MAPS)
    if model.cam_layer is not None:
        # every network names one; a stand-in of learned maps alone may not
        found.append(GRAD_CAM)
    if model.cam_exact:
        found.append(CAM)
    return tuple(found)


def default_source(model: nn.Module, stage: int = HEATMAP_STAGE) -> str:
    """The source of bundles that name none: the per-finding maps, else ``map+`` of the head
    nearest ``stage``, else Grad-CAM (what the node drew before sources were measured)."""
    if model.has_class_maps:
        return CLASS_MAPS
    if model.attention_stages:
        return f"map+:{model.nearest_stage(stage)}"
    return GRAD_CAM


def source_stage(source: str) -> int | None:
    """The residual stage of a ``map+`` or lesion-head source (None for the others)."""
    return int(source.split(":")[1]) if source.startswith(("map+:", "lesion:")) else None


def stage_map(output, source: str) -> Tensor:
    """The map of a ``map+`` or lesion-head ``source`` from its stage's training outputs
    (:class:`~dp_model.networks.networks.StageOutput`), at the stage's resolution, in [0, 1]."""
    return output.lesion.sigmoid() if source.startswith("lesion:") else output.map_pos


@torch.no_grad()
def cam(model: nn.Module, images: Tensor, classes: Tensor | None = None) -> Tensor:
    """CAM of ``classes`` (default: the predicted ones): the classifier's weights of the class
    applied to ``cam_layer``'s output, ReLU, scaled to each map's peak, ``(B, 1, H, W)``.

    Exact only for a network with ``cam_exact`` (:func:`map_sources`).
    """
    activations: list[Tensor] = []
    handle = model.cam_layer.register_forward_hook(
        lambda _m, _i, output: activations.append(output)
    )
    was_training = model.training
    model.eval()
    try:
        logits = model(images)
    finally:
        handle.remove()
        model.train(was_training)
    chosen = logits.argmax(dim=1) if classes is None else classes.to(logits.device)
    return cam_maps(activations[0], model.classifier_layer.weight, chosen, images.shape[-2:])


def cam_maps(activations: Tensor, weight: Tensor, chosen: Tensor, size) -> Tensor:
    """CAM from ``cam_layer``'s ``activations`` ``(B, C, h, w)``: row ``chosen[i]`` of the
    classifier's ``weight`` applied pixel by pixel, ReLU, resized to ``size``, scaled to each
    map's peak. Apart from :func:`cam` so that one forward pass can give both the logits and
    the maps (the node's ONNX graph, :mod:`dp_model.serving.onnx_graph`)."""
    weights = weight[chosen].float()  # (B, C)
    maps = F.relu(torch.einsum("bc,bchw->bhw", weights, activations.float()))[:, None]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps / maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def same_pass_maps(
    model: nn.Module, images: Tensor, source: str | None
) -> tuple[Tensor, Tensor | None]:
    """The logits of ``images`` and the maps of ``source`` that come from the same forward
    pass (class maps, ``map+``, the lesion head); None for the other sources, which need
    passes of their own (CAM, Grad-CAM: :func:`output_maps`), and for no source."""
    if source == CLASS_MAPS:
        return model.class_maps(images)
    stage = None if source is None else source_stage(source)
    if stage is None:
        return model(images), None
    # map+ and lesion: sources are offered by the MGACR network only (map_sources).
    logits, outputs = model.forward_train(images)
    assert source is not None
    return logits, stage_map(outputs[model.attention_stages.index(stage)], source)


def output_maps(
    model: nn.Module, images: Tensor, source: str, outputs: Tensor | None = None
) -> Tensor:
    """The maps of a gradient or weight source (:data:`GRAD_CAM`, :data:`CAM`) for output
    indices ``outputs`` (default: the most probable output), ``(B, 1, H, W)`` in [0, 1]."""
    if source == GRAD_CAM:
        return grad_cam(model, images, model.cam_layer, outputs)
    if source == CAM:
        return cam(model, images, outputs)
    raise ValueError(f"map source {source!r} is no gradient or weight source ({GRAD_CAM}, {CAM})")


@torch.no_grad()
def _own_maps(model: nn.Module, images: Tensor, source: str, finding: Tensor) -> Tensor:
    if source == CLASS_MAPS:
        _, maps = model.class_maps(images)
        return finding_maps(maps, finding, images.shape[-2:])
    if source.startswith("lesion:"):
        return model.lesion_map(images)
    return model.attention_map(images, source_stage(source))


def source_maps(
    model: nn.Module, images: Tensor, source: str, labels: Tensor, normal: int = 0
) -> Tensor:
    """The maps of ``source`` for the images' classes ``labels`` (dataset class indices), as
    evaluation hands them: the true class, ``(B, 1, H, W)`` in [0, 1]. ``map+`` ignores the class."""
    if source not in map_sources(model):
        raise ValueError(
            f"map source {source!r} is not offered by this network ({', '.join(map_sources(model))})"
        )
    labels = labels.to(images.device)
    outputs = finding_index(labels, normal).clamp_min(0) if model.multi_label else labels
    if source in (GRAD_CAM, CAM):
        return output_maps(model, images, source, outputs)
    return _own_maps(model, images, source, outputs).clamp(0, 1)
