"""Benchmark the selective scan backends on one GPU: forward+backward time and peak extra memory.

    python scripts/bench_scan.py [--shapes all|quick|none] [--sweep] [--backends triton,chunked,...] [--out bench.json]

Backends: ssmlm ``triton`` (ssmlm/ops/triton_scan.py), ssmlm ``chunked`` (if the dispatcher has it),
mambapy's ``pscan`` (if installed), mamba_ssm's ``selective_scan_fn`` (if importable) and the sequential
``ref`` loop (timed once at a short length and scaled linearly to L). Inputs are those of a Mamba block:
softplus(delta + delta_bias), D, z gating, input-dependent B and C in the activation dtype.

Times are medians of CUDA-event timings after warm-up (``triton.testing.do_bench``, which also flushes L2
between runs). Memory is the peak allocation above what the inputs and the upstream gradient already hold,
so it counts y, the saved tensors, workspaces and the input gradients. The lower bound is
max(bytes the fused kernels must move / measured copy bandwidth, exponentials / measured exp2 throughput);
docs/kernels.md derives it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ssmlm.ops import triton_scan
from ssmlm.ops.scan_ref import selective_scan_ref

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALL_SHAPES = [  # (batch, dim, N, L, dtype)
    (16, 1536, 16, 1024, "fp32"), (16, 1536, 16, 1024, "bf16"),
    (8, 1536, 16, 4096, "fp32"), (8, 1536, 16, 4096, "bf16"),
    (16, 1536, 64, 1024, "fp32"), (4, 1536, 16, 16384, "bf16"),
]
# mamba_ssm's CUDA selective_scan_fn, fwd+bwd median (ms) and peak memory (GiB), measured on the lent H100.
MAMBA_SSM_REFERENCE = {
    (16, 1536, 16, 1024, "fp32"): (3.21, 0.38), (16, 1536, 16, 1024, "bf16"): (2.26, 0.19),
    (8, 1536, 16, 4096, "fp32"): (6.43, 0.76), (8, 1536, 16, 4096, "bf16"): (5.00, 0.38),
    (16, 1536, 64, 1024, "fp32"): (11.2, 0.39),
}
REF_LOOP_STEPS = 64  # the sequential reference is timed at this length and scaled to L


def mamba_inputs(batch, dim, N, L, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dt)

    dt_init = torch.exp(torch.rand(dim, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                        + math.log(1e-3))
    return dict(
        u=randn(batch, dim, L), delta=randn(batch, dim, L, scale=0.1),
        A=-torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(dim, 1),  # S4D-real init
        B=randn(batch, N, L), C=randn(batch, N, L), D=torch.ones(dim, device=device),
        z=randn(batch, dim, L), delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # softplus^-1
    )


def ssmlm_backend(name):
    def run(inputs):
        if name == "triton":
            return triton_scan.selective_scan_triton(**inputs, delta_softplus=True)
        from ssmlm.ops.selective_scan import selective_scan
        return selective_scan(**inputs, delta_softplus=True, backend=name)
    return run


def mambapy_backend(inputs):
    from mambapy.mamba import MambaBlock

    dtype = inputs["u"].dtype  # mambapy wants one dtype throughout: A and D follow the activations
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None].to(dtype))
    # mambapy works in (batch, L, channels); its selective_scan does not use ``self``.
    y = MambaBlock.selective_scan(None, inputs["u"].transpose(1, 2), delta.transpose(1, 2), inputs["A"].to(dtype),
                                  inputs["B"].transpose(1, 2), inputs["C"].transpose(1, 2), inputs["D"].to(dtype))
    return y.transpose(1, 2) * F.silu(inputs["z"])


def mamba_ssm_backend(inputs):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn(**inputs, delta_softplus=True)


def ref_backend(inputs):
    return selective_scan_ref(**inputs, delta_softplus=True)


BACKENDS = {"triton": ssmlm_backend("triton"), "chunked": ssmlm_backend("chunked"), "mambapy": mambapy_backend,
            "mamba_ssm": mamba_ssm_backend, "ref": ref_backend}


def fwd_bwd_closure(backend, inputs, with_backward=True):
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None and v.is_floating_point()}
    dy = torch.randn(inputs["u"].shape, device=inputs["u"].device, dtype=inputs["u"].dtype)

    def step():
        if with_backward:
            backend(inputs).backward(dy)
        else:
            with torch.no_grad():
                backend(inputs)
    return step, list(leaves.values())


def measure(backend, inputs, with_backward=True, rep_ms=300):
    """(median ms, peak extra GiB) of one forward(+backward) call."""
    step, leaves = fwd_bwd_closure(backend, inputs, with_backward)
    step()  # compile / warm up, and fail early
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    ms = triton.testing.do_bench(step, warmup=50, rep=rep_ms, grad_to_none=leaves, return_mode="median")
    for t in leaves:
        t.grad = None
    return ms, peak


def measure_ref(batch, dim, N, L, dtype):
    """The sequential loop is timed once at REF_LOOP_STEPS steps (after a warm-up) and scaled to L."""
    steps = min(L, REF_LOOP_STEPS)
    inputs = mamba_inputs(batch, dim, N, steps, DTYPES[dtype])
    step, _ = fwd_bwd_closure(ref_backend, inputs)
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 * L / steps


@triton.jit
def _exp2_throughput_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc0 = x
    acc1 = x + 1.0
    acc2 = x + 2.0
    acc3 = x + 3.0
    for _ in range(ITERS):  # four independent dependency chains of one ex2 and one multiply each
        acc0 = tl.exp2(acc0 * -0.5)
        acc1 = tl.exp2(acc1 * -0.5)
        acc2 = tl.exp2(acc2 * -0.5)
        acc3 = tl.exp2(acc3 * -0.5)
    tl.store(out_ptr + offs, acc0 + acc1 + acc2 + acc3)


def copy_bandwidth():
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (copy_ms * 1e-3)


def device_ceilings():
    """Measured copy bandwidth (bytes read + written per second) and exp2 rate (per second)."""
    bandwidth = copy_bandwidth()
    block, iters = 1024, 2048
    n = torch.cuda.get_device_properties(0).multi_processor_count * 64 * block
    x, out = torch.rand(n, device="cuda"), torch.empty(n, device="cuda")
    exp_ms = triton.testing.do_bench(lambda: _exp2_throughput_kernel[(n // block,)](x, out, iters, block),
                                     warmup=20, rep=200, return_mode="median")
    return bandwidth, 4 * iters * n / (exp_ms * 1e-3)


def lower_bound_ms(batch, dim, N, L, dtype, bandwidth, exp_rate):
    """Bytes the fused forward+backward must move and exponentials it must compute, at the device's rates."""
    act = torch.finfo(DTYPES[dtype]).bits // 8
    big = batch * dim * L * act  # one (batch, dim, L) activation
    small = batch * N * L * act  # one (batch, N, L) input
    fwd_bytes = 4 * big + 2 * small  # read u, delta, z; write y; read B, C
    bwd_bytes = 7 * big + 2 * small + 2 * batch * N * L * 4  # read u, delta, z, dy; write du, ddelta, dz; B, C; dB, dC
    exps = 3 * batch * dim * L * N  # forward 1, backward 2 (recomputed decay and the adjoint's shifted decay)
    t_bytes = (fwd_bytes + bwd_bytes) / bandwidth * 1e3
    t_exp = exps / exp_rate * 1e3
    return max(t_bytes, t_exp), t_bytes, t_exp


