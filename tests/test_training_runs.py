"""dp-train's runs: the ablation switches change what is trained, resume, determinism, DDP."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from training_support import CPU, STILL, rsna_run, tiny

from dp_model.datasets import read_dataset
from dp_model.training.config import (
    DataConfig,
    FinetuneConfig,
    LossConfig,
    MGACRConfig,
    RuntimeConfig,
)
from dp_model.training.data import load_split, make_splits
from dp_model.training.engine import epoch_line, finetune, pretrain
from dp_model.training.objectives import build_classifier, classification_loss
from dp_model.training.run import train

# --- the ablation switches really change what is trained --------------------------------------------


def test_each_ablation_switch_changes_the_training_graph(dataset_dir: Path, tmp_path: Path) -> None:
    config = tiny(dataset_dir, tmp_path / "cache")
    dataset = read_dataset(dataset_dir)
    data = load_split(dataset, make_splits(dataset, config.data, 0).train, config.data, "decode")
    classes = list(dataset.classes)
    counts = torch.bincount(data.labels, minlength=5).tolist()

    # Contrastive pre-training: the classifier starts from the encoder, not from its initialisation.
    encoder = pretrain(config.pretrain, data, CPU, seed=0)
    fresh, warm = (
        build_classifier(config.finetune, 5, None, 0),
        build_classifier(config.finetune, 5, encoder, 0),
    )
    assert not torch.equal(fresh.backbone.conv1.weight, warm.backbone.conv1.weight)
    torch.testing.assert_close(warm.backbone.conv1.weight, encoder["conv1.weight"])

    # MGACR: heads exist only when a term is on; each term adds its own gradient.
    plain = replace(config.finetune, mgacr=MGACRConfig(attention=False, feature_cr=False))
    assert len(build_classifier(plain, 5, None, 0).heads) == 0
    grads = {}
    for name, mgacr in {
        "attention": MGACRConfig(feature_cr=False),
        "feature_cr": MGACRConfig(attention=False),
    }.items():
        cfg = replace(config.finetune, epochs=1, mgacr=mgacr, augment=STILL)
        result = finetune(cfg, data, None, classes, CPU, seed=0)
        head = result.model.heads["layer4"]
        grads[name] = (head.positive.conv.weight.clone(), head.negative.conv.weight.clone())
    assert not torch.equal(grads["attention"][0], grads["feature_cr"][0])

    # The classification loss: cross-entropy, focal and class-balanced focal differ on the same logits.
    logits, target = torch.randn(16, 5), torch.arange(16) % 5
    values = {
        kind: float(
            classification_loss(
                replace(config.finetune, loss=LossConfig(kind=kind)), counts, classes
            )(logits, target)
        )
        for kind in ("ce", "focal", "cb_focal")
    }
    assert len({round(v, 6) for v in values.values()}) == 3


def test_mgacr_terms_are_recorded_at_each_residual_stage_and_plotted(
    dataset_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from dp_model.training.checkpoints import History
    from dp_model.training.plots import curves

    config = tiny(dataset_dir, tmp_path / "cache")
    dataset = read_dataset(dataset_dir)
    data = load_split(dataset, make_splits(dataset, config.data, 0).train, config.data, "decode")
    history = History()
    cfg = replace(config.finetune, epochs=2, mgacr=MGACRConfig(), augment=STILL)
    finetune(cfg, data, None, list(dataset.classes), CPU, seed=0, history=history)
    stages = [f"layer{s}" for s in build_classifier(cfg, 5, None, 0).attention_stages]
    for record in history.finetune:
        for term in ("att_pos", "att_neg", "feat_cr"):
            each = [record[f"{term}@{stage}"] for stage in stages]
            # the stages' mean is the term
            assert record[term] == pytest.approx(np.mean(each), rel=1e-4)
        # each stage its own
        assert len({round(record[f"feat_cr@{stage}"], 6) for stage in stages}) == len(stages)
        assert "@" not in epoch_line("stage II", record)  # the console line stays one line
    with_stages = Image.open(curves(history, tmp_path / "with.png")).size
    without = Image.open(
        curves(
            History(
                finetune=[{k: v for k, v in r.items() if "@" not in k} for r in history.finetune]
            ),
            tmp_path / "without.png",
        )
    ).size
    # the per-stage panel is drawn only when there are stages
    assert with_stages[0] > without[0] * 1.2


def test_switched_off_pretraining_never_uses_a_leftover_encoder(
    dataset_dir: Path, tmp_path: Path
) -> None:
    from dp_model.training.checkpoints import History
    from dp_model.training.run import _stage_one

    checkpoint = tmp_path / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir()
    torch.save({"conv1.weight": torch.zeros(1)}, checkpoint.parent / "encoder.pt")
    on = tiny(dataset_dir, tmp_path / "cache")
    off = replace(on, pretrain=replace(on.pretrain, enabled=False))
    assert _stage_one(off, None, CPU, checkpoint, "finetune", True, History(), None, {}) is None
    assert _stage_one(on, None, CPU, checkpoint, "finetune", True, History(), None, {}) is not None


# --- resume -------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_uninterrupted_result(
    dataset_dir: Path, tmp_path: Path
) -> None:
    config = tiny(dataset_dir, tmp_path / "cache")
    dataset = read_dataset(dataset_dir)
    data = load_split(dataset, make_splits(dataset, config.data, 0).train, config.data, "decode")
    classes = list(dataset.classes)
    cfg = replace(config.finetune, epochs=3)
    whole = finetune(cfg, data, None, classes, CPU, seed=0)

    def crash_after_first_epoch(stage: str, record: dict, epoch: int) -> None:
        if epoch == 0:
            raise Interrupt

    checkpoint = tmp_path / "last.pt"
    with pytest.raises(Interrupt):
        finetune(
            cfg,
            data,
            None,
            classes,
            CPU,
            seed=0,
            checkpoint=checkpoint,
            log=crash_after_first_epoch,
        )
    resumed = finetune(cfg, data, None, classes, CPU, seed=0, checkpoint=checkpoint)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)


def test_decoding_gives_the_caller_back_its_thread_count(dataset_dir: Path, tmp_path: Path) -> None:
    """Decoding leaves PyTorch's thread count as it found it:
    the training that follows must run with the configured count whether or not its
    splits came from the cache."""
    dataset = read_dataset(dataset_dir)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        data = DataConfig(
            root=str(dataset_dir), image_size=32, cache_dir=str(tmp_path / "cache"), workers=1
        )
        load_split(dataset, tuple(range(8)), data, "decode")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_same_command_on_the_same_data_trains_the_same_weights_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one configuration on one RSNA-layout folder give bit-identical weights.

    The second run reads the decoded splits from the cache the first wrote, as a second
    ``dp-train`` does: nothing the first run did while decoding (in this process or in a
    pool) may change how the second trains. CPU kernels reduce in an order that depends on
    the thread count, so the configuration pins it (two threads) and decoding must leave it
    alone."""
    config = rsna_run(tmp_path, "twice")
    states: list[dict] = []
    # The weights as the bundle would get them; the bundle's pictures and files are not needed here.
    monkeypatch.setattr(
        "dp_model.training.run._write_bundle",
        lambda out, config, model, *rest: states.append(model.state_dict()),
    )
    for run in ("first", "second"):
        train(config, tmp_path / run)
    assert list(states[0]) == list(states[1])
    differ = [key for key in states[0] if not torch.equal(states[0][key], states[1][key])]
    assert not differ, f"{len(differ)} of {len(states[0])} tensors differ, first {differ[0]}"


