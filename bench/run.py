"""Run the benchmarks and write one results JSON (+ PNG plots) into an output folder.

    python -m bench.run [OUT_DIR] [--only SECTION,...] [--budget S] [--device D] [shape options]
                                          (OUT_DIR default: $OUT, else bench/results)
    XJFAST_BENCH_DEVICE=cpu python -m bench.run /tmp/out   (tiny shapes, reference backend)
    xjfast bench [OUT_DIR] ...            the same from an installed xjfast (OUT_DIR default: ./xjfast-bench)

The results file is rewritten after each section, so a run stopped from outside keeps what it
measured. --budget (or XJFAST_BENCH_BUDGET_S) bounds the run in seconds: the sections that measure
many cases stop taking new ones when the next would not fit, and say so in the results. The shape
options replace the attention cases (and the memory-bound ops' frame) with the product of the
values given; such a run, or one of some sections only, is marked in the results (`run`), and
bench/readme_tables.py keeps it out of the README and of the ranking `auto` follows.

A fault that breaks the process's CUDA context (an illegal address, a trap) ends its section with
what it measured; the sections after it run in a new process that adds to the same file
(`--resume`), with the implementation that faulted left out (XJFAST_DISABLE), and the file lists
the restart under `restarts` (the run still exits 1: the fault is an error).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from . import diffusers_wan, kernels, plots, roofline, stream
from .harness import (ContextLost, bench_device, context_error, environment, nvml_readings, on_gpu, results_name,
                      section, write_json)

SECTIONS = ("roofline", "attention", "memory_bound", "diffusers_wan", "stream")
PLOTTED = ("attention", "stream")  # the sections plots.write draws
# Seconds a section leaves to the sections after it when it decides whether to take another case.
# The stream needs most: its first row compiles and captures, the memory check runs 1,000 frames.
RESERVE_AFTER = {"attention": 200, "diffusers_wan": 160}


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected sections from {', '.join(SECTIONS)}, got {text!r}")
    return names


def _parser(prog: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or f"python -m {__package__}.run", description="Benchmark xjfast's kernels and stream against the "
                                "machine's roofline and the peers installed here; writes a results JSON and PNG plots.")
    p.add_argument("out_dir", nargs="?", help="folder for the results")
    p.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="SECTION,...",
                   help=f"sections to run, of {', '.join(SECTIONS)} (default: all; fractions of the ceiling "
                        "need roofline)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="time budget of the run (default: $XJFAST_BENCH_BUDGET_S, else none)")
    p.add_argument("--device", help="torch device (default: $XJFAST_BENCH_DEVICE, else cuda if available, "
                                    "else cpu: tiny shapes, reference backend)")
    p.add_argument("--resume", metavar="RESULTS.json",
                   help="add the sections run to this results file instead of starting one (what a run does "
                        "by itself, in a new process, after a fault broke its CUDA context)")
    shape = p.add_argument_group("attention shape (replaces the stream shapes: every combination is a case)")
    shape.add_argument("--heads", type=_positive_ints, metavar="H", help="attention heads (one value)")
    shape.add_argument("--head-dim", type=_positive_ints, metavar="D,...", help="head_dim: 64 and/or 128")
    shape.add_argument("--frame-tokens", type=_positive_ints, metavar="T", help="tokens per latent frame (one value)")
    shape.add_argument("--query-frames", type=_positive_ints, metavar="N,...", help="frames the queries span")
    shape.add_argument("--cached-frames", type=_positive_ints, metavar="N,...", help="frames in the KV cache")
    return p


def _device(p: argparse.ArgumentParser, wanted: str | None) -> torch.device:
    from xjfast.cli import device_option
    if not wanted:
        return bench_device()
    try:
        return device_option(wanted)
    except ValueError as exc:
        p.error(str(exc))


def _shape(p: argparse.ArgumentParser, args, gpu: bool) -> dict | None:
    """The attention cases' shape from the options (None: the default cases), with every option
    not given taken from the default shape of this device."""
    given = {k: getattr(args, k) for k in ("heads", "head_dim", "frame_tokens", "query_frames", "cached_frames")}
    if all(v is None for v in given.values()):
        return None
    default = kernels.DEFAULT_SHAPE["gpu" if gpu else "cpu"]
    shape = {k: v if v is not None else default[k] for k, v in given.items()}
    for key in ("heads", "frame_tokens"):
        if len(shape[key]) != 1:
            p.error(f"--{key.replace('_', '-')}: expected one value, got {shape[key]}")
    if set(shape["head_dim"]) - {64, 128}:
        p.error(f"--head-dim: expected 64 and/or 128 (the head_dims temporal_attention runs), got {shape['head_dim']}")
    return shape


def _resumed(p: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        p.error(f"--resume: expected a results file a run wrote, got {path!r} ({type(exc).__name__}: {exc})")
    if not isinstance(results, dict) or "environment" not in results:
        p.error(f"--resume: {path!r} is not a results file of bench.run (it has no environment)")
    return results


def main(argv=None, prog: str | None = None, default_out: str | None = None) -> int:
    p = _parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else \
        args.out_dir or default_out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    device = _device(p, args.device)
    shape = _shape(p, args, on_gpu(device))
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    budget_s = args.budget if args.budget is not None else \
        float(os.environ["XJFAST_BENCH_BUDGET_S"]) if os.environ.get("XJFAST_BENCH_BUDGET_S") else None

    def log(msg):
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    def budget(reserve=0.0):
        return None if budget_s is None else budget_s - (time.perf_counter() - started) - reserve

    def left_before(name):  # the budget a section may spend: what the sections after it get is kept
        later = any(n in args.only for n in SECTIONS[SECTIONS.index(name) + 1:])
        return lambda: budget(RESERVE_AFTER[name] if later else 0.0)

    if args.resume:
        results = _resumed(p, args.resume)
        path = os.path.abspath(args.resume)
        stem = os.path.splitext(os.path.basename(path))[0]
    else:
        results = {"environment": environment(device), "run": {"sections": args.only, "shape": shape},
                   "sections_s": {}, "nvml_after": {}}
        stem = results_name(results["environment"])
        path = os.path.join(out_dir, f"{stem}.json")
    log(f"benchmarking on {results['environment']['device']['name']} ({device}); results in {path}")

    def save(name, elapsed):
        results["sections_s"][name] = round(elapsed, 1)
        results["nvml_after"][name] = nvml_readings(device)  # clocks, power, temperature right after the load
        if name in PLOTTED:
            try:
                results["plots"] = [os.path.basename(p) for p in plots.write(results, out_dir, stem)]
            except Exception as exc:  # noqa: BLE001 -- a plot is not worth the figures after it
                results.setdefault("notes", []).append(f"plots after {name} failed: {type(exc).__name__}: {exc}")
        write_json(path, results)

    def checkpoint(name):
        def keep(partial):  # a section's results so far, on disk (a run stopped from outside keeps them)
            results[name] = partial
            write_json(path, results)
        return keep

    sections = (
        ("roofline", lambda: roofline.measure(device)),
        ("attention", lambda: kernels.attention(device, results.get("roofline", {}), left_before("attention"), shape,
                                                checkpoint("attention"))),
        ("memory_bound", lambda: kernels.memory_bound(device, results.get("roofline", {}), shape,
                                                      checkpoint("memory_bound"))),
        ("diffusers_wan", lambda: diffusers_wan.measure(device, log, left_before("diffusers_wan"),
                                                        checkpoint("diffusers_wan"))),
        ("stream", lambda: stream.measure(device, log, budget, checkpoint("stream"))),  # last: the longest
    )
    for name, measure in sections:
        if name not in args.only:
            continue
        t = time.perf_counter()
        left = budget()
        if left is not None and left <= 0:  # a budget spent is no failure: said apart from errors
            results.setdefault("skipped_sections", {})[name] = "not run: the run's time budget was spent"
            log(f"[{name}] not run: the time budget is spent")
        else:
            lost = None
            with section(results, name, log):
                try:
                    results[name] = measure()
                except ContextLost as exc:
                    lost = exc
                    raise
        gc.collect()
        broken = context_error(device)
        if on_gpu(device) and broken is None:
            torch.cuda.empty_cache()  # what one section cached must not crowd the next
        save(name, time.perf_counter() - t)
        if broken is not None:
            results.setdefault("errors", {}).setdefault(name, f"the CUDA context was lost: {broken}")
            _go_on_in_a_new_process(argv, name, args.only[args.only.index(name) + 1:], path, results, budget(),
                                    lost.leave_out if lost else None, log)
    log(f"wrote {path}")
    failed = failed_figures(results)
    _print_summary(results, failed)
    return 1 if results.get("errors") or failed else 0


def _go_on_in_a_new_process(argv: list[str], after: str, rest: list[str], path: str, results: dict,
                            left: float | None, leave_out: str | None, log) -> None:
    """A fault in section `after` broke this process's CUDA context: nothing more runs on the GPU
    here. The sections left (`rest`) run in a fresh process (this one's pid, so gpu_check.sh's time
    limit still holds it), adding to the same results file, with what was running when the context
    broke left out (XJFAST_DISABLE or XJFAST_CUDA_ATTENTION_SKIP)."""
    if not rest:
        return
    env = dict(os.environ)
    if leave_out:
        var, value = ("XJFAST_CUDA_ATTENTION_SKIP", leave_out.removeprefix("path:")) if leave_out.startswith("path:") \
            else ("XJFAST_DISABLE", leave_out)
        env[var] = ",".join(filter(None, (env.get(var), value)))
    results.setdefault("restarts", []).append({"after": after, "sections": rest, "left_out": leave_out})
    write_json(path, results)
    log(f"the CUDA context is lost: {', '.join(rest)} go on in a new process"
        f"{f', leaving out {leave_out}' if leave_out else ''}")
    args = [*argv, "--only", ",".join(rest), "--resume", path]
    if left is not None:
        args += ["--budget", str(max(int(left), 0))]  # whole seconds, rounded down
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *args], env)


def failed_figures(results: dict) -> list[str]:
    """Every figure a section recorded as failed rather than measured (an "error" or "..._error"
    entry; a peer that cannot run says "skipped"), as "where: error": the run then exits 1, so that
    gpu_check.sh's log does not call the benchmarks ok."""
    failed = []

    def walk(node, where):
        if isinstance(node, list):
            for item in node:
                walk(item, where)
        elif isinstance(node, dict):
            label = " ".join(str(node[k]) for k in ("op", "impl", "engine", "case") if node.get(k) is not None)
            for key, value in node.items():
                if key.endswith("error") and isinstance(value, str):
                    failed.append(f"{where}{' ' + label if label else ''}: {key}: {value}")
                else:
                    walk(value, f"{where}.{key}" if isinstance(value, dict) else where)

    for name in SECTIONS:
        walk(results.get(name), name)
    return failed


def _print_summary(results: dict, failed: list[str]) -> None:
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
    for name, error in {**results.get("skipped_sections", {}), **results.get("errors", {})}.items():
        print(f"  {name}: {error}")
    for line in failed:
        print(f"  FAILED {line}")


if __name__ == "__main__":
    sys.exit(main())
