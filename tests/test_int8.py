"""The graph's 8-bit copy: kept only where no served decision changes on the validation split,
opened only against the digest its contract records, served only when asked, and results
served by it are other results (their own UIDs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from node_support import chest_dataset, final_lines, send, start_node, wait_for

from dp_model.serving import quantized
from dp_model.serving.contract import ModelContract
from dp_model.serving.loading import BundleError, load_contract
from dp_model.serving.onnx_session import file_digest, onnx_path
from dp_model.serving.runner import Runner
from pacs_node.config import ENGINES as NODE_ENGINES
from pacs_node.model.predictor import NodePredictor
from pacs_node.results.identity import rendition
from pacs_node.status import StoreStatus


def publish(bundle: Path, contract: ModelContract) -> None:
    """Write ``contract`` into the bundle's metadata.json, as training does."""
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["deep_pneumonia"] = contract.to_json()
    path.write_text(json.dumps(meta, indent=2) + "\n")


def canvases(contract: ModelContract, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((count, 1, contract.image_size, contract.image_size), np.float32)


@pytest.fixture(scope="module")
def quantized_bundle(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path) -> Path:
    """A copy of the demo bundle with an 8-bit graph its contract records (ranges from random
    canvases: what is tested here is the serving, not the quality of these ranges)."""
    bundle = tmp_path_factory.mktemp("int8") / "bundle"
    shutil.copytree(demo_bundle, bundle)
    contract = load_contract(bundle)
    if not contract.onnx_digest:
        pytest.skip("the test bundle has no ONNX graph")
    onnx_path(bundle, True).unlink(missing_ok=True)
    quantized.quantize(onnx_path(bundle), onnx_path(bundle, True), canvases(contract, 16, 0))
    publish(bundle, replace(contract, int8_digest=file_digest(onnx_path(bundle, True))))
    return bundle


def test_the_8bit_graph_serves_close_to_the_float_graph_and_only_when_asked(
    quantized_bundle: Path,
) -> None:
    assert "onnx-int8" in NODE_ENGINES
    x = canvases(load_contract(quantized_bundle), 8, 1)
    int8 = Runner(bundle=quantized_bundle, device="cpu", engine="onnx-int8")
    plain = Runner(bundle=quantized_bundle, device="cpu", engine="onnx")
    chosen = Runner(bundle=quantized_bundle, device="cpu", engine="auto")
    assert (int8.engine, plain.engine, chosen.engine) == ("onnx-int8", "onnx", "onnx")
    found, want = int8.run(x), plain.run(x)
    gap = np.abs(found.probabilities - want.probabilities).max()
    # another computation, near the float one (ranges from random canvases: coarse; the
    # training's own copy is judged on its validation decisions instead)
    assert 0 < gap < 0.2, f"the 8-bit graph's probabilities are {gap} from the float graph's"
    assert np.array_equal(chosen.run(x).probabilities, want.probabilities)


def test_an_8bit_graph_the_contract_does_not_record_is_refused(
    quantized_bundle: Path, tmp_path: Path
) -> None:
    altered = tmp_path / "bundle"
    shutil.copytree(quantized_bundle, altered)
    with onnx_path(altered, True).open("ab") as graph:
        graph.write(b"\0")
    with pytest.raises(BundleError, match="SHA-256 differs"):
        Runner(bundle=altered, device="cpu", engine="onnx-int8")
    onnx_path(altered, True).unlink()
    with pytest.raises(BundleError, match="missing"):
        Runner(bundle=altered, device="cpu", engine="onnx-int8")
    publish(altered, replace(load_contract(altered), int8_digest=""))
    with pytest.raises(BundleError, match="kept no 8-bit graph"):
        Runner(bundle=altered, device="cpu", engine="onnx-int8")


def test_an_8bit_graph_validated_on_another_kind_of_cpu_is_refused(
    quantized_bundle: Path, tmp_path: Path
) -> None:
    from dp_model.serving.isa import VNNI, int8_features

    altered = tmp_path / "bundle"
    shutil.copytree(quantized_bundle, altered)
    here = int8_features()
    vnni_here = any(flag in VNNI for flag in here)
    other = [f for f in here if f not in VNNI] if vnni_here else [*here, "avx512_vnni"]
    record = altered / "models" / "model.int8.json"
    record.write_text(json.dumps({"cpu": {"int8_features": other}}))
    with pytest.raises(BundleError, match="validated on a CPU"):
        Runner(bundle=altered, device="cpu", engine="onnx-int8")
    record.write_text(json.dumps({"cpu": {"int8_features": here}}))
    assert Runner(bundle=altered, device="cpu", engine="onnx-int8").engine == "onnx-int8"


def test_the_cpu_flags_that_change_8bit_arithmetic_are_read_and_compared(tmp_path: Path) -> None:
    from dp_model.serving.isa import int8_features, int8_mismatch

    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512bw avx512_vnni\nflags\t: other\n"
    assert int8_features(cpuinfo) == ["avx2", "avx512bw", "avx512_vnni"]
    record = tmp_path / "model.int8.json"
    record.write_text(json.dumps({"cpu": {"int8_features": ["avx2", "avx512_vnni"]}}))
    assert int8_mismatch(record, ["avx2", "avx_vnni"]) == "", "VNNI of another width: one path"
    assert "without VNNI" in int8_mismatch(record, ["avx2"])
    record.write_text(json.dumps({"cpu": {"int8_features": ["avx2"]}}))
    assert "with amx_int8" in int8_mismatch(record, ["avx2", "amx_int8"])
    record.write_text(json.dumps({"kept": False}))  # written before the CPU was recorded
    assert int8_mismatch(record, ["avx2"]) == ""


def outputs(probabilities: list[list[float]], scores: list[float] | None = None):
    return np.asarray(probabilities, np.float32), None if scores is None else np.asarray(scores)


def test_agreement_counts_every_changed_decision_and_the_largest_auc_move(
    demo_bundle: Path,
) -> None:
    contract = load_contract(demo_bundle)
    classes = contract.output_classes
    normal = classes.index(contract.normal_class)
    sick = classes.index(contract.pneumonia[0])
    point = contract.present_point.threshold

    def row(p_sick: float) -> list[float]:
        values = [0.0] * len(classes)
        values[sick], values[normal] = p_sick, 1.0 - p_sick
        return values

    labels = np.array([sick, normal, sick, normal])
    before = outputs([row(0.99), row(0.01), row(0.98), row(point / 2)])
    same = quantized.agreement(contract, before, before, labels)
    assert (same.decisions_changed, same.auc_gap, same.earned) == (0, 0.0, True)
    # one image moved across the present point: one decision changed, refused
    moved = outputs([row(0.99), row(0.01), row(0.98), row(min(0.999, point + 0.01))])
    found = quantized.agreement(contract, before, moved, labels)
    assert found.decisions_changed == 1 and not found.earned
    assert "1 of 4 served decisions changed" in found.why_not()
    # the same decisions (every image below the point), a ranking that moved: refused on the AUC
    below = [point * f for f in (0.9, 0.3, 0.6, 0.45)]
    ranked = outputs([row(p) for p in below])
    reordered = outputs([row(p) for p in (*below[:3], point * 0.8)])
    moved_auc = quantized.agreement(contract, ranked, reordered, labels)
    assert moved_auc.decisions_changed == 0 and moved_auc.auc_gap == pytest.approx(0.25)
    assert not moved_auc.earned and "AUC moved" in moved_auc.why_not()


def test_training_keeps_the_copy_only_when_validation_agrees_and_reports_test_once(
    quantized_bundle: Path, tmp_path: Path
) -> None:
    """``choose`` with the runs given: refused on validation, the test split is never run and
    the file goes; kept, test is run once and recorded. Either way the bundle's contract is
    untouched: the caller records a digest only once it is returned."""
    for agree in (False, True):
        bundle = tmp_path / f"agree-{agree}"
        shutil.copytree(quantized_bundle, bundle)
        onnx_path(bundle, True).unlink()
        contract = replace(load_contract(bundle), int8_digest="")
        publish(bundle, contract)
        runs: list[tuple[str, str, str]] = []
        labels = np.array([0, 1, 0, 1])
        probabilities = np.eye(len(contract.output_classes))[labels]

        def run(engine, split, candidate, agree=agree, runs=runs, p=probabilities, y=labels):
            runs.append((engine, split, candidate.int8_digest))
            found = p if agree or engine == "onnx" else p[:, ::-1]
            return (found.astype(np.float32), None), y

        digest = quantized.choose(bundle, contract, canvases(contract, 8, 2), run, seed=7)
        record = json.loads(quantized.record_path(bundle).read_text())
        assert load_contract(bundle).int8_digest == "", "choose publishes nothing"
        assert {candidate for _, _, candidate in runs} == {record["int8_graph_sha256"]}
        assert record["quantization"]["kept_in_float"], "the stem stays in float"
        if agree:
            assert digest == file_digest(onnx_path(bundle, True)) == record["int8_graph_sha256"]
            assert [r[:2] for r in runs] == [
                ("onnx", "val"),
                ("onnx-int8", "val"),
                ("onnx", "test"),
                ("onnx-int8", "test"),
            ]
            assert record["kept"] and record["test"]["decisions_changed"] == 0
        else:
            assert digest == "" and not onnx_path(bundle, True).exists()
            assert ("onnx", "test") not in [r[:2] for r in runs], "test is read only when kept"
            assert not record["kept"] and record["test"] is None
            assert "served decisions changed" in record["why_not"]


def test_a_copy_that_cannot_be_run_is_refused_and_recorded_not_raised(
    quantized_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(quantized_bundle, bundle)
    contract = replace(load_contract(bundle), int8_digest="")

    def run(engine, split, candidate):
        raise RuntimeError()  # an empty message, as some of ONNX Runtime's are

    assert quantized.choose(bundle, contract, canvases(contract, 4, 3), run, seed=0) == ""
    record = json.loads(quantized.record_path(bundle).read_text())
    assert not record["kept"] and "RuntimeError" in record["why_not"]
    assert not onnx_path(bundle, True).exists()


def test_non_finite_outputs_are_refused(demo_bundle: Path) -> None:
    contract = load_contract(demo_bundle)
    width = len(contract.output_classes)
    labels = np.arange(4) % width
    good = np.full((4, width), 1.0 / width, np.float32)
    bad = good.copy()
    bad[2, 0] = np.nan
    found = quantized.agreement(contract, (good, None), (bad, None), labels)
    assert found.non_finite == 1 and not found.earned and "non-finite" in found.why_not()


def test_the_node_refuses_the_8bit_engine_at_points_it_was_not_validated_on(
    tmp_path: Path,
) -> None:
    from node_support import node_config

    for settings in ({"operating_point": 0.3}, {"ood_gate": False}):
        with pytest.raises(ValueError, match="onnx-int8"):
            node_config(tmp_path, engine="onnx-int8", **settings)
    assert node_config(tmp_path, engine="onnx-int8").engine == "onnx-int8"


def test_the_node_serves_the_8bit_graph_end_to_end_under_other_result_uids(
    quantized_bundle: Path, tmp_path: Path
) -> None:
    predictor = NodePredictor(quantized_bundle, "cpu", engine="onnx-int8")
    node = start_node(tmp_path, predictor, engine="onnx-int8")
    try:
        assert send(node.port, [chest_dataset()]) == [StoreStatus.SUCCESS]
        (line,) = wait_for(lambda: final_lines(node, "processed"), 60, "the processed line")
        assert len(line["outputs"]) == 2 and line["result"]["engine"] == "onnx-int8"
    finally:
        node.stop()
    plain = replace(node.config, engine="onnx")
    assert rendition(node.config, predictor.contract) != rendition(plain, predictor.contract)
