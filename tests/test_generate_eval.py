"""ssmlm-generate and ssmlm-eval on a real tiny run (trained once per session by the real CLI on Hindi text):
recurrent decoding equals the parallel forward, seeded sampling, UTF-8 streaming, whole-split metrics,
checkpoint ensembles and weight averaging, and clear errors for broken run dirs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from ssmlm.data.tokenizers import ByteTokenizer, CharTokenizer, nfc
from ssmlm.errors import CheckpointError, ConfigError, DataError
from ssmlm.evaluate import evaluate
from ssmlm.generate import Decoder, encode_prompt, generate, never_sampled, stream_sample
from ssmlm.lm import LMModule
from ssmlm.models.base import LanguageModel
from ssmlm.run_dir import RunDir, build_model, model_state, read_checkpoint, save_checkpoint
from ssmlm.sampling import Sampling

REPO = Path(__file__).resolve().parents[1]
HINDI = "प्रेमचंद की कहानी: नमस्ते, दुनिया!"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from several threads, and a busy machine makes them spin: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_data) -> Path:
    """A diag-SSM run of 12 steps validating every 3 (4 top-k checkpoints) on pieces of the real Hindi splits
    (whole-split evaluation of a 12k-character test piece stays quick)."""
    root = tmp_path_factory.mktemp("tiny_run")
    pieces = {}
    sizes = {"train": ("train.txt", 300_000), "val": ("valid.txt", 20_000), "test": ("test.txt", 12_000)}
    for split, (file, chars) in sizes.items():
        text = (shared_data / "hindi" / "premchand" / file).read_text(encoding="utf-8")
        pieces[split] = root / f"{split}_piece.txt"
        pieces[split].write_text(text[:text.index("\n", chars) + 1], encoding="utf-8")
    run = root / "run"
    cmd = [sys.executable, "-m", "ssmlm.train", "debug=default", f"hydra.run.dir={run}", "callbacks.rich_summary=null",
           "trainer.max_steps=12", "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "data.seq_len=64",
           "batch_size=8", "optim.lr=3e-3", "test_after_fit=false", *(f"data.{s}_path={p}" for s, p in pieces.items())]
    env = dict(os.environ, SSMLM_DATA_DIR=str(shared_data), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / "checkpoints").glob("epoch*-ppl*.ckpt"))) >= 3
    return run


def gen_cfg(run: Path, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "generate.yaml")
    cfg.merge_with({"run_dir": str(run), "device": "cpu", "max_new_tokens": 40, "num_samples": 1, **overrides})
    return cfg


def eval_cfg(run: Path, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "eval.yaml")
    cfg.merge_with({"run_dir": str(run), "device": "cpu", **overrides})
    return cfg


def broken_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "averaged-*"))
    return copy


# --------------------------------------------------------------------------------------------- decoding
def test_recurrent_steps_equal_the_parallel_forward_on_a_real_checkpoint(tiny_run):
    run = RunDir(tiny_run)
    ckpt = read_checkpoint(run.checkpoint("best"))
    model, tokenizer = build_model(ckpt), run.tokenizer(ckpt)
    text = (tiny_run.parent / "test_piece.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer.encode(text[:96])])
    with torch.inference_mode():
        parallel = model(ids)
        decoder = Decoder(model)
        logits, state = decoder.prefill(ids[:, :40])
        torch.testing.assert_close(logits, parallel[:, 39], atol=1e-4, rtol=1e-4)
        for t in range(40, 96):  # teacher forcing: each step sees the true next token
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, parallel[:, t], atol=1e-4, rtol=1e-4)

        # greedy decoding through the state = greedy decoding that re-reads the whole prefix every token
        logits, state = decoder.prefill(ids[:, :40])
        stepped = torch.cat(list(decoder.tokens(logits, state, 30, Sampling(temperature=0))))
        sequence = ids[:, :40]
        for _ in range(30):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert stepped.tolist() == sequence[0, 40:].tolist()


@pytest.mark.parametrize("family", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_every_family_decodes_through_its_state_like_recomputing_the_prefix(family, make_cfg):
    """Greedy tokens from prefill + step equal greedy tokens from re-reading the whole prefix, and one
    prefill seeds several samples (the state given to ``tokens`` is not advanced in place, KV caches included)."""
    cfg = make_cfg(f"model={family}", "size.emb_dim=16", "size.hidden=32", "size.n_layers=2", "data.seq_len=64")
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model, vocab_size=50).eval()
    prompt = torch.randint(0, 50, (2, 12))
    decoder = Decoder(model)
    with torch.inference_mode():
        logits, state = decoder.prefill(prompt)
        runs = [torch.stack(list(decoder.tokens(logits, state, 20, Sampling(temperature=0))), 1) for _ in range(2)]
        sequence = prompt
        for _ in range(20):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(runs[0], sequence[:, 12:]) and torch.equal(runs[1], runs[0])


def test_generate_streams_the_prompt_and_samples_and_a_seed_reproduces_them(tiny_run, capsys):
    first = generate(gen_cfg(tiny_run, prompt=HINDI[:10], seed=3, num_samples=2, top_p=0.9, top_k=20))
    out = capsys.readouterr().out
    assert len(first) == 2 and first[0] != first[1]  # two different draws from one prefill
    assert out.startswith("--- sample 1/2 ---\n" + HINDI[:10] + first[0])
    assert generate(gen_cfg(tiny_run, prompt=HINDI[:10], seed=3, num_samples=2, top_p=0.9, top_k=20)) == first
    assert generate(gen_cfg(tiny_run, prompt=HINDI[:10], seed=4, num_samples=2, top_p=0.9, top_k=20)) != first
    greedy = generate(gen_cfg(tiny_run, prompt=HINDI[:10], temperature=0, num_samples=2))
    assert greedy[0] == greedy[1]


def test_generate_refuses_unseen_prompt_characters_unless_allow_unk(tiny_run, capsys):
    with pytest.raises(DataError, match=r"'漢' \(U\+6F22\).*allow_unk=true"):
        generate(gen_cfg(tiny_run, prompt="राजा 漢 राजा"))
    assert len(generate(gen_cfg(tiny_run, prompt="राजा 漢 राजा", allow_unk=True))[0]) > 0


def test_the_cli_takes_an_unquoted_unicode_prompt_with_commas(tiny_run, capsys):
    from ssmlm.generate import main

    main([f"run_dir={tiny_run}", "prompt=नमस्ते, दुनिया", "max_new_tokens=20", "num_samples=1", "device=cpu",
          "temperature=0.5", "top_k=5"])
    out = capsys.readouterr().out
    assert out.startswith("नमस्ते, दुनिया") and len(out) > len("नमस्ते, दुनिया") and "\ufffd" not in out


class ScriptedLM(LanguageModel):
    """Predicts a fixed script with certainty: the state is the position in it."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.script, self.vocab_size = script + [0], vocab_size

    def _logits(self, positions: torch.Tensor) -> torch.Tensor:
        targets = torch.tensor([self.script[int(p)] for p in positions])
        return torch.nn.functional.one_hot(targets, self.vocab_size).float() * 50

    def forward(self, tokens, state=None, return_state=False):
        logits = self._logits(torch.zeros(tokens.shape[0]))[:, None].expand(-1, tokens.shape[1], -1)
        return (logits, torch.ones(tokens.shape[0], dtype=torch.long)) if return_state else logits

    def allocate_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def step(self, tokens, state):
        return self._logits(state), state + 1


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), CharTokenizer.build(HINDI)], ids=["byte", "char"])
def test_streaming_emits_each_hindi_character_whole(tokenizer):
    """Byte models emit a Devanagari code point as 3 tokens: the stream must hold the first two back."""
    script = tokenizer.encode(HINDI)
    if isinstance(tokenizer, ByteTokenizer):
        assert len(script) == len(HINDI.encode("utf-8")) > len(HINDI)
    model, written = ScriptedLM(script, tokenizer.vocab_size), []
    decoder = Decoder(model)
    logits, state = decoder.prefill(torch.tensor([[0]]))
    text = stream_sample(decoder, tokenizer, logits, state, len(script), Sampling(temperature=0), None,
                         written.append)
    assert text == HINDI
    assert written == list(HINDI)  # one whole character per write, never a partial UTF-8 sequence


