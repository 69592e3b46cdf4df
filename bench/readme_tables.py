"""Regenerate the README's performance tables from the newest results file per GPU.

    python -m bench.readme_tables        (rewrites the block between the markers in README.md)
Only figures that a results file holds are written; nothing is typed by hand.
"""
from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def newest_per_gpu(results_dir: str) -> dict:
    newest = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            data = json.load(f)
        env = data.get("environment", {})
        if env.get("device", {}).get("kind") != "cuda":
            continue
        gpu = env["device"]["name"]
        if gpu not in newest or env["date"] > newest[gpu][1]["environment"]["date"]:
            newest[gpu] = (os.path.basename(path), data)
    return newest


def tables(results_dir: str) -> str:
    newest = newest_per_gpu(results_dir)
    if not newest:
        return "No GPU results yet: `make gpu-check` on a GPU machine writes them to `bench/results/`."
    out = []
    for gpu, (name, data) in sorted(newest.items()):
        roof = data.get("roofline", {})
        out.append(f"### {gpu} — `bench/results/{name}`\n")
        out.append(f"Roofline (same run): copy {roof.get('copy', {}).get('GB/s', float('nan')):.0f} GB/s, "
                   f"bf16 GEMM {roof.get('gemm_bf16', {}).get('TFLOP/s', float('nan')):.0f} TFLOP/s, "
                   f"FP8 GEMM {roof.get('gemm_fp8', {}).get('TFLOP/s', float('nan')):.0f} TFLOP/s.\n")
        out.append("| temporal_attention | D | query frames | cached frames | TFLOP/s (median) | ms | rel L2 vs fp64 |")
        out.append("|---|---|---|---|---|---|---|")
        for r in data.get("attention", []):
            if "TFLOP/s" in r:
                out.append(f"| {r['impl']} | {r['D']} | {r['query_frames']} | {r['cached']} | {r['TFLOP/s']:.1f} | "
                           f"{r['median_ms']:.3f} | {r['rel_l2']:.2e} |")
        out.append("\n| memory-bound op | shape | GB/s | % of copy bandwidth |\n|---|---|---|---|")
        for r in data.get("memory_bound", []):
            out.append(f"| {r['op']} | {r['shape']} | {r['GB/s']:.0f} | {100 * r.get('fraction_of_ceiling', 0):.0f}% |")
        out.append("\n| stream engine | steps | frames/block | sink+window | model fps | end-to-end fps | "
                   "first frame ms | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|")
        for r in data.get("stream", {}).get("rows", []):
            if "model_fps" in r:
                out.append(f"| {r['engine']} | {r['steps']} | {r['frames_per_block']} | {r['sink']}+{r['window']} | "
                           f"{r['model_fps']:.1f} | {r['end_to_end_fps']:.1f} | {r['time_to_first_frame_ms']:.0f} | "
                           f"{r['interval_p50_ms']:.1f} | {r['interval_p99_ms']:.1f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    block = f"{BEGIN}\n{tables(os.path.join(ROOT, 'bench', 'results'))}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
