"""Networks: ResNet18 equals torchvision's, MGACR costs nothing at inference, SimCLR transfers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

from dp_model.networks.networks import DeepPneumoniaNet, SimCLRNet, resnet18


def torchvision_resnet18(num_classes: int = 5) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def test_resnet18_is_torchvisions() -> None:
    ours, reference = resnet18(1, 5).eval(), torchvision_resnet18().eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 224, 224)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def test_stage_resolutions_at_224() -> None:
    net = DeepPneumoniaNet().eval()
    shapes = [tuple(f.shape[1:]) for f in net.stage_features(torch.randn(1, 1, 224, 224))]
    assert shapes == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


@pytest.mark.parametrize("train", [False, True])
def test_forward_returns_logits_only_and_never_runs_the_heads(train: bool) -> None:
    net = DeepPneumoniaNet(num_classes=5).train(train)
    calls = []
    for head in net.heads.values():
        head.register_forward_hook(lambda *args: calls.append(1))
    out = net(torch.randn(2, 1, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    assert not calls
    plain = resnet18(1, 5).train(train)
    plain.load_state_dict(net.backbone.state_dict())
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(net.eval()(x), plain.eval()((x - 0.5) / 0.25))


def test_forward_train_gives_maps_for_each_chosen_stage() -> None:
    net = DeepPneumoniaNet(attention_stages=(2, 4))
    logits, stages = net.forward_train(torch.randn(3, 1, 96, 96))
    assert logits.shape == (3, 5) and len(stages) == 2
    assert [s.features.shape[1] for s in stages] == [128, 512]
    for stage in stages:
        assert stage.map_pos.shape == (3, 1, *stage.features.shape[-2:])
        assert stage.map_pos.min().item() > 0 and stage.map_pos.max().item() < 1


def test_train_path_logits_equal_the_inference_logits() -> None:
    net = DeepPneumoniaNet().eval()
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(net.forward_train(x)[0], net(x))


def test_the_lesion_head_gives_logits_on_its_stage_only_and_leaves_the_classifier_alone() -> None:
    torch.manual_seed(0)
    net = DeepPneumoniaNet(attention_stages=(1, 2, 3), lesion_stage=2).eval()
    x = torch.rand(2, 1, 64, 64)
    logits, stages = net.forward_train(x)
    assert [s.lesion is not None for s in stages] == [False, True, False]
    assert stages[1].lesion.shape == (2, 1, 8, 8)
    torch.testing.assert_close(logits, net(x))
    heat = net.lesion_map(x)
    assert heat.shape == (2, 1, 64, 64) and float(heat.min()) > 0 and float(heat.max()) < 1
    # The head's weights travel in the state dict; a network without the head has none.
    assert (
        "lesion_head.weight" in net.state_dict()
        and "lesion_head.weight" not in DeepPneumoniaNet().state_dict()
    )
    with pytest.raises(ValueError, match="lesion_stage"):
        DeepPneumoniaNet(attention_stages=(1, 3), lesion_stage=2)


def test_attention_map_and_plain_network() -> None:
    net = DeepPneumoniaNet().eval()
    assert net.attention_map(torch.randn(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    plain = DeepPneumoniaNet(attention_stages=())
    assert len(plain.heads) == 0 and plain.forward_train(torch.randn(1, 1, 64, 64))[1] == []
    with pytest.raises(ValueError, match="attention_stages"):
        DeepPneumoniaNet(attention_stages=(0, 5))


def test_simclr_encoder_weights_initialise_the_classifier() -> None:
    simclr = SimCLRNet(projection_dim=32)
    assert simclr(torch.randn(4, 1, 64, 64)).shape == (4, 32)
    net = DeepPneumoniaNet()
    missing, unexpected = net.backbone.load_state_dict(simclr.encoder_state(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    torch.testing.assert_close(net.backbone.conv1.weight, simclr.encoder.conv1.weight)


# --- the attention-enhanced ResNet-50 (seed 004) and the architecture registry --------------------


def test_side_branch_attention_keeps_the_shape_and_fuses_by_addition() -> None:
    from dp_model.networks.networks import SideBranchAttention

    branch = SideBranchAttention(32).eval()
    for size in ((14, 14), (7, 9)):  # odd sizes: the transposed convolution overshoots by one
        x = torch.randn(2, 32, *size)
        channel, spatial = branch.maps(x)
        assert channel.shape == (2, 32, 1, 1) and spatial.shape == (2, 1, *size)
        assert channel.min() > 0 and channel.max() < 1 and spatial.min() > 0 and spatial.max() < 1
        torch.testing.assert_close(branch(x), x + x * channel + x * spatial)


def test_attention_resnet50_classifies_one_channel_images_and_names_its_cam_layer() -> None:
    from dp_model.networks.architectures import build_network
    from dp_model.networks.explain import grad_cam
    from dp_model.networks.networks import AttentionResNet50, SideBranchAttention

    model = build_network("attention_resnet50", 3).eval()
    assert isinstance(model, AttentionResNet50)
    assert sum(isinstance(m, SideBranchAttention) for m in model.modules()) == 4
    x = torch.rand(2, 1, 64, 64)
    assert model(x).shape == (2, 3)
    assert grad_cam(model, x, model.cam_layer).shape == (2, 1, 64, 64)


def test_build_network_knows_every_architecture_and_refuses_the_rest() -> None:
    from dp_model.networks.architectures import build_network
    from dp_model.networks.networks import BaselineNet, DeepPneumoniaNet

    assert isinstance(build_network("resnet18", 5, (3, 4)), DeepPneumoniaNet)
    assert isinstance(build_network("vgg16", 5), BaselineNet)
    with pytest.raises(ValueError, match="MGACR attention heads need the resnet18"):
        build_network("resnet50", 5, (3,))
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_network("resnet1000", 5)


#: Constructor options that keep an entry small enough for a unit test (none for most).
TINY = {"cia_net": {"image_size": 64, "bank_size": 4}}


@pytest.mark.parametrize(
    "name", list(__import__("dp_model.networks.registry", fromlist=["ARCHITECTURES"]).ARCHITECTURES)
)
def test_every_registered_architecture_builds_and_gives_the_classifier_interface(name: str) -> None:
    """Walks the registry: a new entry is checked here without editing this test."""
    from dp_model.networks.classifier import Classifier, ClassifierBase
    from dp_model.networks.explain import cam, grad_cam, map_sources
    from dp_model.networks.registry import ARCHITECTURES

    entry = ARCHITECTURES[name]
    assert entry.name == name and entry.description.strip() and "\n" not in entry.description
    torch.manual_seed(0)
    net = entry.build(3, **TINY.get(name, {})).eval()
    assert isinstance(net, Classifier) and isinstance(net, ClassifierBase)
    assert net.multi_label == entry.multi_label
    assert net.cam_layer in set(net.modules())
    assert net.classifier_layer is None or isinstance(net.classifier_layer, torch.nn.Linear)
    x = torch.rand(2, 1, 64, 64)
    if net.needs_references:
        net.set_references((torch.rand(4, 1, 64, 64) * 255).to(torch.uint8))
    else:
        with pytest.raises(ValueError, match="contrasts with no reference images"):
            net.set_references(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with torch.no_grad():
        assert net(x).shape == (2, 3)
    if net.has_class_maps:
        logits, maps = net.class_maps(x)
        assert logits.shape == (2, 3) and maps.shape[:2] == (2, 3)
    else:
        with pytest.raises(ValueError, match="draws no maps of its own"):
            net.class_maps(x)
    assert grad_cam(net, x, net.cam_layer).shape == (2, 1, 64, 64)
    assert "grad_cam" in map_sources(net) and ("cam" in map_sources(net)) == net.cam_exact
    if net.cam_exact:  # logits = W . mean(cam_layer): Grad-CAM's weights are W / hw, the same map
        net.eval()
        assert torch.allclose(cam(net, x), grad_cam(net, x, net.cam_layer), atol=1e-4), name


def test_attention_entries_take_mgacr_heads_and_the_others_refuse_them() -> None:
    from dp_model.networks.registry import ARCHITECTURES, build_network

    for name, entry in ARCHITECTURES.items():
        if entry.attention:
            assert build_network(name, 3, (3,), **TINY.get(name, {})).attention_stages == (3,)
        else:
            with pytest.raises(ValueError, match="MGACR attention heads need"):
                build_network(name, 3, (3,), **TINY.get(name, {}))


def test_a_torchvision_network_whose_logits_come_from_a_convolution_has_no_classifier_layer() -> (
    None
):
    """SqueezeNet ends in a convolution, not an ``nn.Linear``: it trains and draws Grad-CAM, and
    has no penultimate layer for the out-of-distribution gate, as the interface says (None),
    rather than an IndexError from looking for a linear layer it does not have."""
    from dp_model.networks.classifier import Classifier
    from dp_model.networks.explain import grad_cam, map_sources
    from dp_model.networks.networks import BaselineNet
    from dp_model.serving.ood import classifier_layer

    torch.manual_seed(0)
    net = BaselineNet("squeezenet1_0", num_classes=3, cam_layer="features").eval()
    assert isinstance(net, Classifier)
    assert net.classifier_layer is None and classifier_layer(net) is None
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (2, 3)
    assert map_sources(net) == ("grad_cam",)
    assert grad_cam(net, x, net.cam_layer).shape == (2, 1, 64, 64)


def test_two_entries_of_one_name_are_refused_not_the_later_kept() -> None:
    """A second entry under a taken name (a copied entry left unrenamed) would replace the
    first in the table without a word, and configs naming it would train the other network."""
    from dp_model.networks.registry import ARCHITECTURES, Architecture, by_name

    first = ARCHITECTURES["resnet50"]
    copy = Architecture(
        name="resnet50",
        network="dp_model.networks.networks:BaselineNet",
        arguments={"architecture": "resnet101", "cam_layer": "layer4"},
        description="ResNet-101.",
    )
    with pytest.raises(ValueError, match="'resnet50' is registered twice"):
        by_name([first, ARCHITECTURES["vgg16"], copy])
    assert by_name([first, ARCHITECTURES["vgg16"]]) == {
        "resnet50": first,
        "vgg16": ARCHITECTURES["vgg16"],
    }


def test_the_old_paths_that_bundle_configs_name_give_the_same_objects_with_a_dated_warning() -> (
    None
):
    """Configs of bundles written before 2026-12-01 name ``dp_model.networks.build_network``
    and ``dp_model.bundle.Predictor``, those written before 2026-12-06
    ``dp_model.architectures.build_network`` and ``dp_model.inference.Predictor``; each
    resolves, until 0.2.0, to the very object of its new home, and says where that is
    (``tests/test_old_paths.py`` has every old module and the demo bundle's configs)."""
    from monai.utils.module import locate  # how a bundle config resolves its _target_

    import dp_model.networks.architectures
    import dp_model.serving.inference

    for old in ("dp_model.architectures", "dp_model.bundle", "dp_model.inference"):
        sys.modules.pop(old, None)  # imported before: import it afresh, as a new process would
    build, predictor = (
        dp_model.networks.architectures.build_network,
        dp_model.serving.inference.Predictor,
    )
    with pytest.warns(
        DeprecationWarning, match=r"dp_model\.networks\.networks.*2026-12-06.*0\.2\.0"
    ):
        assert locate("dp_model.networks.build_network") is build
    for old, new in [
        ("dp_model.architectures.build_network", build),
        ("dp_model.bundle.Predictor", predictor),
        ("dp_model.inference.Predictor", predictor),
    ]:
        with pytest.warns(
            DeprecationWarning, match="moved to dp_model.(networks|serving).* on 2026-12-06"
        ):
            assert locate(old) is new


def test_the_registry_and_the_training_config_need_no_pytorch() -> None:
    """``dp-train --help`` and config validation read the registry before PyTorch is loaded."""
    code = "import sys, dp_model.networks.registry, dp_model.training.config; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr[-1000:]


def _readme_example_entry() -> object:
    """The registry entry that README.md's "Adding a network" shows, as written there."""
    from dp_model.networks.registry import Architecture

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Adding a network", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    table: dict = {}
    exec(code, {"Architecture": Architecture, "by_name": lambda entries: entries}, table)
    (entry,) = [e for e in table["ARCHITECTURES"] if e is not ...]
    return entry


def _readme_example_config() -> dict:
    """The training configuration README.md's "Adding a network" gives for the entry."""
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Adding a network", 1)[1]
    return yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])