SWEEP_FIELDS = ("t_chunk", "fwd_block_d", "fwd_warps", "fwd_stages", "fwd_unroll", "bwd_block_d", "bwd_warps",
                "bwd_stages", "bwd_unroll", "fwd_maxnreg", "bwd_maxnreg")
SWEEP = {  # values in the order of SWEEP_FIELDS; the last round of candidates around the defaults
    "fp32": [(32, 32, 4, 2, 4, 4, 1, 3, 2, 0, 0), (32, 16, 4, 3, 2, 4, 1, 3, 2, 0, 0),
             (32, 32, 4, 2, 4, 4, 1, 3, 2, 0, 128), (32, 16, 4, 3, 2, 4, 1, 4, 2, 0, 128),
             (32, 32, 4, 2, 4, 4, 1, 3, 4, 0, 0)],
    "bf16": [(64, 16, 4, 3, 2, 4, 1, 3, 1, 0, 0), (64, 16, 4, 4, 2, 4, 1, 4, 1, 0, 0),
             (64, 16, 4, 3, 2, 4, 1, 3, 1, 0, 168), (64, 8, 4, 3, 2, 2, 1, 3, 2, 0, 0),
             (64, 16, 4, 3, 2, 2, 1, 3, 2, 0, 128), (128, 8, 4, 3, 2, 2, 1, 3, 2, 0, 0)],
}


