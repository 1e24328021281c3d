"""A whole Mamba LM against mamba_ssm on one GPU, in one process: training step and decoding.

Parts B and C of ``../shared/peers/peer_bench.py``, the measurement ssmlm's Mamba is judged by:

* ``B``: one training step (bf16 autocast, fused AdamW, byte vocabulary) at three configs -- 34M (d512 x 20,
  batch 16, L 1024), 91M (d768 x 24, B8 L2048), 3.6M (d256 x 8, B8 L8192) -- tokens/s and peak memory, for
  ssmlm's ``MambaLM`` (fused Triton path; ``+compile`` under ``torch.compile``; ``[save_xz]`` the fused mixer
  keeping in_proj's output instead of recomputing it; ``[unfused]`` the PyTorch mixer around the Triton scan,
  as before issue 14) and mamba_ssm's ``MambaLMHeadModel`` on its fused path
  (causal-conv1d, fused add + norm, residual in fp32).
* ``C``: decoding tokens/s of the 91M model at batch 1 and 16 after a 128-token prompt: ssmlm's recurrent
  step eager and replayed from a CUDA graph, mamba_ssm's ``generate`` with and without ``cg``. peer_bench
  times mamba_ssm's whole ``generate`` (prefill included, ``tok_per_s_with_prefill``); ``tok_per_s`` here
  subtracts a ``generate`` of one token, so both sides count decoding alone.

mamba_ssm is imported only when present (``--peers DIR`` holding ``mamba_ssm/`` and ``causal_conv1d/``, the
compiled ``selective_scan_cuda`` / ``causal_conv1d_cuda`` on ``PYTHONPATH`` or under /tmp/peer_build); without
it the ssmlm rows run alone. Ratios are ssmlm / mamba_ssm within this run (timings move 15-40% between
machines). Speed targets live here, not in tests.

    python scripts/bench_mamba.py --parts CB --peers .peers --json $OUT/bench_mamba.json --record mamba_lm.json
    python scripts/bench_mamba.py --parts P --profile-config 34M --peers .peers     # where the step's time goes
    python scripts/bench_mamba.py --parts S        # the scan's bf16 launch configurations at the LM shapes
    python scripts/bench_mamba.py --parts T --train-steps 300 -- experiment=tinystories_34m data.train_path=...

* ``T``: ``ssmlm-train`` (the whole CLI: data loading, Lightning, logging, checkpoints) against a bare loop of
  the same LightningModule's model and optimizer on random tokens, in one run: the framework's overhead as
  ``train_vs_bare``. The trailing arguments are ssmlm-train overrides (default: ``experiment=tinystories_34m``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssmlm.models.mamba import MambaLM, MambaMixer  # noqa: E402

TRAIN_CONFIGS = [("34M", 512, 20, 16, 1024), ("91M", 768, 24, 8, 2048), ("3.6M", 256, 8, 8, 8192)]
VOCAB = 256


def import_mamba_ssm(peers: Path | None):
    """mamba_ssm's LM class, or None (with the reason printed) where it is not importable."""
    if peers is not None:
        sys.path[:0] = [str(peers), "/tmp/peer_build/ss", "/tmp/peer_build/cc"]
    try:
        import causal_conv1d_cuda  # noqa: F401
        import selective_scan_cuda  # noqa: F401
    except Exception as e:
        print(f"# mamba_ssm's CUDA kernels are not importable ({type(e).__name__}: {e}): ssmlm rows only")
        return None
    try:  # its __init__ pulls Mamba-3 (tilelang, cute), which Mamba-1 does not need
        import mamba_ssm.modules.mamba3  # noqa: F401
    except Exception:
        stub = types.ModuleType("mamba_ssm.modules.mamba3")
        stub.Mamba3 = None
        sys.modules["mamba_ssm.modules.mamba3"] = stub
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    def build(d_model, n_layer):
        cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1"},
                          rms_norm=True, fused_add_norm=True, residual_in_fp32=True)
        return MambaLMHeadModel(cfg, device="cuda")

    return build


class Unfused:
    """Within the block, MambaMixer takes its PyTorch path (the Triton scan still runs): the pre-issue-14 model."""

    def __enter__(self):
        self.saved = MambaMixer._fused
        MambaMixer._fused = lambda self, x: False

    def __exit__(self, *exc):
        MambaMixer._fused = self.saved


class SaveXZ:
    """The fused mixer keeps in_proj's output for its backward instead of recomputing it."""

    def __enter__(self):
        from ssmlm.ops import mamba_inner

        self.module, self.saved = mamba_inner, mamba_inner.SAVE_XZ
        mamba_inner.SAVE_XZ = True

    def __exit__(self, *exc):
        self.module.SAVE_XZ = self.saved


