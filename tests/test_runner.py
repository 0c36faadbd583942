"""One runner of a bundle (:class:`dp_model.serving.runner.Runner`) behind the node and the bundle's
own configs: the same numbers from both, maps only when asked, and a device that cannot be
used refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from dp_model.serving.inference import Predictor
from dp_model.serving.runner import Runner, choose_device
from pacs_node.model.predictor import NodePredictor, prepare


def _sample(bundle: Path) -> Path:
    return min((bundle / "samples").glob("*.dcm"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is usable here")
def test_a_cuda_device_where_none_is_usable_is_refused_in_one_line_and_auto_takes_the_cpu() -> None:
    with pytest.raises(ValueError, match=r"device cuda:1: no CUDA GPU is usable here"):
        choose_device("cuda:1")
    with pytest.raises(ValueError, match=r"device gpu: not a device"):
        choose_device("gpu")
    assert choose_device("auto") == torch.device("cpu") == choose_device(torch.device("cpu"))


def test_maps_come_only_when_asked_and_do_not_change_the_probabilities_or_the_scores(
    demo_bundle: Path,
) -> None:
    plain, mapped = (
        Runner(bundle=demo_bundle, device="cpu"),
        Runner(bundle=demo_bundle, device="cpu", maps=True),
    )
    canvas = prepare(dcmread(_sample(demo_bundle)), plain.contract.image_size).canvas
    batch = np.stack([canvas, canvas[..., ::-1]])
    without, with_maps = plain.run(batch), mapped.run(batch)
    assert plain.source is None and without.maps is None
    assert with_maps.maps is not None and with_maps.maps.shape[:2] in ((2, 1), (2, 2))
    assert without.probabilities.shape == (2, len(plain.contract.output_classes))
    np.testing.assert_allclose(without.probabilities, with_maps.probabilities, atol=1e-6)
    assert without.ood_scores is not None and with_maps.ood_scores is not None
    np.testing.assert_allclose(without.ood_scores, with_maps.ood_scores, rtol=1e-5)


def test_the_bundles_predictor_and_the_node_give_the_same_numbers_for_an_image(
    demo_bundle: Path,
) -> None:
    sample = _sample(demo_bundle)
    predictor, node = Predictor(str(demo_bundle)), NodePredictor(demo_bundle, "cpu")
    probabilities, problems = predictor.probabilities([sample])
    (answer,) = node.predict([prepare(dcmread(sample), node.contract.image_size)])
    assert not problems
    np.testing.assert_allclose(probabilities[0], answer.probabilities, atol=1e-5)
    assert answer.ood_score == pytest.approx(predictor.ood_scores[0], rel=1e-4)
    assert predictor.assessed == [answer.assessed]


def test_a_network_of_the_bundles_configs_runs_with_the_bundles_weights(demo_bundle: Path) -> None:
    """The MONAI configs build their own ``network`` and hand it to the Predictor."""
    own = Predictor(str(demo_bundle))
    network = own.contract.network()
    given = Predictor(str(demo_bundle), network=network)
    assert given.model is network and not network.training
    sample = _sample(demo_bundle)
    np.testing.assert_allclose(
        given.probabilities([sample])[0], own.probabilities([sample])[0], atol=1e-6
    )
    # the bundle's own may run its ONNX graph, which agrees with PyTorch within 1e-4
    assert given.ood_scores == pytest.approx(own.ood_scores, rel=1e-4)
