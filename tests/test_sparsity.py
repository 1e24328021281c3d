"""Sparse projections: N:M / block / magnitude masks, the schedule, exact counts, masks kept through training,
checkpoints and resume, and the config errors."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssmlm.errors import CheckpointError, ConfigError
from ssmlm.lm import LMModule
from ssmlm.models.mamba import MambaLM
from ssmlm.plots import read_metrics
from ssmlm.sparsity import (MASK, Schedule, SparsityConfig, Sparsify, attach_masks, block_mask, masked_linears,
                            new_mask, nm_mask, sparsity_report)
from ssmlm.train import train
from tiny_runs import REPO, TINY, tiny_data

TRAIN = ["hardware=cpu", "model=mamba", *TINY, "size.dropout=0", "logger=csv", "trainer.max_epochs=20",
         "test_after_fit=false", "callbacks.text_samples=null"]


def masks(model) -> dict[str, torch.Tensor]:
    return {name: getattr(module, MASK).clone() for name, module in masked_linears(model)}


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    torch.manual_seed(0)
    weight = torch.randn(12, 32)
    mask = nm_mask(weight, n, m)
    groups, keep = weight.abs().reshape(12, -1, m), mask.reshape(12, -1, m)
    assert (keep.sum(-1) == n).all()
    smallest_kept = groups.masked_fill(~keep, float("inf")).min(-1).values
    largest_dropped = groups.masked_fill(keep, -1.0).max(-1).values
    assert (smallest_kept > largest_dropped).all()


def test_block_mask_keeps_whole_blocks_of_largest_mean_magnitude():
    torch.manual_seed(0)
    scores = torch.rand(13, 21)  # edge blocks cut short: 4 x 3 blocks of (4, 8), the last row and column partial
    mask = block_mask(scores, 0.5, (4, 8))
    kept_means, dropped_means = [], []
    for r in range(0, 13, 4):
        for c in range(0, 21, 8):
            block = mask[r:r + 4, c:c + 8]
            assert block.all() or not block.any()
            (kept_means if block.all() else dropped_means).append(scores[r:r + 4, c:c + 8].mean())
    assert len(kept_means) == 6 and min(kept_means) > max(dropped_means)


def test_magnitude_mask_is_exact_and_never_revives_a_pruned_weight():
    torch.manual_seed(0)
    weight = torch.randn(16, 24)
    config = SparsityConfig.from_dict({"pattern": "unstructured", "density": 0.25})
    first = new_mask(weight, torch.ones_like(weight, dtype=torch.bool), config, 0.5)
    assert first.sum() == 192 and weight.abs()[first].min() > weight.abs()[~first].max()
    grown = weight.clone()
    grown[~first] = 100.0  # a pruned weight that would win on magnitude alone
    second = new_mask(grown, first, config, 0.25)
    assert second.sum() == 96 and not (second & ~first).any()


def test_gradual_schedule_is_cubic_and_steps_between_updates():
    config = SparsityConfig.from_dict({"pattern": "unstructured", "density": 0.2, "schedule": "gradual",
                                       "start": 0.1, "end": 0.5, "every": 10})
    schedule = Schedule.of(config, total_steps=100)
    assert (schedule.start, schedule.end) == (10, 50)
    assert [schedule.last_update(t) for t in (0, 9, 10, 19, 20, 49, 50, 99)] == [None, None, 10, 10, 20, 40, 50, 50]
    for t in (10, 20, 30, 40, 50):
        expected = 0.2 + 0.8 * (1 - (t - 10) / 40) ** 3
        assert schedule.density(t) == pytest.approx(expected) == schedule.density(t + 5 if t < 50 else 99)
    assert schedule.density(9) == 1.0 and schedule.density(50) == pytest.approx(0.2)
    one_shot = Schedule.of(SparsityConfig.from_dict({"pattern": "nm", "start": 7}), total_steps=100)
    assert [one_shot.last_update(t) for t in (6, 7, 80)] == [None, 7, 7]
    assert [one_shot.density(t) for t in (6, 7)] == [1.0, 0.5]
    with pytest.raises(ConfigError, match="sparsity.start < sparsity.end"):
        Schedule.of(SparsityConfig.from_dict({**config.__dict__, "start": 60, "end": 50}), total_steps=100)
    with pytest.raises(ConfigError, match="sparsity.start=0.1 is a fraction"):
        Schedule.of(config, total_steps=float("inf"))


def test_report_counts_exactly():
    model = MambaLM(vocab_size=17, d_model=16, n_layers=2, d_state=16, scan_backend="ref")
    names = attach_masks(model, {"pattern": "nm", "n": 1, "m": 4})
    assert [n.split(".", 2)[-1] for n in names] == ["mixer.in_proj.weight", "mixer.x_proj.weight",
                                                    "mixer.out_proj.weight"] * 2
    for _, module in masked_linears(model):
        getattr(module, MASK).copy_(nm_mask(module.weight, 1, 4))
    # per layer: in_proj 64x16, x_proj (dt_rank 1 + 2 * 16) x 32, out_proj 16x32; dt_proj 32x1; head 17x16
    target = 2 * (64 * 16 + 33 * 32 + 16 * 32)
    dense_flops = 2 * (target + 2 * 32 + 17 * 16)
    report = sparsity_report(model)
    assert report == {
        "target_weights": 6, "target_params": target, "target_nonzero": target // 4, "target_density": 0.25,
        "model_params": model.num_params(), "model_nonzero": model.num_params() - target * 3 // 4,
        "matmul_flops_per_token_dense": dense_flops, "matmul_flops_per_token": dense_flops - 2 * target * 3 // 4,
        "matmul_flops_saved": 2 * target * 3 / 4 / dense_flops}


@pytest.mark.parametrize("model, expected", [
    ("diag_ssm", {"mixer.in_proj"}), ("s4d", {"mixer.output.out_proj"}), ("s5", {"mixer.output.out_proj"}),
    ("h3", {"mixer.in_proj", "mixer.out_proj", "mlp.1", "mlp.3"}),
    ("mamba", {"mixer.in_proj", "mixer.x_proj", "mixer.out_proj"}),
    ("transformer", {"mixer.qkv", "mixer.out_proj", "mlp.1", "mlp.3"})])
def test_default_targets_are_the_block_projections_of_every_family(model, expected):
    cfg = OmegaConf.create({"size": {"emb_dim": 64, "hidden": 128, "n_layers": 2, "dropout": 0.0},
                            "hardware": {"scan_backend": "ref"}, "data": {"seq_len": 64},
                            "model": OmegaConf.load(REPO / f"conf/model/{model}.yaml")})
    names = attach_masks(instantiate(cfg.model, vocab_size=141), {"pattern": "nm", "n": 2, "m": 4})
    assert {n.split(".", 2)[-1].removesuffix(".weight") for n in names} == expected
    assert len(names) == 2 * len(expected)


def test_config_errors_name_the_key_and_the_fix():
    model = MambaLM(vocab_size=17, d_model=16, n_layers=1, scan_backend="ref")
    with pytest.raises(ConfigError, match=r"sparsity.targets=\['attn'\].*match no nn.Linear weight.*in_proj"):
        attach_masks(model, {"pattern": "nm", "targets": ["attn"]})
    with pytest.raises(ConfigError, match="x_proj.weight has 32 input features, not a multiple of sparsity.m=3"):
        attach_masks(model, {"pattern": "nm", "n": 1, "m": 3, "targets": ["x_proj"]})
    for bad, match in [({"pattern": "nm", "schedule": "gradual"}, "one density"),
                       ({"pattern": "block"}, "sparsity.density=None"),
                       ({"pattern": "block", "density": 0.5, "block": [8]}, r"sparsity.block=\[8\]"),
                       ({"pattern": "nm", "n": 4, "m": 4}, "0 < n < m"),
                       ({"pattern": "nm", "start": 1.5}, "sparsity.start=1.5"),
                       ({"pattern": "nm", "density": 0.5}, "leave density null"),
                       ({"pattern": "nm", "every_n": 3}, "unknown key"),
                       ({"pattern": "diagonal"}, "sparsity.pattern='diagonal'")]:
        with pytest.raises(ConfigError, match=match):
            SparsityConfig.from_dict(bad)
    assert not attach_masks(model, {"pattern": "none"}) and not list(masked_linears(model))


def test_callback_masks_gradients_before_and_weights_after_each_optimizer_step():
    torch.manual_seed(0)
    model = MambaLM(vocab_size=17, d_model=16, n_layers=1, scan_backend="ref")
    config = {"pattern": "block", "block": [4, 4], "density": 0.5, "targets": ["(in|out)_proj"], "start": 0}
    attach_masks(model, config)
    callback = Sparsify(config)
    trainer = SimpleNamespace(global_step=0, loggers=[], estimated_stepping_batches=3)
    holder = SimpleNamespace(model=model)  # what the callback uses of the LightningModule
    callback.on_train_start(trainer, holder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 17, (2, 12))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        callback.on_before_optimizer_step(trainer, holder, optimizer)
        for name, module in masked_linears(model):  # clipping and the optimizer see only the kept weights
            mask = getattr(module, MASK)
            assert (module.weight.grad[~mask] == 0).all() and (module.weight.grad[mask] != 0).any(), name
        optimizer.step()
        optimizer.zero_grad()
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, holder, None, None, 0)
        check_masked(model, lambda mask: mask.float().mean() == 0.5)


def check_masked(model, pattern_holds) -> None:
    """Every masked weight is exactly zero and every kept one is not (so the report's count is the nonzero count);
    every mask has the pattern."""
    assert masks(model)
    for name, module in masked_linears(model):
        mask = getattr(module, MASK)
        assert (module.weight[~mask] == 0).all() and (module.weight[mask] != 0).all(), name
        assert pattern_holds(mask), name
    report = sparsity_report(model)
    assert report["target_nonzero"] == sum(int((m.weight != 0).sum()) for _, m in masked_linears(model))


def test_nm_2_4_trains_through_the_composed_config_and_reloads(tmp_path, shared_data, make_cfg):
    # 30 steps, masks computed at step 3 (start 0.1 of the run); last.ckpt every 10 steps
    args = [*TRAIN, *tiny_data(tmp_path / "data", shared_data), "sparsity=nm_2_4", "trainer.max_steps=30",
            "callbacks.last_checkpoint.every_n_train_steps=10", "trainer.log_every_n_steps=1"]
    results = train(make_cfg(*args, output_dir=tmp_path / "run"))
    report = results["sparsity"]
    assert report["target_density"] == 0.5 and report["matmul_flops_saved"] > 0.3
    assert json.loads((tmp_path / "run" / "results.json").read_text())["sparsity"] == report
    assert read_metrics(tmp_path / "run")["sparsity/density"] == [(3, 0.5)]

    module = LMModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu")
    check_masked(module.model, lambda mask: (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
    assert sparsity_report(module.model) == report
    # one-shot: step 3's masks are kept, never recomputed (those at steps 20 and 30 are the same)
    early = LMModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.prev.ckpt", map_location="cpu")
    for name, mask in masks(early.model).items():
        assert torch.equal(mask, masks(module.model)[name]), name


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory, shared_data, compose_config):
    """Gradual magnitude pruning to 0.25, updates at 5, 10, ..., 25, trained 30 steps without a stop;
    last.ckpt at step 30 and last.prev.ckpt at step 20."""
    tmp = tmp_path_factory.mktemp("gradual")
    args = [*TRAIN, *tiny_data(tmp / "data", shared_data), "sparsity=magnitude", "sparsity.density=0.25",
            "sparsity.start=5", "sparsity.end=25", "sparsity.every=5", "trainer.max_steps=30",
            "callbacks.last_checkpoint.every_n_train_steps=10"]
    train(compose_config(args, tmp / "run"))
    return args, tmp / "run"


def test_resume_continues_the_schedule_exactly(gradual_run, make_cfg, tmp_path):
    args, run = gradual_run
    schedule = Schedule.of(SparsityConfig.from_dict({"pattern": "unstructured", "density": 0.25,
                                                     "schedule": "gradual", "start": 5, "end": 25, "every": 5}), 30)
    at_20 = torch.load(run / "checkpoints" / "last.prev.ckpt", map_location="cpu", weights_only=True)
    assert at_20["global_step"] == 20 and at_20["callbacks"]["Sparsify"] == {"updated_at": 20}
    kept = sum(int(v.sum()) for k, v in at_20["state_dict"].items() if k.endswith(MASK))
    total = sum(v.numel() for k, v in at_20["state_dict"].items() if k.endswith(MASK))
    assert kept / total == pytest.approx(schedule.density(20), abs=1e-3) and schedule.density(20) > 0.26

    # the same run stopped after step 20 (its last.ckpt lost): resumes there and prunes at 25 as the whole one did
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("DONE", "results.json", "checkpoints/last.ckpt"):
        (copy / name).unlink()
    train(make_cfg(*args, output_dir=copy))
    whole = LMModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").model
    resumed = LMModule.load_from_checkpoint(copy / "checkpoints" / "last.ckpt", map_location="cpu").model
    for name, mask in masks(whole).items():
        assert torch.equal(masks(resumed)[name], mask), name
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    check_masked(resumed, lambda mask: mask.float().mean() < 0.5)
    assert sparsity_report(resumed)["target_density"] == pytest.approx(0.25, abs=1e-3)


def test_resume_refuses_another_sparsity_config(gradual_run, make_cfg, tmp_path):
    args, run = gradual_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "DONE").unlink()
    with pytest.raises(CheckpointError, match="different sparsity config"):
        train(make_cfg(*args, "sparsity.density=0.5", output_dir=copy))


def test_weight_average_of_a_gradual_run_keeps_only_what_every_checkpoint_kept(gradual_run, tmp_path):
    from ssmlm.run_dir import average_checkpoints, model_state, read_checkpoint

    _, run = gradual_run
    paths = [run / "checkpoints" / "last.prev.ckpt", run / "checkpoints" / "last.ckpt"]  # steps 20 and 30
    at_20, at_30 = (model_state(read_checkpoint(p)) for p in paths)
    averaged = model_state(read_checkpoint(average_checkpoints(paths, tmp_path / "avg.ckpt")))
    masked = [k for k in averaged if k.endswith(MASK)]
    assert masked
    for name in masked:
        weight = name.removesuffix("_mask")
        assert torch.equal(averaged[name], at_20[name] & at_30[name])
        assert (averaged[name] != at_20[name]).any() or (averaged[name] != at_30[name]).any()  # they differed
        torch.testing.assert_close(averaged[weight], (at_20[weight] + at_30[weight]) / 2 * averaged[name])