def test_empty_prompt_starts_a_document():
    assert encode_prompt(ByteTokenizer(), "", allow_unk=False) == [ByteTokenizer.boundary_id]
    char = CharTokenizer.build("ab\n")
    assert encode_prompt(char, "", allow_unk=False) == char.encode("\n")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_equals_eager_decoding():
    from ssmlm.models.diag_ssm import DiagSSMLM
    from ssmlm.models.s4d import S4DLM
    from ssmlm.models.transformer import TransformerLM

    torch.manual_seed(0)
    for model in (DiagSSMLM(100, 32, 64, 2), S4DLM(100, 64, 2)):
        model = model.cuda().eval()
        prompt = torch.randint(0, 100, (3, 50), device="cuda")
        runs = []
        for graph in (False, True):
            decoder = Decoder(model, cuda_graph=graph)
            logits, state = decoder.prefill(prompt)
            for _ in range(2):  # twice: the captured graph is reloaded from the prompt state
                generator = torch.Generator(device="cuda").manual_seed(0)
                runs.append(torch.stack(list(decoder.tokens(logits, state, 64, Sampling(0.8, 0, 0.9), generator))))
        assert all(torch.equal(runs[0], r) for r in runs[1:])
    transformer = TransformerLM(100, 32, 2, max_seq_len=128).cuda().eval()
    decoder = Decoder(transformer, cuda_graph=True)
    logits, state = decoder.prefill(torch.zeros(1, 4, dtype=torch.long, device="cuda"))
    with pytest.raises(ConfigError, match="cuda_graph=false"):
        next(iter(decoder.tokens(logits, state, 4, Sampling(0))))