VARIANTS = {"ssmlm[unfused]": Unfused, "ssmlm[save_xz]": SaveXZ}


def build_model(kind: str, d_model: int, n_layer: int, mamba_ssm):
    if kind == "mamba_ssm":
        m = mamba_ssm(d_model, n_layer)
        return m, (lambda t: m(t).logits)
    m = MambaLM(VOCAB, d_model=d_model, n_layers=n_layer, d_state=16, scan_backend="triton").cuda()
    if kind.endswith("+compile"):
        # fixed shapes per config: without dynamic=False the second config recompiles with symbolic sizes,
        # which Dynamo 2.11 cannot pass to a user Triton kernel's launch grid
        torch._dynamo.reset()
        return m, torch.compile(m, dynamic=False)
    return m, m


def release():
    """Free what the last row left (compiled graphs hold their model): the next row's memory starts clean."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def train_step_fn(kind, d_model, n_layer, batch, L, mamba_ssm):
    """(model, one training step) for a model kind at a config."""
    torch.manual_seed(0)
    m, fwd = build_model(kind, d_model, n_layer, mamba_ssm)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, VOCAB, (batch, L + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return m, step


def train_row(kind, label, d_model, n_layer, batch, L, mamba_ssm, steps) -> dict:
    """Tokens/s over ``steps`` steps after 4 warm-up steps, and the peak memory above what was allocated before
    the model was built (parameters, gradients, optimizer state, activations, workspaces)."""
    row = dict(config=label, d_model=d_model, n_layer=n_layer, batch=batch, L=L, model=kind)
    release()
    baseline = torch.cuda.memory_allocated()
    m, step = train_step_fn(kind, d_model, n_layer, batch, L, mamba_ssm)
    row["params_M"] = round(sum(p.numel() for p in m.parameters()) / 1e6, 2)
    loss0 = step().item()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row.update(loss0=round(loss0, 3), loss_last=round(last.item(), 3), ms_per_step=round(1e3 * seconds / steps, 2),
               tok_per_s=round(batch * L * steps / seconds),
               peak_GiB=round((torch.cuda.max_memory_allocated() - baseline) / 2**30, 3))
    return row


def part_b(kinds, mamba_ssm, steps, configs, rounds) -> list[dict]:
    """Each config: ``rounds`` rounds over the kinds, in reverse order every other round (compiled kinds in the
    first round only); a kind's row is its fastest round, with every round's tokens/s beside it."""
    rows = []
    for label, d, n, batch, L in TRAIN_CONFIGS:
        if configs and label not in configs:
            continue
        best = {}
        for r in range(rounds):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                if (kind == "mamba_ssm" and mamba_ssm is None) or ("compile" in kind and r > 0):
                    continue
                try:
                    with VARIANTS.get(kind, contextlib.nullcontext)():
                        row = train_row(kind, label, d, n, batch, L, mamba_ssm, steps)
                except Exception as e:
                    traceback.print_exc()
                    row = dict(config=label, model=kind, error=f"{type(e).__name__}: {str(e)[:200]}")
                print(json.dumps(row), flush=True)
                prev = best.get(kind)
                rounds_seen = (prev or {}).get("tok_per_s_rounds", []) + [row.get("tok_per_s")]
                if prev is None or row.get("tok_per_s", 0) > prev.get("tok_per_s", 0):
                    best[kind] = row
                best[kind]["tok_per_s_rounds"] = rounds_seen
        rows += [best[k] for k in kinds if k in best]
    release()
    return rows


def part_p(mamba_ssm, config, kinds=("ssmlm", "mamba_ssm"), steps=3, top=22) -> dict:
    """Where a training step's GPU time goes: torch.profiler's CUDA kernels, top ``top`` by total time."""
    from torch.profiler import ProfilerActivity, profile

    label, d, n, batch, L = next(c for c in TRAIN_CONFIGS if c[0] == config)
    tables = {}
    for kind in kinds:
        if kind == "mamba_ssm" and mamba_ssm is None:
            continue
        release()
        _, step = train_step_fn(kind, d, n, batch, L, mamba_ssm)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        events.sort(key=lambda e: -e.device_time_total)
        total_ms = sum(e.device_time_total for e in events) / 1e3 / steps
        rows = [dict(kernel=e.key[:90], ms_per_step=round(e.device_time_total / 1e3 / steps, 3),
                     calls_per_step=e.count // steps) for e in events[:top]]
        tables[kind] = dict(config=label, kernel_ms_per_step=round(total_ms, 2), top=rows)
        print(f"\n# {kind} at {label}: {total_ms:.1f} ms of kernels per step", flush=True)
        for r in rows:
            print(f"  {r['ms_per_step']:8.3f} ms {r['calls_per_step']:5d}x  {r['kernel']}", flush=True)
    release()
    return tables


@torch.inference_mode()
def decode_ssmlm(m, batch, mode, new, weights):
    from ssmlm.generate import GraphedStep

    prompt = torch.randint(0, VOCAB, (batch, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == "fp32"):
        logits, state = m(prompt, return_state=True)
        tok = logits[:, -1].argmax(-1)
        graph = GraphedStep(m, state) if mode == "graph" else None
        for _ in range(5):
            logits = graph(tok) if graph else m.step(tok, state)[0]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            if graph:
                logits = graph(tok)
            else:
                logits, state = m.step(tok, state)
            tok = logits.argmax(-1)
        torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - t0)


def measure_row(rows: list, row: dict, measure) -> None:
    """row updated with measure()'s fields (or the error it raised), printed and appended to rows."""
    try:
        row.update(measure())
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(json.dumps(row), flush=True)
    rows.append(row)