# --- DDP ------------------------------------------------------------------------------------------------------


def _ddp_worker(
    rank: int, port: int, config: FinetuneConfig, data, classes: list[str], out: dict
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist

    from dp_model.training.runtime import make_runtime

    torch.set_num_threads(1)
    runtime = make_runtime(RuntimeConfig(device="cpu"))
    result = finetune(config, data, None, classes, runtime, seed=0)
    if rank == 0:
        out["state"] = {k: v.clone() for k, v in result.model.state_dict().items()}
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(dataset_dir: Path, tmp_path: Path) -> None:
    config = tiny(dataset_dir, tmp_path / "cache")
    dataset = read_dataset(dataset_dir)
    data = load_split(dataset, make_splits(dataset, config.data, 0).train, config.data, "decode")
    classes = list(dataset.classes)
    cfg = replace(config.finetune, epochs=1, batch_size=16, augment=STILL, optimizer="sgd", lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs: CPU sums split by thread count
    try:
        single = finetune(cfg, data, None, classes, replace(CPU, micro_batches=2), seed=0)
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(port, cfg, data, classes, out), nprocs=2, join=True)
        state = dict(out)["state"]
    for key, value in single.model.state_dict().items():
        if "running_" in key or "num_batches" in key:
            # DDP broadcasts rank 0's BatchNorm statistics; one process accumulates both halves
            continue
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_switch_wraps_the_model_and_unwrap_finds_it() -> None:
    from dp_model.networks.networks import DeepPneumoniaNet
    from dp_model.training.runtime import unwrap, wrap

    net = DeepPneumoniaNet()
    compiled = wrap(net, replace(CPU, compile=True))
    assert compiled is not net and type(compiled).__name__ == "OptimizedModule"
    assert unwrap(compiled) is net and wrap(net, CPU) is net
