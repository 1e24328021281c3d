"""Training speed of ssmlm models on the current device.

1. The diag SSM's parallel FFT form against the reference's Python loop over time (forward + backward of
   one DiagSSM LM at the `small` preset, several seq_len), with the speed-up printed as a ratio.
2. End-to-end training tokens/s of a model at a preset on real data (the default experiment unless told).
3. ``--lm-sweep``: training-step tokens/s and peak memory of the Mamba LM (byte vocabulary, presets × seq_len)
   with each scan backend, against an equal-config mambapy ``Mamba`` LM (if installed) and the Transformer
   baseline at equal parameters; prints where the SSM overtakes the Transformer.

    python scripts/bench_train.py                      # parts 1 and 2, CPU or GPU, whatever is here
    python scripts/bench_train.py --seq-lens 128 512 2048 --skip-train
    python scripts/bench_train.py --skip-loop --skip-train --lm-sweep --lm-seq-lens 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssmlm.models.diag_ssm import DiagSSMLM  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_parallel_vs_loop(device, seq_lens, batch, repeats, loop_max_len):
    rows = []
    model = DiagSSMLM(vocab_size=141, emb_dim=64, ssm_hidden=256, n_layers=4).to(device)
    for L in seq_lens:
        tokens = torch.randint(0, 141, (batch, L), device=device)

        def fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(tokens).float().logsumexp(-1).mean().backward()

        row = {"seq_len": L, "batch": batch}
        for backend in ("fft", "ref"):
            if backend == "ref" and L > loop_max_len:
                continue
            for block in model.blocks:
                block.mixer.backend = backend
            row[f"{backend}_ms"] = 1e3 * timed(fwd_bwd, device, repeats if backend == "fft" else 1)
        if "ref_ms" in row:
            row["speedup"] = row["ref_ms"] / row["fft_ms"]
        rows.append(row)
        print(f"  L={L:6d}  parallel {row['fft_ms']:9.2f} ms   loop "
              + (f"{row['ref_ms']:10.1f} ms   speed-up {row['speedup']:7.1f}x" if "ref_ms" in row else "(skipped)"),
              flush=True)
    return rows


def bench_training(overrides: list[str], steps: int) -> dict:
    """Runs ssmlm-train for a few hundred steps and reads train tokens/s from results.json."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ssmlm.train", *overrides, f"trainer.max_steps={steps}",
               "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "logger=csv",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}"]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        results = json.loads((Path(tmp) / "results.json").read_text())
    return {"overrides": overrides, "steps": steps, "train_tokens_per_s": results.get("train_tokens_per_s"),
            "params": results["params"]}


def compose_model(model: str, preset: str, seq_len: int, overrides=()):
    """The model a ``ssmlm-train model=... experiment=... data=tinystories_bytes`` run would build."""
    import hydra
    from hydra import compose, initialize_config_dir

    from ssmlm import resolvers

    resolvers.register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"experiment={preset}", "data=tinystories_bytes",
                                          f"data.seq_len={seq_len}", *overrides])
    return hydra.utils.instantiate(cfg.model, vocab_size=257), cfg


class MambapyLM(torch.nn.Module):
    """mambapy's Mamba stack (its pscan scan) with embedding, final RMSNorm and head, as its own LM class has;
    built here because mambapy.lm also imports its Mamba-2 module, which needs mamba_ssm."""

    def __init__(self, cfg):
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        m = cfg.model
        config = MambaConfig(d_model=int(m.d_model), n_layers=int(m.n_layers), d_state=int(m.d_state),
                             expand_factor=int(m.expand), d_conv=int(m.d_conv), pscan=True)
        self.embedding = torch.nn.Embedding(257, config.d_model)
        self.mamba = Mamba(config)
        self.norm_f = RMSNorm(config.d_model, config.rms_norm_eps, config.mup)
        self.lm_head = torch.nn.Linear(config.d_model, 257, bias=False)

    def forward(self, tokens):
        return self.lm_head(self.norm_f(self.mamba(self.embedding(tokens))))