# ------------------------------------------------------------------------------------------- evaluation
def test_eval_scores_the_whole_split_like_the_training_metrics(tiny_run):
    result = evaluate(eval_cfg(tiny_run))
    saved = json.loads((tiny_run / "eval" / "test-best.json").read_text(encoding="utf-8"))
    assert saved["loss"] == result["loss"] and saved["checkpoints"] == [RunDir(tiny_run).checkpoint().name]
    assert result["unit"] == "char" and math.isclose(result["bits_per_char"], result["loss"] / math.log(2))
    assert math.isclose(result["ppl"], math.exp(result["loss"]))
    text = (tiny_run.parent / "test_piece.txt").read_text(encoding="utf-8")
    assert result["tokens"] == len(nfc(text)) - 1  # every next-character target exactly once

    # the training module's own (torchmetrics) test metrics over the same loader agree
    ckpt = read_checkpoint(RunDir(tiny_run).checkpoint("best"))
    module = LMModule(**dict(ckpt["hyper_parameters"], compile=False))
    module.load_state_dict(model_state(ckpt))
    module.eval()
    from ssmlm.evaluate import build_datamodule

    datamodule = build_datamodule(RunDir(tiny_run), eval_cfg(tiny_run), RunDir(tiny_run).tokenizer(ckpt))
    with torch.inference_mode():
        for batch in datamodule.test_dataloader():
            module._eval_step(batch, "test")
    metrics = module.metrics["test"]
    assert math.isclose(result["loss"], float(metrics.loss.compute()), rel_tol=1e-5)
    assert math.isclose(result["acc"], float(metrics.acc.compute()), rel_tol=1e-5)


def test_ensemble_of_probabilities_is_no_worse_than_its_members_on_average(tiny_run):
    result = evaluate(eval_cfg(tiny_run, ensemble=3))
    ranked = RunDir(tiny_run).ranked_checkpoints()
    assert result["checkpoints"] == [p.name for p, _ in ranked[:3]]
    assert [m["val_score"] for m in result["members"]] == sorted(s for _, s in ranked[:3])
    losses = [m["loss"] for m in result["members"]]
    assert math.isfinite(result["loss"]) and 0 <= result["acc"] <= 1
    assert len(set(losses)) == 3  # three different models
    assert result["loss"] <= sum(losses) / 3 + 1e-9  # Jensen: log of a mean >= mean of logs
    assert result["loss"] <= max(losses)
    assert (tiny_run / "eval" / "test-ensemble-top3.json").exists()


