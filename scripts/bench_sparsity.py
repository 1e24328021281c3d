"""Times a 2:4-sparse nn.Linear (torch.sparse.to_sparse_semi_structured) against the dense one at Mamba's
projection shapes, on a CUDA GPU with sparse tensor cores (compute capability 8.0+). Inference (forward) only.

    python scripts/bench_sparsity.py                  # bf16, ~1 minute
    python scripts/bench_sparsity.py --dtype float16 --tokens 256 16384

For each projection (in_proj d_model -> 2 * d_inner, out_proj d_inner -> d_model, x_proj d_inner -> dt_rank +
2 * d_state; expand 2, d_state 16) at each width and token count (tokens = batch * seq_len: a training batch or a
prefill, or a handful of sequences being decoded), the weight gets the 2:4 mask of ssmlm.sparsity.nm_mask and is
timed dense and compressed, with both of PyTorch's kernels (cuSPARSELt, CUTLASS), called eagerly and replayed from
a CUDA graph. A shape a kernel refuses (dimensions must be multiples of 16, or 32 x 64) or a kernel this GPU cannot
run is listed as such. The sparse results are checked against the dense ones before timing.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                          SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured)
from torch.utils import benchmark

from ssmlm.sparsity import nm_mask

# d_model of the reference grid's medium/large presets (model=mamba) and of the published Mamba-1 models
# (130M, 370M, 1.4B, 2.8B)
WIDTHS = [208, 312, 768, 1024, 2048, 2560]
KERNELS = {"cuSPARSELt": SparseSemiStructuredTensorCUSPARSELT, "CUTLASS": SparseSemiStructuredTensorCUTLASS}


def projections(d_model: int, d_state: int = 16, expand: int = 2) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one Mamba block's projections."""
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    return [("in_proj", 2 * d_inner, d_model), ("x_proj", dt_rank + 2 * d_state, d_inner),
            ("out_proj", d_model, d_inner)]


def median_ms(fn) -> float:
    for _ in range(3):  # warm-up: kernel selection, cuSPARSELt's plan, the allocator
        fn()
    torch.cuda.synchronize()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def graphed(fn):
    """``fn`` captured in a CUDA graph: its replay costs the kernels alone, without Python or launch overhead
    (what a compiled or graphed model pays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def times(x: torch.Tensor, weight) -> tuple[float, float | None]:
    """Median ms of ``F.linear(x, weight)``: called eagerly, and replayed from a CUDA graph (None if the kernel
    cannot be captured)."""
    call = lambda: F.linear(x, weight)  # noqa: E731
    try:
        replay = graphed(call)
    except RuntimeError:
        replay = None
    return median_ms(call), (median_ms(replay) if replay is not None else None)


def compress(weight: torch.Tensor, kernel: str):
    """The 2:4 weight compressed for ``kernel``, or why the kernel refuses it."""
    cls = KERNELS[kernel]
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        return f"no {weight.dtype}"
    rows, cols = weight.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return f"shape refused (needs multiples of {limits.sparse_min_rows} x {limits.sparse_min_cols})"
    SparseSemiStructuredTensor._FORCE_CUTLASS = cls is SparseSemiStructuredTensorCUTLASS
    try:
        return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def cell(ms: float | None, dense_ms: float | None) -> str:
    return "n/a" if ms is None or dense_ms is None else f"{ms:.4f} ({dense_ms / ms:.2f}x)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=WIDTHS, help="d_model values")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 16384], help="rows of the input (batch * seq_len)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sparsity.py needs a CUDA GPU (2:4 sparse tensor cores, compute capability 8.0+); "
                 "this machine has none.")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        sys.exit(f"bench_sparsity.py needs compute capability 8.0+ (sparse tensor cores); "
                 f"{torch.cuda.get_device_name()} is {major}.{minor}.")
    warnings.filterwarnings("ignore", message=".*prototype stage.*")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}), torch {torch.__version__}, "
          f"{args.dtype}. Median ms per F.linear; speed-up = dense / sparse. eager: called from Python; "
          f"graph: replayed from a CUDA graph (kernels only).")
    header = ["d_model", "layer", "weight (out x in)", "tokens", "dense eager", "dense graph"]
    header += [f"{kernel} {mode}" for kernel in KERNELS for mode in ("eager", "graph")]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    unusable: dict[str, str] = {}  # kernel -> why it cannot run on this GPU at all
    for d_model in args.widths:
        for name, out_features, in_features in projections(d_model):
            weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / math.sqrt(in_features)
            weight = weight * nm_mask(weight, 2, 4)
            compressed = {k: unusable.get(k) or compress(weight, k) for k in KERNELS}
            for tokens in args.tokens:
                x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
                expected = F.linear(x, weight).float()
                dense_eager, dense_graph = times(x, weight)
                cells = [f"{dense_eager:.4f}", "n/a" if dense_graph is None else f"{dense_graph:.4f}"]
                for kernel, sparse in compressed.items():
                    if isinstance(sparse, str):
                        cells += [sparse, ""]
                        continue
                    try:
                        got = F.linear(x, sparse).float()
                    except RuntimeError as e:  # e.g. CUTLASS's kernels are built for compute capability 8.x only
                        unusable[kernel] = compressed[kernel] = f"unusable here: {str(e).splitlines()[0][:90]}"
                        cells += [unusable[kernel], ""]
                        continue
                    error = float((got - expected).abs().max() / expected.abs().max())
                    if error > 2e-2:
                        cells += [f"wrong result (relative error {error:.1e})", ""]
                        continue
                    eager, graph = times(x, sparse)
                    cells += [cell(eager, dense_eager), cell(graph, dense_graph)]
                print(f"| {d_model} | {name} | {out_features} x {in_features} | {tokens} | " + " | ".join(cells)
                      + " |", flush=True)


if __name__ == "__main__":
    main()