def sweep_configs(shapes):
    """Time launch configurations of the triton backend (forward only and forward+backward)."""
    default, rows = triton_scan.CONFIG, []
    for shape in shapes:
        inputs = mamba_inputs(*shape[:4], DTYPES[shape[4]])
        for values in SWEEP[shape[4]]:
            config = triton_scan.ScanConfig(**dict(zip(SWEEP_FIELDS, values)))
            triton_scan.CONFIG = config
            try:
                fwd_ms, _ = measure(BACKENDS["triton"], inputs, with_backward=False, rep_ms=100)
                total_ms, peak = measure(BACKENDS["triton"], inputs, rep_ms=100)
            except Exception as e:  # report and keep sweeping
                print(f"sweep {shape} {values}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(dict(shape=shape, config=config.__dict__, fwd_ms=fwd_ms, total_ms=total_ms, peak_gib=peak))
            print(f"sweep {shape} {values}: fwd {fwd_ms:.3f} bwd {total_ms - fwd_ms:.3f} total {total_ms:.3f} ms, "
                  f"{peak:.2f} GiB", flush=True)
    triton_scan.CONFIG = default
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=["all", "quick", "none"], default="all")
    parser.add_argument("--sweep", action="store_true", help="also time several launch configurations")
    parser.add_argument("--backends", default="triton,chunked,mambapy,mamba_ssm,ref")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args()
    shapes = {"all": ALL_SHAPES, "quick": ALL_SHAPES[:1], "none": []}[args.shapes]
    props = torch.cuda.get_device_properties(0)
    bandwidth, exp_rate = device_ceilings()
    clock = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip()
    header = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, copy_bandwidth_TBps=bandwidth / 1e12, exp2_rate_T_per_s=exp_rate / 1e12,
                  sm_clock_now_max=clock,
                  configs={str(k): v.__dict__ for k, v in triton_scan.DEFAULT_CONFIGS.items()})
    print(json.dumps(header), flush=True)
    results = dict(header=header, rows=[])
    if args.sweep:
        results["sweep"] = sweep_configs(ALL_SHAPES)
    for shape in shapes:
        batch, dim, N, L, dtype = shape
        row = dict(shape=shape)
        for name in args.backends.split(","):
            torch.cuda.empty_cache()
            try:
                if name == "ref":
                    row["ref_ms"] = measure_ref(*shape)
                    continue
                inputs = mamba_inputs(batch, dim, N, L, DTYPES[dtype])
                row[f"{name}_ms"], row[f"{name}_gib"] = measure(BACKENDS[name], inputs)
                if name == "triton":
                    row["triton_fwd_ms"], _ = measure(BACKENDS[name], inputs, with_backward=False)
                del inputs
            except (ImportError, ModuleNotFoundError) as e:
                row[f"{name}_skipped"] = f"not available: {e}"
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_skipped"] = "out of memory"
            except Exception as e:  # a peer that fails on this shape is reported, not fatal
                row[f"{name}_skipped"] = f"{type(e).__name__}: {e}"[:200]
        row["lower_bound_ms"], row["lb_bytes_ms"], row["lb_exp_ms"] = lower_bound_ms(*shape, bandwidth, exp_rate)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if shapes:
        print_table(results["rows"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def print_table(rows):
    print("\n| shape | triton fwd+bwd (fwd only) | triton peak | chunked | mambapy | mamba_ssm | ref loop* "
          "| triton / fastest peer | triton / mamba_ssm reference | triton / lower bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        shape = tuple(row["shape"])
        b, d, n, l, dt = shape

        def cell(name):
            ms, gib = row.get(f"{name}_ms"), row.get(f"{name}_gib")
            if ms is None:
                return "-"
            return f"{ms:.2f} ms" + (f", {gib:.2f} GiB" if gib is not None else "")

        t = row.get("triton_ms")
        if t is None:
            print(f"| B{b} D{d} N{n} L{l} {dt} | {row.get('triton_skipped')} |")
            continue
        peers = {name: row[f"{name}_ms"] for name in ("chunked", "mambapy", "mamba_ssm", "ref") if f"{name}_ms" in row}
        fastest = min(peers, key=peers.get) if peers else None
        vs_peer = f"{t / peers[fastest]:.3f} ({fastest})" if fastest else "-"
        ref = MAMBA_SSM_REFERENCE.get(shape)
        vs_ref = f"{t / ref[0]:.2f} (memory {row['triton_gib'] / ref[1]:.2f})" if ref else "-"
        print(f"| B{b} D{d} N{n} L{l} {dt} | {t:.2f} ms ({row['triton_fwd_ms']:.2f}) | {row['triton_gib']:.2f} GiB "
              f"| {cell('chunked')} | {cell('mambapy')} | {cell('mamba_ssm')} | {cell('ref')} | {vs_peer} | {vs_ref} "
              f"| {t / row['lower_bound_ms']:.1f} ({row['lower_bound_ms']:.2f} ms) |")
    print(f"* the reference loop is timed at L={REF_LOOP_STEPS} and scaled linearly to L")


if __name__ == "__main__":
    main()