def test_the_torchvision_classifier_the_readme_adds_as_one_entry_trains_and_draws_maps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torchvision classifier the registry does not hold is one
    :class:`~dp_model.networks.networks.BaselineNet` entry: registered at run time (nothing else
    edited), the training config accepts it, stage II builds it, one optimizer step moves its
    weights, and Grad-CAM and CAM (which it declares exact) draw the same maps."""
    from dp_model.config import from_mapping
    from dp_model.networks.explain import cam, grad_cam, map_sources
    from dp_model.networks.registry import ARCHITECTURES
    from dp_model.training.config import TrainConfig
    from dp_model.training.objectives import build_classifier, classification_loss, make_optimizer

    entry = _readme_example_entry()
    assert entry.name == "efficientnet_b0" and entry.name not in ARCHITECTURES  # a new network
    monkeypatch.setitem(ARCHITECTURES, entry.name, entry)
    given = _readme_example_config()
    with pytest.raises(ValueError, match="pretrain.enabled: false"):
        from_mapping(TrainConfig, {"finetune": given["finetune"]})  # pre-training left on
    with pytest.raises(ValueError, match="switch mgacr.attention and mgacr.feature_cr off"):
        from_mapping(
            TrainConfig, {"pretrain": given["pretrain"], "finetune": {"architecture": entry.name}}
        )
    config = replace(from_mapping(TrainConfig, given).finetune, lr=0.01)
    net = build_classifier(config, 3, None, seed=0, image_size=32).train()
    assert net.net.features[0][0].in_channels == 1
    assert net.classifier_layer is net.net.classifier[1] and net.cam_layer is net.net.features
    loss_fn, optimizer = (
        classification_loss(config, [5, 3, 2], ["normal", "a", "b"]),
        make_optimizer(config, net),
    )
    before = net.classifier_layer.weight.detach().clone()
    loss = loss_fn(net(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.classifier_layer.weight)
    assert grad_cam(net, torch.rand(2, 1, 32, 32), net.cam_layer).shape == (2, 1, 32, 32)
    # Fresh batch-norm statistics shrink the eval-mode activations of EfficientNet's 16 blocks
    # to about 1e-13, under the maps' normalisation floor: take one batch's, as training does.
    x = torch.rand(2, 1, 64, 64)  # 2 x 2 maps at the last stage
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics become this batch's exactly
    with torch.no_grad():
        net.train()(x)
    assert "cam" in map_sources(net.eval())
    assert torch.allclose(cam(net, x), grad_cam(net, x, net.cam_layer), atol=1e-4)


class _ToyNet(torch.nn.Module):
    """A multi-label network of a throwaway registry entry: one linear layer of ``width`` features."""

    multi_label = True

    def __init__(self, num_classes: int, width: int, pooled: bool) -> None:
        super().__init__()
        self.width, self.pooled, self.encoder = width, pooled, None
        self.fc = torch.nn.Linear(width, num_classes)

    def load_encoder(self, encoder: dict[str, torch.Tensor]) -> None:
        self.encoder = encoder


class _ToyLoss(torch.nn.Module):
    def __init__(self, counts: list[int], names: list[str], total: int, weight: float) -> None:
        super().__init__()
        self.counts, self.names, self.total, self.weight = counts, names, total, weight


def _toy_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module of the toy entry's rules, found by the ``"module:function"`` names its entry gives."""
    import types

    module = types.ModuleType("toy_architecture")
    module.ToyNet = _ToyNet
    module.options = lambda config, image_size: {"width": image_size // 16, "pooled": True}
    module.loss = lambda config, counts, names, total: _ToyLoss(counts, names, total, config.lr)
    module.offsets = lambda config, counts, normal: (float(normal), float(sum(counts)))
    module.card = lambda config: __import__(
        "dp_model.training.card", fromlist=["CardText"]
    ).CardText(description=f"Toy with lr {config.finetune.lr}.", loss="- loss: the toy's own")
    monkeypatch.setitem(sys.modules, "toy_architecture", module)


def test_a_new_registry_entry_brings_its_own_options_loss_offsets_and_card_to_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stage II reads every per-network rule from the entry: a network whose paper defines its
    own loss and constructor options is one registry entry, with no training code naming it."""
    from dp_model.networks.registry import ARCHITECTURES, Architecture
    from dp_model.training import card
    from dp_model.training.config import FinetuneConfig, MGACRConfig, PretrainConfig, TrainConfig
    from dp_model.training.objectives import (
        build_classifier,
        logit_adjustment,
        network_options,
        stage_two_loss,
    )

    _toy_module(monkeypatch)
    entry = Architecture(
        name="toy",
        network="toy_architecture:ToyNet",
        description="A toy network.",
        multi_label=True,
        pretrainable=True,
        options="toy_architecture:options",
        loss="toy_architecture:loss",
        logit_adjustment="toy_architecture:offsets",
        card="toy_architecture:card",
    )
    monkeypatch.setitem(ARCHITECTURES, "toy", entry)
    off = MGACRConfig(attention=False, feature_cr=False)
    config = FinetuneConfig(architecture="toy", mgacr=off, lr=0.25)
    assert network_options(config, 64) == {"width": 4, "pooled": True}
    encoder = {"conv1.weight": torch.zeros(1)}
    net = build_classifier(config, 3, encoder, seed=0, image_size=64)
    assert isinstance(net, _ToyNet) and (net.width, net.pooled) == (4, True)
    assert net.fc.out_features == 2 and net.encoder is encoder  # the findings alone
    loss = stage_two_loss(config, [5, 3, 2], ["normal", "a", "b"])
    assert (loss.counts, loss.names, loss.total, loss.weight) == ([3, 2], ["a", "b"], 10, 0.25)
    assert logit_adjustment(config, [5, 3, 2], 0) == (0.0, 10.0)
    run = TrainConfig(finetune=config, pretrain=PretrainConfig(enabled=False))
    assert card.describe(run) == "Toy with lr 0.25."
    assert (
        card.summary(run)
        == "Pneumonia type recognition on frontal chest radiographs. A toy network."
    )
    assert "- loss: the toy's own" in card._recipe(run)
    # a plain entry (no rules of its own) trains with the configured classification loss
    plain = Architecture(name="toy", network="toy_architecture:ToyNet", description="A toy.")
    monkeypatch.setitem(ARCHITECTURES, "toy", plain)
    assert network_options(config, 64) == {} and logit_adjustment(config, [5, 3, 2], 0) == ()
    assert isinstance(stage_two_loss(config, [5, 3, 2], ["normal", "a", "b"]), torch.nn.Module)
    assert card.describe(run) == "A toy."


@pytest.mark.parametrize(
    "name", list(__import__("dp_model.networks.registry", fromlist=["ARCHITECTURES"]).ARCHITECTURES)
)
def test_every_training_rule_an_entry_names_is_a_function_and_multi_label_ones_name_a_loss(
    name: str,
) -> None:
    """A misspelt ``"module:function"`` would otherwise surface only when that network trains."""
    from dp_model.networks.registry import ARCHITECTURES, resolve

    entry = ARCHITECTURES[name]
    rules = (entry.options, entry.loss, entry.logit_adjustment, entry.card)
    assert all(callable(resolve(rule)) for rule in rules if rule is not None)
    assert entry.loss is not None or not entry.multi_label