def train_step_speed(net, batch: int, seq_len: int, device, steps: int = 10) -> dict:
    """Median training-step time (bf16 autocast on CUDA, AdamW) -> tokens/s and peak memory."""
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    tokens = torch.randint(0, 257, (batch, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:, :257], y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": 1e3 * seconds, "tokens_per_s": batch * seq_len / seconds, "peak_gib": peak,
            "params": sum(p.numel() for p in net.parameters())}


def lm_sweep(device, presets, seq_lens, only=()) -> list[dict]:
    rows = []
    for preset in presets:
        for L in seq_lens:
            candidates = []
            for backend in ("triton", "chunked"):
                candidates.append((f"mamba[{backend}]", lambda b=backend: compose_model(
                    "mamba", preset, L, [f"hardware.scan_backend={b}"])[0]))
            try:
                import mambapy.mamba  # noqa: F401

                candidates.append(("mambapy", lambda: MambapyLM(compose_model("mamba", preset, L)[1])))
            except ImportError:
                pass
            candidates.append(("transformer", lambda: compose_model("transformer", preset, L,
                                                                    [f"model.max_seq_len={L}"])[0]))
            candidates = [c for c in candidates if not only or c[0] in only]
            _, cfg = compose_model("mamba", preset, L)
            batch = int(cfg.batch_size)
            for name, build in candidates:
                row = {"preset": preset, "seq_len": L, "batch": batch, "model": name}
                try:
                    row.update(train_step_speed(build(), batch, L, device))
                except Exception as e:  # out of memory or an unavailable backend: report it, go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                if "error" in row:
                    print(f"  {preset:6s} L={L:5d} B={batch:2d} {name:16s} {row['error']}", flush=True)
                else:
                    print(f"  {preset:6s} L={L:5d} B={batch:2d} {name:16s} {row['params'] / 1e6:6.2f}M "
                          f"{row['ms']:8.1f} ms {row['tokens_per_s']:12,.0f} tok/s {row['peak_gib']:6.2f} GiB",
                          flush=True)
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["preset"], r["seq_len"]), {})[r["model"]] = r.get("tokens_per_s")
    print("\nratios (tokens/s):")
    for (preset, L), cell in by_cell.items():
        ours = cell.get("mamba[triton]")
        parts = [f"{preset:6s} L={L:5d}"]
        for peer in ("mambapy", "mamba[chunked]", "transformer"):
            if ours and cell.get(peer):
                parts.append(f"triton/{peer} = {ours / cell[peer]:.2f}x")
        print("  " + "   ".join(parts))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-max-len", type=int, default=1024, help="longest L timed with the (slow) loop")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-loop", action="store_true", help="skip part 1 (parallel vs loop)")
    p.add_argument("--lm-sweep", action="store_true", help="part 3: Mamba LM backends vs mambapy vs Transformer")
    p.add_argument("--lm-presets", nargs="+", default=["small", "large"])
    p.add_argument("--lm-seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--lm-models", nargs="*", default=[],
                   help="subset of mamba[triton] mamba[chunked] mambapy transformer (default: all)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-overrides", nargs="*", default=[], help="ssmlm-train overrides (default experiment)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    result = {"device": name, "torch": torch.__version__}
    if not args.skip_loop:
        print("diag SSM LM (small preset: emb 64, hidden 256, 4 layers), forward+backward, parallel FFT vs loop:")
        result["parallel_vs_loop"] = bench_parallel_vs_loop(device, args.seq_lens, args.batch, args.repeats,
                                                            args.loop_max_len)
    if not args.skip_train:
        print(f"end-to-end training ({args.train_steps} steps), overrides {args.train_overrides or '(default run)'}:")
        result["training"] = bench_training(args.train_overrides, args.train_steps)
        print(f"  {result['training']['train_tokens_per_s']:.0f} tokens/s "
              f"({result['training']['params'] / 1e6:.3f}M params)")
    if args.lm_sweep:
        print("LM training step (bf16 autocast, AdamW), byte vocabulary, preset batch sizes:")
        result["lm_sweep"] = lm_sweep(device, args.lm_presets, args.lm_seq_lens, args.lm_models)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
