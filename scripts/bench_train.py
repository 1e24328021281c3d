"""Training speed of ssmlm models on the current device.

1. The diag SSM's parallel FFT form against the reference's Python loop over time (forward + backward of
   one DiagSSM LM at the `small` preset, several seq_len), with the speed-up printed as a ratio.
2. End-to-end training tokens/s of a model at a preset on real data (the default experiment unless told).

    python scripts/bench_train.py                      # both parts, CPU or GPU, whatever is here
    python scripts/bench_train.py --seq-lens 128 512 2048 --skip-train
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
                block.ssm.backend = backend
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-max-len", type=int, default=1024, help="longest L timed with the (slow) loop")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-overrides", nargs="*", default=[], help="ssmlm-train overrides (default experiment)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print("diag SSM LM (small preset: emb 64, hidden 256, 4 layers), forward+backward, parallel FFT vs loop:")
    result = {"device": name, "torch": torch.__version__,
              "parallel_vs_loop": bench_parallel_vs_loop(device, args.seq_lens, args.batch, args.repeats,
                                                         args.loop_max_len)}
    if not args.skip_train:
        print(f"end-to-end training ({args.train_steps} steps), overrides {args.train_overrides or '(default run)'}:")
        result["training"] = bench_training(args.train_overrides, args.train_steps)
        print(f"  {result['training']['train_tokens_per_s']:.0f} tokens/s "
              f"({result['training']['params'] / 1e6:.3f}M params)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
