"""Run every benchmark and write one results JSON (+ PNG plots) into an output folder.

    python -m bench.run [OUT_DIR]          (default: $OUT, else bench/results)
    XJFAST_BENCH_DEVICE=cpu python -m bench.run /tmp/out   (tiny shapes, reference backend)

The results file is rewritten after each section, so a run stopped from outside keeps what it
measured. XJFAST_BENCH_BUDGET_S (seconds) bounds the run: the sections that measure many cases
stop taking new ones when the next would not fit, and say so in the results.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch

from bench import diffusers_wan, kernels, plots, roofline, stream
from bench.harness import bench_device, environment, nvml_readings, on_gpu, results_name, section, write_json


PLOTTED = ("attention", "stream")  # the sections plots.write draws
# Seconds a section leaves to the sections after it when it decides whether to take another case.
RESERVE_AFTER = {"attention": 150, "diffusers_wan": 90}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    device = bench_device()
    started = time.perf_counter()
    budget_s = float(os.environ["XJFAST_BENCH_BUDGET_S"]) if os.environ.get("XJFAST_BENCH_BUDGET_S") else None

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    def budget(reserve=0.0):
        return None if budget_s is None else budget_s - (time.perf_counter() - started) - reserve

    results = {"environment": environment(device), "sections_s": {}, "nvml_after": {}}
    stem = results_name(results["environment"])
    path = os.path.join(out_dir, f"{stem}.json")
    log(f"benchmarking on {results['environment']['device']['name']} ({device}); results in {path}")

    def save(name, elapsed):
        results["sections_s"][name] = round(elapsed, 1)
        results["nvml_after"][name] = nvml_readings(device)  # clocks, power, temperature right after the load
        if name in PLOTTED:
            results["plots"] = [os.path.basename(p) for p in plots.write(results, out_dir, stem)]
        write_json(path, results)

    def checkpoint(name):
        def keep(partial):  # a section's results so far, on disk (a run stopped from outside keeps them)
            results[name] = partial
            write_json(path, results)
        return keep

    sections = (
        ("roofline", lambda: roofline.measure(device)),
        ("attention", lambda: kernels.attention(device, results.get("roofline", {}),
                                                lambda: budget(RESERVE_AFTER["attention"]))),
        ("memory_bound", lambda: kernels.memory_bound(device, results.get("roofline", {}))),
        ("diffusers_wan", lambda: diffusers_wan.measure(device, log, lambda: budget(RESERVE_AFTER["diffusers_wan"]))),
        ("stream", lambda: stream.measure(device, log, budget, checkpoint("stream"))),  # last: the longest
    )
    for name, measure in sections:
        t = time.perf_counter()
        left = budget()
        if left is not None and left <= 0:
            results.setdefault("errors", {})[name] = "not run: the run's time budget was spent"
            log(f"[{name}] not run: the time budget is spent")
        else:
            with section(results, name, log):
                results[name] = measure()
        gc.collect()
        if on_gpu(device):
            torch.cuda.empty_cache()  # what one section cached must not crowd the next
        save(name, time.perf_counter() - t)
    log(f"wrote {path}")
    _print_summary(results)
    return 1 if results.get("errors") else 0


def _print_summary(results: dict) -> None:
    for row in results.get("attention", []):
        if "TFLOP/s" in row:
            print(f"  attention D={row['D']} q={row['query_frames']} cached={row['cached']:2d} {row['impl']:22s} "
                  f"{row['TFLOP/s']:8.2f} TFLOP/s  {row['median_ms']:8.3f} ms  rel_l2 {row['rel_l2']:.3e}")
    for row in results.get("memory_bound", []):
        if "GB/s" in row:
            print(f"  {row['op']:18s} {row['impl']:18s} {row['GB/s']:8.1f} GB/s  "
                  f"({100 * row.get('fraction_of_ceiling', 0):.0f}% of copy)")
    for row in results.get("diffusers_wan", {}).get("rows", []):
        for precision, fig in row.get("xjfast", {}).items():
            if "speedup" in fig:
                print(f"  diffusers Wan {row['latent_frames']:2d} latent frames: xjfast {precision} "
                      f"{fig['speedup']:.2f}x over the default attention, rel_l2 {fig['rel_l2']:.2e}")
    for name, error in results.get("errors", {}).items():
        print(f"  {name}: {error}")


if __name__ == "__main__":
    sys.exit(main())