def test_weight_average_is_saved_and_no_worse_than_the_worst_member(tiny_run):
    result = evaluate(eval_cfg(tiny_run, average=3))
    path = tiny_run / "checkpoints" / "averaged-top3.ckpt"
    assert result["averaged_checkpoint"] == str(path)
    assert not list(path.parent.glob("*.tmp"))
    averaged = model_state(read_checkpoint(path))
    members = [model_state(read_checkpoint(tiny_run / "checkpoints" / n)) for n in result["checkpoints"]]
    name = "model.head.weight"
    torch.testing.assert_close(averaged[name], sum(m[name] for m in members) / 3)
    # a Lightning checkpoint like the others: LMModule rebuilds it
    assert isinstance(LMModule.load_from_checkpoint(path, map_location="cpu").model, LanguageModel)
    losses = [m["loss"] for m in result["members"]]
    assert math.isfinite(result["loss"]) and result["loss"] <= max(losses)
    # the averaged file never counts as a top-k checkpoint
    assert path not in [p for p, _ in RunDir(tiny_run).ranked_checkpoints()]


def test_checkpoint_ranking_survives_a_moved_run_and_a_missing_last_ckpt(tiny_run, tmp_path):
    ranked = RunDir(tiny_run).ranked_checkpoints()
    scores = [s for _, s in ranked]
    assert scores == sorted(scores) and len(ranked) >= 3
    copy = broken_copy(tiny_run, tmp_path)  # best_k_models in last.ckpt still name the old directory
    assert [(p.name, s) for p, s in RunDir(copy).ranked_checkpoints()] == [(p.name, s) for p, s in ranked]
    (copy / "checkpoints" / "last.ckpt").unlink()  # scores now come from the file names (4 decimals)
    from_names = RunDir(copy).ranked_checkpoints()
    assert [p.name for p, _ in from_names] == [p.name for p, _ in ranked]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(from_names, ranked))
    with pytest.raises(CheckpointError, match="last.ckpt does not exist"):
        RunDir(copy).checkpoint("last")


def test_eval_plots_redraw_the_training_curves(tiny_run):
    (tiny_run / "curves.png").unlink(missing_ok=True)
    result = evaluate(eval_cfg(tiny_run, ckpt="last", plots=True, name="last-with-plots"))
    assert Path(result["curves"]).stat().st_size > 0
    assert (tiny_run / "eval" / "last-with-plots.json").exists()


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_cli_errors_exit_2_with_a_message_and_no_traceback(tool, tiny_run, tmp_path, capsys):
    main = __import__(f"ssmlm.{tool}", fromlist=["main"]).main
    cases = [
        ([f"run_dir={tmp_path / 'nowhere'}"], "no such directory"),
        ([f"run_dir={tiny_run}", "ckpt=missing.ckpt"], "ckpt=missing.ckpt: no such checkpoint"),
        ([f"run_dir={tiny_run}", "colour=blue"], "unknown key 'colour'"),
        (["prompt=x"] if tool == "generate" else ["split=val"], "pass run_dir="),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_missing_or_foreign_vocabulary_is_a_clear_error(tiny_run, tmp_path):
    copy = broken_copy(tiny_run, tmp_path)
    vocab = copy / "vocab.json"
    vocab.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="vocab.json is not a vocabulary"):
        generate(gen_cfg(copy))
    vocab.write_text(json.dumps(CharTokenizer.build("abc").to_dict()), encoding="utf-8")
    with pytest.raises(CheckpointError, match="belongs to another run"):
        generate(gen_cfg(copy))
    vocab.unlink()  # the checkpoint still carries the vocabulary ...
    assert len(generate(gen_cfg(copy, prompt="राजा"))) == 1
    best = RunDir(copy).checkpoint("best")  # ... unless it does not either
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["tokenizer"] = None
    save_checkpoint(ckpt, best)  # with its digest, as ssmlm-train writes checkpoints
    with pytest.raises(DataError, match="vocab.json is missing and the checkpoint stores none"):
        generate(gen_cfg(copy))