def part_c(mamba_ssm, batches, new=512, d_model=768, n_layer=24) -> list[dict]:
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        m = MambaLM(VOCAB, d_model=d_model, n_layers=n_layer, d_state=16, scan_backend="triton").cuda().eval()
        for weights in ("fp32", "bf16"):  # fp32 weights under bf16 autocast (as peer_bench), or bf16 weights
            if weights == "bf16":
                m = m.to(torch.bfloat16)
            for mode in ("eager", "graph"):
                row = dict(batch=batch, model=f"ssmlm[{mode}] {weights} weights"
                           + (" bf16 autocast" if weights == "fp32" else ""))
                measure_row(rows, row, lambda: {"tok_per_s": round(decode_ssmlm(m, batch, mode, new, weights), 1)})
        del m
        if mamba_ssm is None:
            continue
        torch.manual_seed(0)
        m = mamba_ssm(d_model, n_layer).eval().to(torch.bfloat16)
        prompt = torch.randint(0, VOCAB, (batch, 128), device="cuda")

        def generate_speed(cg):
            m.generate(prompt, max_length=128 + 16, cg=cg)
            seconds = {}
            for n in (1, new):  # prefill + 1 token, prefill + new tokens: the difference is decoding alone
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                m.generate(prompt, max_length=128 + n, cg=cg)
                torch.cuda.synchronize()
                seconds[n] = time.perf_counter() - t0
            return {"tok_per_s_with_prefill": round(batch * new / seconds[new], 1),  # peer_bench's number
                    "tok_per_s": round(batch * (new - 1) / (seconds[new] - seconds[1]), 1)}

        for cg in (False, True):
            measure_row(rows, dict(batch=batch, model=f"mamba_ssm[cg={cg}] bf16 weights"), lambda: generate_speed(cg))
        del m
        torch.cuda.empty_cache()
    return rows


