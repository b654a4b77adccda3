"""Benchmark: pairwise aggregation, Triton kernel against PyTorch eager and torch.compile, in one process.

    python -m kernels.bench_pairwise [--out bench_pairwise.json] [--reps 10]

Needs a CUDA GPU, torch and triton only. For each shape it reports the median
time of ``--reps`` timed calls (after warm-up), the speed-up over
``torch.compile``, and the effective bandwidth (bytes read and written once,
divided by time) as a fraction of the device's peak: the nominal figure for
known devices and a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .pairwise import aggregate_pairwise, aggregate_pairwise_reference

SHAPES = ((1_048_576, 8), (262_144, 16), (65_536, 32))
# Nominal HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name().
NOMINAL_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
}


def _time_ms(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write): the achievable peak."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() / (ms / 1e3)


def _bytes_moved(B: int, K: int, in_bytes: int) -> int:
    # p read once; q written (fp32); win rate and strength (fp32); chosen, rejected (int64); confidence, agreement (fp32).
    return B * K * K * in_bytes + B * K * K * 4 + 2 * B * K * 4 + B * (8 + 8 + 4 + 4)


def run(reps: int, dtypes=("float32",)) -> dict:
    device = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in device), None)
    copy_bw = _copy_bandwidth()
    compiled = torch.compile(aggregate_pairwise_reference)
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for B, K in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(0)
            p = torch.rand(B, K, K, device="cuda", generator=g).to(dtype)
            kernel_out, ref_out = aggregate_pairwise(p), aggregate_pairwise_reference(p)
            agree = float((kernel_out.chosen == ref_out.chosen).float().mean())
            max_diff = float((kernel_out.strength - ref_out.strength).abs().max())
            row = {"B": B, "K": K, "dtype": dtype_name, "chosen_agreement": agree, "strength_max_abs_diff": max_diff}
            for name, fn in (
                ("triton", aggregate_pairwise),
                ("eager", aggregate_pairwise_reference),
                ("compile", compiled),
            ):
                row[f"{name}_ms"] = _time_ms(lambda: fn(p), reps)
            moved = _bytes_moved(B, K, p.element_size())
            row["bytes_moved"] = moved
            row["triton_bandwidth_GBps"] = moved / (row["triton_ms"] / 1e3) / 1e9
            row["fraction_of_copy_bandwidth"] = moved / (row["triton_ms"] / 1e3) / copy_bw
            if nominal:
                row["fraction_of_nominal_bandwidth"] = moved / (row["triton_ms"] / 1e3) / nominal
            row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
            row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
    return {
        "benchmark": "pairwise_aggregation",
        "device": device,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "reps": reps,
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "nominal_bandwidth_GBps": nominal / 1e9 if nominal else None,
        "results": results,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_pairwise.json"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_pairwise needs a CUDA GPU; the CPU tests (TRITON_INTERPRET=1) check correctness")
    report = run(args.reps, args.dtypes)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