def test_broken_checkpoints_and_bad_requests_are_clear_errors(tiny_run, tmp_path):
    copy = broken_copy(tiny_run, tmp_path)
    best = RunDir(copy).checkpoint("best")
    best.write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{best.name}"):
        generate(gen_cfg(copy))
    with pytest.raises(CheckpointError, match=r"holds \d+ scored ones"):
        evaluate(eval_cfg(tiny_run, ensemble=9))
    with pytest.raises(ConfigError, match="not both"):
        evaluate(eval_cfg(tiny_run, ensemble=2, average=2))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        generate(gen_cfg(tiny_run, cuda_graph=True))
    shutil.rmtree(copy / "checkpoints")
    shutil.rmtree(copy / ".hydra")
    (copy / "config.yaml").unlink()  # the config the run was accepted with
    with pytest.raises(ConfigError, match="is not a training run"):
        RunDir(copy)


# ----------------------------------------------------------------------------------- small guarantees
class PrefersSpecials(torch.nn.Module):
    """A model whose every prediction puts almost all its mass on the given ids."""

    def __init__(self, model, ids: list[int]):
        super().__init__()
        self.model, self.ids = model, ids

    def _boost(self, logits):
        return logits.index_add(-1, torch.tensor(self.ids), torch.full((*logits.shape[:-1], len(self.ids)), 100.0))

    def forward(self, tokens, return_state=False):
        logits, state = self.model(tokens, return_state=True)
        return self._boost(logits), state

    def step(self, token, state):
        logits, state = self.model.step(token, state)
        return self._boost(logits), state


def test_special_tokens_are_never_sampled(tiny_run):
    """<pad> and <unk> stand for no text: even a model that puts all its mass on them never emits them."""
    ckpt = read_checkpoint(RunDir(tiny_run).checkpoint("best"))
    tokenizer = RunDir(tiny_run).tokenizer(ckpt)
    banned = never_sampled(tokenizer)
    assert banned == [tokenizer.pad_id, tokenizer.unk_id]
    model = PrefersSpecials(build_model(ckpt), banned)
    logits, state = Decoder(model).prefill(torch.tensor([tokenizer.encode("राजा")]))
    assert int(logits.argmax(-1)) in banned  # what an unguarded decoder would emit
    decoder = Decoder(model, banned=banned)
    for temperature in (0.0, 1.0, 5.0):
        generator = torch.Generator().manual_seed(0)
        tokens = [int(t) for t in decoder.tokens(logits, state, 50, Sampling(temperature=temperature), generator)]
        assert not set(tokens) & set(banned), temperature


def test_errors_suggest_only_checkpoints_the_run_has(tiny_run, tmp_path):
    copy = broken_copy(tiny_run, tmp_path)
    (copy / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError) as info:
        RunDir(copy).checkpoint("missing.ckpt")
    assert "ckpt=best" in str(info.value) and "ckpt=last" not in str(info.value)
    for scored in (copy / "checkpoints").glob("epoch*.ckpt"):
        scored.unlink()
    with pytest.raises(CheckpointError) as info:
        RunDir(copy).checkpoint("best")
    assert "never validated" in str(info.value) and "ckpt=last" not in str(info.value)


def test_eval_warns_when_the_text_is_all_unknown_characters(tiny_run, tmp_path, capsys):
    foreign = tmp_path / "latin.txt"
    foreign.write_text("αβγδεζηθ" * 500, encoding="utf-8")  # not one of these is in the Hindi vocabulary
    result = evaluate(eval_cfg(tiny_run, name="all-unk", **{"data": {"test_path": str(foreign)}}))
    assert "warning" in result and "is <unk>" in capsys.readouterr().err