def part_s(shapes=((8, 512, 16, 8192), (16, 1024, 16, 1024), (8, 1536, 16, 2048)), dt_rank=48) -> list[dict]:
    """The scan's launch configurations at the LM configs' scan shapes (bf16), forward and backward timed apart,
    inputs in the fused mixer's (dim, batch, L) layout with B and C slices of one x_dbl."""
    import math

    import triton

    from ssmlm.ops import triton_scan as ts

    base, saved, rows = ts.DEFAULT_CONFIGS[torch.bfloat16], ts.CONFIG, []
    variants = [{}, dict(fwd_block_d=8), dict(fwd_block_d=8, fwd_warps=2), dict(fwd_block_d=4, fwd_warps=2),
                dict(fwd_block_d=4, fwd_warps=1), dict(fwd_block_d=16, fwd_warps=4), dict(bwd_block_d=2)]
    for batch, dim, N, L in shapes:
        def dim_major(scale=1.0):
            return (scale * torch.randn(dim, batch, L, device="cuda")).bfloat16().permute(1, 0, 2)

        x_dbl = torch.randn(dt_rank + 2 * N, batch * L, device="cuda").bfloat16()
        B, C = (x_dbl[dt_rank + i * N:dt_rank + (i + 1) * N].view(N, batch, L).permute(1, 0, 2) for i in range(2))
        A = -torch.arange(1, N + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)
        dt = torch.exp(torch.rand(dim, device="cuda") * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        args = (dim_major(), dim_major(0.5), A, B, C, torch.ones(dim, device="cuda"), dim_major(),
                dt + torch.log(-torch.expm1(-dt)), True)
        dy = dim_major()
        for v in variants:
            ts.CONFIG = ts.ScanConfig(**{**base.__dict__, **v})
            _, states = ts.scan_forward(*args)
            fwd = triton.testing.do_bench(lambda: ts.scan_forward(*args), warmup=25, rep=150, return_mode="median")
            bwd = triton.testing.do_bench(lambda: ts.scan_backward(*args, states, dy), warmup=25, rep=150,
                                          return_mode="median")
            rows.append(dict(shape=[batch, dim, N, L], variant=v, fwd_ms=round(fwd, 3), bwd_ms=round(bwd, 3)))
            print(json.dumps(rows[-1]), flush=True)
    ts.CONFIG = saved
    return rows


def summary(result) -> None:
    if "train_vs_bare" in result:
        r = result["train_vs_bare"]
        print(f"\n# ssmlm-train {r['ssmlm_train_tok_s']:,} tok/s, bare loop {r['bare_loop_tok_s']:,} tok/s: "
              f"{r['train_vs_bare']:.3f}x ({' '.join(r['overrides'])}, {r['precision']})")
    if result.get("lm_train"):
        print("\n# training step (bf16 autocast): tokens/s, peak GiB; ratio to mamba_ssm")
    by_config = {}
    for r in result.get("lm_train", []):
        by_config.setdefault(r["config"], {})[r["model"]] = r
    for config, rows in by_config.items():
        peer = rows.get("mamba_ssm", {})
        for kind, r in rows.items():
            if "error" in r:
                print(f"  {config:5s} {kind:16s} {r['error']}")
                continue
            ratio = ""
            if peer.get("tok_per_s") and kind != "mamba_ssm":
                ratio = (f"  speed {r['tok_per_s'] / peer['tok_per_s']:.2f}x  memory "
                         f"{r['peak_GiB'] / peer['peak_GiB']:.2f}x")
            print(f"  {config:5s} {kind:16s} {r['tok_per_s']:>10,} tok/s  {r['peak_GiB']:6.2f} GiB{ratio}")
    if result.get("decode"):
        print("\n# decoding, 91M model: tokens/s")
    for r in result.get("decode", []):
        print(f"  B{r['batch']:<3d} {r['model']:42s} {r.get('tok_per_s', r.get('error'))}")


def part_t(overrides: list[str], steps: int, bare_steps: int = 20) -> dict:
    """ssmlm-train's training tokens/s (``results.json``: the intervals between steps, validation and the first
    steps left out) against a bare loop of the model and optimizer that run's checkpoint rebuilds, same batch,
    sequence length, precision and gradient accumulation, on random tokens already on the device."""
    import subprocess
    import tempfile

    from omegaconf import OmegaConf

    from ssmlm import resolvers
    from ssmlm.lm import LMModule, build_param_groups, warmup_cosine

    resolvers.register()  # the saved config's ${ssmlm.*} interpolations (micro-batch, accumulation, precision)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ssmlm.train", *overrides, f"trainer.max_steps={steps}",
               "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
               "logger=csv", "trainer.enable_progress_bar=false",
               "test_after_fit=false", f"hydra.run.dir={tmp}"]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        results = json.loads((Path(tmp) / "results.json").read_text())
        cfg = OmegaConf.load(Path(tmp) / "config.yaml")
        hparams = torch.load(Path(tmp) / "checkpoints" / "last.ckpt", map_location="cpu",
                             weights_only=False)["hyper_parameters"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = LMModule(**hparams).to(device).train()
    module.configure_model()
    o = hparams["optim"]
    opt = torch.optim.AdamW(build_param_groups(module.model, o["lr"], o["weight_decay"]), lr=o["lr"],
                            betas=tuple(o.get("betas", (0.9, 0.999))))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, 0, steps, 0.1))
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    batch, L = int(cfg.data.batch_size), int(cfg.data.seq_len)
    tokens = torch.randint(0, hparams["vocab_size"], (accumulate, batch, L + 1), device=device)

    def step():
        for micro in tokens:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = module._loss(module(micro[:, :-1]), micro[:, 1:]) / accumulate
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(bare_steps):
        step()
    sync()
    bare = accumulate * batch * L * bare_steps / (time.perf_counter() - t0)
    row = dict(overrides=overrides, precision=precision, batch=batch, L=L, accumulate=accumulate,
               params_M=round(results["params"] / 1e6, 2), train_steps=steps,
               ssmlm_train_tok_s=round(results["train_tokens_per_s"]), bare_loop_tok_s=round(bare))
    row["train_vs_bare"] = round(row["ssmlm_train_tok_s"] / row["bare_loop_tok_s"], 3)
    print(json.dumps(row), flush=True)
    return row


