"""Decoding speed (tokens/s) of each model family, after prompts of several lengths, at batch 1 and 16.

Methods, all sampling one token per sequence per step:

* ``step``: the prompt once in parallel, then the recurrent ``step`` per token (the SSMs' O(1) state; the
  Transformer's KV cache) -- what ``ssmlm-generate`` does;
* ``step+graph``: the same step replayed from a CUDA graph (CUDA only, states made of tensors only);
* ``recompute``: the whole sequence through the parallel ``forward`` for every new token (no state).

Models are random-init at a size preset (``small`` by default): speed does not depend on the weights.

    python scripts/bench_generate.py                                  # CPU: prompts 128 and 1k
    python scripts/bench_generate.py --prompt-lens 128 1024 4096 16384 --out bench_generate.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssmlm import resolvers  # noqa: E402
from ssmlm.generate import Decoder  # noqa: E402
from ssmlm.sampling import Sampling  # noqa: E402

FAMILIES = ("diag_ssm", "s4d", "mamba", "transformer")
VOCAB = 257  # the byte vocabulary
resolvers.register()


def build(family: str, preset: str, max_len: int, device: torch.device):
    """A random-init model of ``family`` at ``preset``, from the same yaml files ssmlm-train composes."""
    model_yaml = REPO / "conf" / "model" / f"{family}.yaml"
    if not model_yaml.exists():
        return None
    size = OmegaConf.load(REPO / "conf" / "train.yaml").size
    preset_yaml = REPO / "conf" / "experiment" / f"{preset}.yaml"
    if preset_yaml.exists():
        size = OmegaConf.merge(size, OmegaConf.load(preset_yaml).get("size", {}))
    cfg = OmegaConf.create({"size": size, "hardware": {"scan_backend": "auto"}, "data": {"seq_len": max_len}})
    cfg.model = OmegaConf.load(model_yaml)
    if "max_seq_len" in cfg.model:  # the KV cache must hold the longest prompt plus the new tokens
        cfg.model.max_seq_len = max_len
    try:
        model = hydra.utils.instantiate(cfg.model, vocab_size=VOCAB)
    except hydra.errors.InstantiationException as e:  # a family whose module is not in this tree
        print(f"  {family}: skipped ({e.__cause__ or e})", flush=True)
        return None
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_step_decoding(model, prompt, new_tokens: int, cuda_graph: bool, device, repeats: int) -> tuple[float, float]:
    """(prefill seconds, seconds to decode ``new_tokens`` steps), each the fastest of ``repeats`` after a
    short warm-up (which also captures the CUDA graph)."""
    decoder, sampling = Decoder(model, cuda_graph=cuda_graph), Sampling(temperature=1.0)
    generator = torch.Generator(device=device).manual_seed(0)
    logits, state = decoder.prefill(prompt)
    for _ in decoder.tokens(logits, state, 4, sampling, generator):
        pass
    prefills, decodes = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        logits, state = decoder.prefill(prompt)
        sync(device)
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens = list(decoder.tokens(logits, state, new_tokens, sampling, generator))
        sync(device)
        decodes.append(time.perf_counter() - start)
        assert len(tokens) == new_tokens
    return min(prefills), min(decodes)


@torch.inference_mode()
def time_recompute(model, prompt, new_tokens: int, device, repeats: int) -> float:
    """Seconds for ``new_tokens`` steps that each run the whole sequence so far through ``forward``
    (the fastest of ``repeats``)."""
    sampling, generator = Sampling(temperature=1.0), torch.Generator(device=device).manual_seed(0)
    sampling(model(prompt)[:, -1], generator)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        sequence = prompt
        for _ in range(new_tokens):
            token = sampling(model(sequence)[:, -1], generator)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def run(args) -> list[dict]:
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    prompt_lens = args.prompt_lens or ([128, 1024, 4096, 16384] if device.type == "cuda" else [128, 1024])
    max_len = max(prompt_lens) + max(args.new_tokens, args.recompute_tokens) + 8
    rows = []
    for family in args.families:
        model = build(family, args.preset, max_len, device)
        if model is None:
            continue
        params = model.num_params()
        for batch in args.batch_sizes:
            for length in prompt_lens:
                prompt = torch.randint(0, VOCAB, (batch, length), device=device)
                methods = ["step", "recompute"]
                if device.type == "cuda" and not args.no_graph:
                    methods.insert(1, "step+graph")
                for method in methods:
                    row = {"family": family, "params": params, "batch": batch, "prompt_len": length, "method": method}
                    try:
                        if method == "recompute":
                            n = args.recompute_tokens
                            seconds, prefill = time_recompute(model, prompt, n, device, args.repeats), None
                        else:
                            n = args.new_tokens
                            prefill, seconds = time_step_decoding(model, prompt, n, method == "step+graph", device,
                                                                  args.repeats)
                        row.update(new_tokens=n, seconds=seconds, tokens_per_s=batch * n / seconds,
                                   prefill_ms=None if prefill is None else 1e3 * prefill)
                    except torch.OutOfMemoryError:
                        row["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as e:  # noqa: BLE001  (e.g. a state a CUDA graph cannot hold)
                        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                    rows.append(row)
                    print(format_row(row), flush=True)
        del model
    return rows


def format_row(row: dict) -> str:
    head = f"{row['family']:12s} {row['params'] / 1e6:6.2f}M  B={row['batch']:<3d} L={row['prompt_len']:<6d} " \
           f"{row['method']:11s}"
    if "error" in row:
        return f"{head} {row['error']}"
    prefill = f"{row['prefill_ms']:9.1f}" if row["prefill_ms"] is not None else f"{'-':>9s}"
    return f"{head} {prefill} {row['tokens_per_s']:12.1f}"


def speedups(rows: list[dict]) -> None:
    """Adds, to each ``step*`` row, its speed-up over ``recompute`` at the same family, batch and prompt."""
    base = {(r["family"], r["batch"], r["prompt_len"]): r.get("tokens_per_s") for r in rows
            if r["method"] == "recompute"}
    for r in rows:
        reference = base.get((r["family"], r["batch"], r["prompt_len"]))
        if r["method"] != "recompute" and reference and r.get("tokens_per_s"):
            r["speedup_vs_recompute"] = r["tokens_per_s"] / reference


def table(rows: list[dict]) -> str:
    lines = ["| family | params | batch | prompt | method | prefill ms | tokens/s | vs recompute |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['prompt_len']} | "
                         f"{r['method']} | | {r['error']} | |")
            continue
        prefill = f"{r['prefill_ms']:.1f}" if r["prefill_ms"] is not None else ""
        speedup = f"{r['speedup_vs_recompute']:.1f}x" if "speedup_vs_recompute" in r else ""
        lines.append(f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['prompt_len']} | {r['method']} "
                     f"| {prefill} | {r['tokens_per_s']:.1f} | {speedup} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), help="model families (conf/model/*.yaml)")
    parser.add_argument("--prompt-lens", nargs="+", type=int, default=None,
                        help="prompt lengths (default: 128 1024 4096 16384 on CUDA, 128 1024 on CPU)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per step measurement")
    parser.add_argument("--recompute-tokens", type=int, default=8,
                        help="tokens decoded by recomputing the prefix (each costs a full forward)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the fastest counts")
    parser.add_argument("--preset", default="small", help="size preset (conf/experiment/<preset>.yaml)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="bench_generate.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'family':12s} {'params':>7s}  {'batch':5s} {'prompt':8s} {'method':11s} {'prefill ms':>9s} "
          f"{'tokens/s':>12s}", flush=True)
    rows = run(args)
    speedups(rows)
    print()
    print(table(rows))
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
            else platform.processor() or platform.machine(), "torch": torch.__version__, "preset": args.preset,
            "threads": torch.get_num_threads(), "vocab": VOCAB, "repeats": args.repeats}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
