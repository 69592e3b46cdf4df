"""Run every benchmark and write one results JSON (+ PNG plots) into an output folder.

    python -m bench.run [OUT_DIR]          (default: $OUT, else bench/results)
    XJFAST_BENCH_DEVICE=cpu python -m bench.run /tmp/out   (tiny shapes, reference backend)
"""
from __future__ import annotations

import os
import sys
import time

from bench import kernels, plots, roofline, stream
from bench.harness import bench_device, environment, results_name, section, write_json


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    device = bench_device()
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    results = {"environment": environment(device)}
    log(f"benchmarking on {results['environment']['device']['name']} ({device})")
    with section(results, "roofline", log):
        results["roofline"] = roofline.measure(device)
    roof = results.get("roofline", {"copy": {"GB/s": float("nan")}})
    with section(results, "attention", log):
        results["attention"] = kernels.attention(device, roof)
    with section(results, "memory_bound", log):
        results["memory_bound"] = kernels.memory_bound(device, roof)
    with section(results, "stream", log):
        results["stream"] = stream.measure(device, log)
    stem = results_name(results["environment"])
    results["plots"] = [os.path.basename(p) for p in plots.write(results, out_dir, stem)]
    path = os.path.join(out_dir, f"{stem}.json")
    write_json(path, results)
    log(f"wrote {path}")
    for row in results.get("attention", []):
        if "TFLOP/s" in row:
            print(f"  attention D={row['D']} q={row['query_frames']} cached={row['cached']:2d} {row['impl']:22s} "
                  f"{row['TFLOP/s']:8.2f} TFLOP/s  {row['median_ms']:8.3f} ms  rel_l2 {row['rel_l2']:.3e}")
    for row in results.get("memory_bound", []):
        print(f"  {row['op']:18s} {row['GB/s']:8.1f} GB/s  ({100 * row.get('fraction_of_ceiling', 0):.0f}% of copy)")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