def records(result) -> list[dict]:
    """The rows docs/benchmarks/mamba_lm.json keeps: one per training config and per decoding batch and mode,
    each with the date, device, torch and Triton versions."""
    train = {}
    for r in result.get("lm_train", []):
        if "tok_per_s" not in r:
            continue
        row = train.setdefault(r["config"], {"config": r["config"], "d_model": r["d_model"], "n_layer": r["n_layer"],
                                             "batch": r["batch"], "L": r["L"]})
        key = {"ssmlm": "ssmlm", "mamba_ssm": "mamba_ssm", "ssmlm+compile": "ssmlm_compile",
               "ssmlm[unfused]": "ssmlm_unfused", "ssmlm[save_xz]": "ssmlm_save_xz"}.get(r["model"])
        if key:
            row[f"{key}_tok_s"], row[f"{key}_GiB"] = r["tok_per_s"], r["peak_GiB"]
    decode = {}
    for r in result.get("decode", []):
        if "tok_per_s" not in r:
            continue
        mode = "graph" if "[graph]" in r["model"] or "cg=True" in r["model"] else "eager"
        row = decode.setdefault((r["batch"], mode), {"batch": r["batch"], "mode": mode, "new_tokens": 512})
        if r["model"].startswith("mamba_ssm"):
            row["mamba_ssm_tok_s"] = r["tok_per_s"]
            row["mamba_ssm_with_prefill_tok_s"] = r.get("tok_per_s_with_prefill")
        elif "bf16 weights" in r["model"] and "autocast" not in r["model"]:
            row["ssmlm_bf16_weights_tok_s"] = r["tok_per_s"]
        else:
            row["ssmlm_tok_s"] = r["tok_per_s"]
    for rows in (train.values(), decode.values()):
        for row in rows:
            if row.get("mamba_ssm_tok_s") and row.get("ssmlm_tok_s"):
                row["speed_ratio"] = round(row["ssmlm_tok_s"] / row["mamba_ssm_tok_s"], 3)
            if row.get("mamba_ssm_GiB") and row.get("ssmlm_GiB"):
                row["memory_ratio"] = round(row["ssmlm_GiB"] / row["mamba_ssm_GiB"], 3)
    meta = {k: result[k] for k in ("date", "device", "torch", "triton")}
    return ([{"part": "train", **row, **meta} for row in train.values()]
            + [{"part": "decode", **row, **meta} for row in decode.values()])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="BC")
    p.add_argument("--peers", type=Path, help="folder holding mamba_ssm/ and causal_conv1d/ (peer_bench's copy)")
    p.add_argument("--kinds", nargs="+", default=["ssmlm", "ssmlm+compile", "ssmlm[unfused]", "mamba_ssm"])
    p.add_argument("--configs", nargs="*", default=[], help="subset of 34M 91M 3.6M")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="rounds over the kinds per config (best one reported)")
    p.add_argument("--profile-config", default="34M", help="part P: the config whose training step is profiled")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--json", type=Path, help="every row measured")
    p.add_argument("--record", type=Path, help="the summary rows (docs/benchmarks/mamba_lm.json's format)")
    p.add_argument("--train-steps", type=int, default=300, help="part T: ssmlm-train's steps")
    p.add_argument("train_overrides", nargs="*", default=["experiment=tinystories_34m"],
                   help="part T: ssmlm-train overrides (after --)")
    args = p.parse_args()
    import triton

    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "triton": triton.__version__}
    mamba_ssm = import_mamba_ssm(args.peers) if set(args.parts) & set("BCP") else None
    print(json.dumps(result), flush=True)
    for part in args.parts:
        t0 = time.time()
        if part == "B":
            result["lm_train"] = part_b(args.kinds, mamba_ssm, args.steps, args.configs, args.rounds)
        elif part == "P":
            result["profile"] = part_p(mamba_ssm, args.profile_config)
        elif part == "S":
            result["scan_configs"] = part_s()
        elif part == "C":
            result["decode"] = part_c(mamba_ssm, args.decode_batches)
        elif part == "T":
            result["train_vs_bare"] = part_t(args.train_overrides, args.train_steps)
        print(f"# part {part} took {time.time() - t0:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    summary(result)
    if args.record:
        args.record.write_text(json.dumps(records(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
