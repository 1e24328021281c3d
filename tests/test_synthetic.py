"""Synthetic recall tasks: generators put the right answers in the right places, seeding, fixed eval sets, and
`data=synthetic` trains with every model family."""

from __future__ import annotations

import json

import pytest
import torch

from ssmlm.data.synthetic import (IGNORE_INDEX, SyntheticDataModule, TaskTokenizer, induction_heads, mqar,
                                  selective_copying)
from ssmlm.errors import ConfigError
from ssmlm.train import train

FAST = ["hardware=cpu", "logger=csv", "trainer.enable_progress_bar=false", "callbacks.rich_summary=null",
        "callbacks.text_samples=null", "data.seq_len=32", "batch_size=8", "data.n_memorize=4",
        "data.eval_samples=16", "data.train_batches=4"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_selective_copying_answers_are_the_scattered_tokens_in_order():
    n, seq_len, k, vocab = 64, 40, 5, 8
    x, y = selective_copying(n, seq_len, k, vocab, gen())
    noise, sep, first = 1, 2, 3
    context = seq_len - k
    assert x.shape == y.shape == (n, seq_len)
    assert (x[:, context] == sep).all() and (y[:, :context] == IGNORE_INDEX).all()
    for row in range(n):
        memorised = x[row, :context][x[row, :context] != noise]
        assert len(memorised) == k and (memorised >= first).all() and (memorised < first + vocab).all()
        assert torch.equal(y[row, context:], memorised)
        assert torch.equal(x[row, context + 1:], memorised[:-1])  # teacher forcing: answers so far are inputs


def test_induction_heads_answer_is_the_token_after_the_trigger():
    n, seq_len, vocab = 64, 30, 8
    x, y = induction_heads(n, seq_len, 0, vocab, gen(1))
    trigger = 1
    assert (x[:, -1] == trigger).all() and (y[:, :-1] == IGNORE_INDEX).all()
    for row in range(n):
        at = torch.nonzero(x[row] == trigger).flatten()
        assert len(at) == 2 and at[1] == seq_len - 1 and at[0] < seq_len - 2
        assert y[row, -1] == x[row, at[0] + 1] and y[row, -1] >= 2


def test_mqar_queries_are_answered_with_their_values():
    n, seq_len, pairs, vocab = 32, 40, 4, 8
    x, y = mqar(n, seq_len, pairs, vocab, gen(2))
    for row in range(n):
        keys, values = x[row, 0:2 * pairs:2], x[row, 1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs
        scored = torch.nonzero(y[row] != IGNORE_INDEX).flatten()
        assert len(scored) == pairs and (scored >= 2 * pairs).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(x[row, scored].tolist()) == sorted(keys.tolist())
        assert all(table[int(x[row, q])] == int(y[row, q]) for q in scored)


@pytest.mark.parametrize("task", ["selective_copying", "induction_heads", "mqar"])
def test_batches_are_seeded_and_eval_sets_fixed(task):
    def module(seed):
        dm = SyntheticDataModule(task, seq_len=48, batch_size=4, n_memorize=4, n_tokens=8, train_batches=3,
                                 eval_samples=8, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = module(0), module(0), module(1)
    loader = a.train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)
    assert len(epoch0) == len(loader) == 3
    assert all(torch.equal(p[0], q[0]) for p, q in zip(epoch0, b.train_dataloader()))
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # a fresh draw each epoch
    assert not torch.equal(epoch0[0][0], next(iter(c.train_dataloader()))[0])
    val = [torch.cat(t) for t in zip(*a.val_dataloader())]
    assert torch.equal(val[0], torch.cat([x for x, _ in a.val_dataloader()]))  # same set on every pass
    assert torch.equal(val[0], b.sets["val"][0]) and not torch.equal(val[0], a.sets["test"][0])
    assert not any(torch.equal(val[0][:4], x) for x, _ in epoch0 + epoch1)
    assert (val[1] != IGNORE_INDEX).any() and val[1].max() < a.vocab_size


def test_resume_skips_the_batches_already_trained():
    dm = SyntheticDataModule("induction_heads", seq_len=16, batch_size=2, train_batches=5)
    full = list(dm.train_dataloader())
    again = SyntheticDataModule("induction_heads", seq_len=16, batch_size=2, train_batches=5)
    again.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed = list(again.train_dataloader())
    assert len(resumed) == 2 and torch.equal(resumed[0][0], full[3][0])


def test_tokenizer_round_trips_and_bad_configs_are_refused():
    dm = SyntheticDataModule("selective_copying", seq_len=32, n_memorize=4, n_tokens=8)
    tok = dm.tokenizer
    assert tok.vocab_size == dm.vocab_size == 11 and tok.unit == "token"
    assert tok.decode(tok.encode(". t3 | t7")) == ". t3 | t7"
    assert TaskTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok
    assert tok.stream_decoder().feed([1, 3]) == ". t0 "
    assert dm.unigram_entropy_bits() == 3.0
    with pytest.raises(ConfigError, match="data.seq_len"):
        SyntheticDataModule("selective_copying", seq_len=20, n_memorize=16)
    with pytest.raises(ConfigError, match="data.task"):
        SyntheticDataModule("copy")


@pytest.mark.parametrize("model", ["diag_ssm", "s4d", "mamba", "transformer"])
def test_trains_with_every_model(make_cfg, model, tmp_path):
    cfg = make_cfg(f"model={model}", "data=synthetic", "data.task=induction_heads", *FAST, "trainer.max_steps=2")
    results = train(cfg)
    assert results["global_step"] == 2 and 0 <= results["test_acc"] <= 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 2


def test_task_tokenizer_rebuilds_from_a_checkpoint_dict():
    from ssmlm.data.synthetic import TaskTokenizer
    from ssmlm.data.tokenizers import tokenizer_from_dict

    tok = TaskTokenizer(["<pad>", "t0", "t1", ".", "|"])
    again = tokenizer_from_dict(tok.to_dict())
    assert isinstance(again, TaskTokenizer) and again.to_dict() == tok.to_dict()


def _synthetic_check_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "synthetic_check.py"
    spec = importlib.util.spec_from_file_location("synthetic_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_check_reads_model_variants_and_partial_runs(tmp_path):
    script = _synthetic_check_script()
    assert script.parse_model("mamba") == ("mamba", "mamba", [])
    assert script.parse_model("wide=mamba size.hidden=320 'model.attn_layers=[1, 3]'") == \
        ("wide", "mamba", ["size.hidden=320", "model.attn_layers=[1, 3]"])
    # a run stopped at the deadline is reported with its last validation, read from its metrics.csv
    assert script.last_validation(tmp_path) == (None, None)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc\n0,9,2.7,\n0,9,,0.25\n1,19,2.1,\n1,19,,0.5\n1,24,1.9,\n")
    assert script.last_validation(tmp_path) == (0.5, 19)
    rows = [{"task": "t", "model": "a", "status": "done", "params": 68000, "test_acc": 0.9921},
            {"task": "t", "model": "b", "status": "stopped at the deadline", "val_acc": 0.5, "val_step": 19}]
    md = script.table(rows, ["t"], ["a", "b"])
    assert md.splitlines()[0] == "| task | a (68k) | b |"
    assert md.splitlines()[2] == "| t | 0.992 | 0.500 (val@19) |"
