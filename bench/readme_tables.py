"""Regenerate the README's performance tables, and the backend ranking `backend="auto"` follows,
from the newest results file per GPU.

    python -m bench.readme_tables        (rewrites the block between the markers in README.md
                                          and xjfast/backend_ranking.json: per op and compute
                                          capability the backends fastest first, the CUDA
                                          attention's paths and the Triton attention's
                                          configurations fastest first)
Only figures that a results file holds are written; nothing is typed by hand.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re

from xjfast.ops.temporal_attention import CONFIG_RANKING, CUDA_CORE_RANKING  # what auto reads

from .run import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RANKING = os.path.join(ROOT, "xjfast", "backend_ranking.json")


def standard_run(results: dict) -> bool:
    """Whether a results file is a whole run at the default shapes (what the README and the ranking
    are made of), not `xjfast bench --only ...` or a run at shapes of the user's choosing."""
    run = results.get("run", {})
    return not run.get("shape") and set(run.get("sections", SECTIONS)) == set(SECTIONS)


def newest_per_gpu(results_dir: str) -> dict:
    newest = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            data = json.load(f)
        env = data.get("environment", {})
        if env.get("device", {}).get("kind") != "cuda":
            continue
        if not standard_run(data):
            print(f"left out: {os.path.basename(path)} (sections {data['run'].get('sections')}, "
                  f"shape {data['run'].get('shape')}: not a whole run at the default shapes)")
            continue
        gpu = env["device"]["name"]
        if gpu not in newest or env["date"] > newest[gpu][1]["environment"]["date"]:
            newest[gpu] = (os.path.basename(path), data)
    return newest


def _geomean_order(times: dict) -> list[str]:
    """case -> name -> median ms  ->  names fastest first: each scores the geometric mean, over the
    cases it ran beside another, of its time over the best time in that case (a case one name ran
    alone, as the bf16 attention only Triton runs, would score it best for nothing); names that
    never ran beside another come last."""
    ratios: dict = {}
    for by_name in times.values():
        if len(by_name) < 2:
            continue
        best = min(by_name.values())
        for name, ms in by_name.items():
            ratios.setdefault(name, []).append(ms / best)
    score = {n: math.exp(sum(map(math.log, r)) / len(r)) for n, r in ratios.items()}
    alone = sorted({n for by_name in times.values() for n in by_name} - set(score))
    return sorted(score, key=lambda n: (score[n], n)) + alone


def _rank_variants(results: dict, backend: str, key: str) -> list[str]:
    """The values of row[key] timed side by side for `backend`'s attention on one GPU, fastest first;
    empty when the file times none."""
    times: dict = {}  # case -> variant -> median ms
    for row in results.get("attention", []):
        if row.get("backend") == backend and row.get(key) and "median_ms" in row:
            times.setdefault(row["case"], {})[row[key]] = row["median_ms"]
    return _geomean_order(times)


def rank_cuda_attention_paths(results: dict) -> list[str]:
    """The CUDA attention's paths (XJFAST_CUDA_ATTENTION_CORE values), fastest first."""
    return _rank_variants(results, "cuda", "core")


def rank_triton_attention_configs(results: dict) -> list[str]:
    """The Triton attention's candidate configurations (XJFAST_TRITON_ATTENTION_CONFIG values),
    fastest first."""
    return _rank_variants(results, "triton", "config")


def rank_backends(results: dict) -> dict:
    """op -> xjfast backends fastest first, from one results file (a backend covering part of an op is
    judged where it runs; the CUDA attention timed per path counts with the path auto will run,
    the fastest; the Triton attention with the configuration it ran, not the candidates or the
    unsplit run timed beside it); skipped backends are not ranked."""
    best_path = next(iter(rank_cuda_attention_paths(results)), None)
    times: dict = {}  # op -> case -> backend -> median ms
    for row in results.get("attention", []) + results.get("memory_bound", []):
        if "backend" in row and "median_ms" in row and row.get("core", best_path) == best_path \
                and "config" not in row and not row.get("unsplit"):
            times.setdefault(row["op"], {}).setdefault(row["case"], {})[row["backend"]] = row["median_ms"]
    return {op: _geomean_order(cases) for op, cases in times.items()}


def ranking_file(results_dir: str) -> dict:
    """op -> "major.minor" -> {"order", "source", "gpu"}: per compute capability, the newest results
    file among the GPUs of that capability."""
    per_capability: dict = {}
    for gpu, (name, data) in newest_per_gpu(results_dir).items():
        capability = data["environment"]["device"].get("capability")
        if capability and (capability not in per_capability or
                           data["environment"]["date"] > per_capability[capability][2]["environment"]["date"]):
            per_capability[capability] = (gpu, name, data)
    out: dict = {}
    for capability, (gpu, name, data) in sorted(per_capability.items()):
        source = {"source": f"bench/results/{name}", "gpu": gpu}
        for op, order in rank_backends(data).items():
            out.setdefault(op, {})[capability] = {"order": order, **source}
        if paths := rank_cuda_attention_paths(data):
            out.setdefault(CUDA_CORE_RANKING, {})[capability] = {"order": paths, **source}
        if configs := rank_triton_attention_configs(data):
            out.setdefault(CONFIG_RANKING, {})[capability] = {"order": configs, **source}
    return out


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
        out.append("| temporal_attention | D | query frames | cached frames | TFLOP/s (median) | of its ceiling | ms | "
                   "rel L2 vs fp64 |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in data.get("attention", []):
            if "TFLOP/s" in r:
                out.append(f"| {r['impl']} | {r['D']} | {r['query_frames']} | {r['cached']} | {r['TFLOP/s']:.1f} | "
                           f"{_of_ceiling(r)} | {r['median_ms']:.3f} | {r['rel_l2']:.2e} |")
        out.append("\n| memory-bound op | implementation | shape | GB/s | % of copy bandwidth |\n|---|---|---|---|---|")
        for r in data.get("memory_bound", []):
            if "GB/s" in r:
                out.append(f"| {r['op']} | {r['impl']} | {r['shape']} | {r['GB/s']:.0f} | "
                           f"{100 * r.get('fraction_of_ceiling', 0):.0f}% |")
        drop_in = [r for r in data.get("diffusers_wan", {}).get("rows", []) if "diffusers_default" in r]
        if drop_in:
            out.append(f"\n| diffusers {data['diffusers_wan'].get('model')} | tokens | default attention ms | "
                       "xjfast | ms | speedup | rel L2 vs default |\n|---|---|---|---|---|---|---|")
            for r in drop_in:
                for precision, fig in r["xjfast"].items():
                    if "speedup" in fig:
                        out.append(f"| {r['latent_frames']} latent frame(s) at 480x832 | {r['tokens']} | "
                                   f"{r['diffusers_default']['median_ms']:.1f} | enable(precision=\"{precision}\") | "
                                   f"{fig['median_ms']:.1f} | {fig['speedup']:.2f}x | {fig['rel_l2']:.2e} |")
        # xjfast's backends and the peers alike, the drop-in's and the stream's rows, and what failed:
        # a row absent from the tables says why
        wan, stream = data.get("diffusers_wan", {}), data.get("stream", {})
        rows = [(_not_measured(r), r) for r in data.get("attention", []) + data.get("memory_bound", [])]
        rows += [("diffusers Wan", wan)] + [(f"diffusers Wan, {r['latent_frames']} latent frame(s)", r)
                                            for r in wan.get("rows", [])]
        rows += [(f"diffusers Wan, {r['latent_frames']} latent frame(s), enable(precision=\"{p}\")", fig)
                 for r in wan.get("rows", []) for p, fig in r.get("xjfast", {}).items()]
        rows += [(_stream_row_name(r), r) for r in stream.get("rows", [])]
        rows += [(_speculation_row_name(r), r) for r in stream.get("speculation", [])]
        rows += [("stream profile", stream["profile"])] if "profile" in stream else []
        skipped = sorted({f"{name} ({r.get('skipped') or r['error']})" for name, r in rows
                          if r.get("skipped") or r.get("error")})
        if skipped:
            out.append("\nNot measured: " + "; ".join(skipped) + ".")
        out.append("\n| stream engine | steps | frames/block | sink+window | model fps | end-to-end fps | "
                   "first frame ms | p50 ms | p99 ms | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in stream.get("rows", []):
            if "steady_model_fps" in r:
                out.append(f"| {r['engine']} | {r['steps']} | {r['frames_per_block']} | {r['sink']}+{r['window']} | "
                           f"{r['steady_model_fps']:.1f} | {r['steady_end_to_end_fps']:.1f} | "
                           f"{r['time_to_first_frame_ms']:.0f} | {r['steady_interval_p50_ms']:.1f} | "
                           f"{r['steady_interval_p99_ms']:.1f} | {r.get('peak_memory_gib', float('nan')):.2f} |")
        compiled = [r for r in stream.get("rows", []) if r.get("precompiled_kernels")]
        if compiled:
            out.append(f"\nBefore its first frame, `precompile()` readied the stream's {compiled[0]['precompiled_kernels']} "
                       f"Triton kernels in {compiled[0]['precompile_s']:.1f} s ({_stream_row_name(compiled[0])}: the run's "
                       f"first, compiled or loaded from Triton's cache; later rows reuse them).")
        failed = [f"{_stream_row_name(r)} ({r['precompile_error']})" for r in stream.get("rows", [])
                  if r.get("precompile_error")]
        if failed:
            out.append("\n`precompile()` failed, and the stream compiled its kernels as it launched them: "
                       + "; ".join(failed) + ".")
        nonfinite = [f"{_stream_row_name(r)} ({r['nonfinite_frames']} of {r['latent_frames']} latent frames, the first "
                     f"{r['first_nonfinite_frame']})" for r in stream.get("rows", [])
                     if r.get("nonfinite_frames")]
        if nonfinite:
            out.append("\nNaN or inf frames (those rows time a broken stream): " + "; ".join(nonfinite) + ".")
        memory = stream.get("memory", {})
        if "flat" in memory:
            out.append(f"\nMemory allocated after 100 and 1,000 latent frames (xjfast-fp8): "
                       f"{memory['allocated_after_100_frames'] / 2 ** 30:.3f} and "
                       f"{memory['allocated_after_1000_frames'] / 2 ** 30:.3f} GiB "
                       f"({'flat' if memory['flat'] else 'NOT flat'}).")
        elif memory:
            out.append(f"\nMemory over 1,000 latent frames: not measured ({memory.get('skipped') or memory.get('error')}).")
        if stream.get("rows"):
            out.append("\nFrame rates in video frames (4 per latent frame) and intervals per latent frame, over the "
                       "steady state: the blocks after the cache filled and the CUDA graph was captured. First frame: "
                       "a fresh stream's first block, the process warm; peak: the most memory allocated, weights "
                       "included. The baseline engine is xjfast's PyTorch reference ops in bf16 with torch SDPA, "
                       "eager: it also reads each commit's page ids on the host (a sync per layer), draws the Philox "
                       "noise with torch ops, and rotates its cached keys by slot on every pass.")
        out += _speculation_table(stream.get("speculation", [])) + _profile_table(stream.get("profile", {}))
        out.append("")
    return "\n".join(out)


CEILINGS = {"gemm_fp8": "FP8 GEMM", "gemm_bf16": "bf16 GEMM"}


def _stream_row_name(row: dict) -> str:
    return (f"stream {row['engine']}, {row['steps']} step(s), {row['frames_per_block']} frame(s)/block, sink+window "
            f"{row['sink']}+{row['window']}")


def _speculation_row_name(row: dict) -> str:
    return f"speculation {row['video']}, depth {row['speculate']}" + (f", {row['drafter']}" if row["speculate"] else "")


def _speculation_table(rows: list[dict]) -> list[str]:
    """Speculation off and on (bench/stream.py's _speculation: xjfast engine, 1 step, 1 frame per
    block, 1 sink + 8 window frames), per video size, depth asked and drafter."""
    rows = [r for r in rows if "model_fps" in r]
    if not rows:
        return []
    out = ["\n| speculation (xjfast-fp8, 1 step) | depth asked | drafter | depth run | model fps | end-to-end fps | "
           "acceptance | latent frames per pass |\n|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r.get("acceptance_rate")
        out.append(f"| {r['video']} | {r['speculate']} | {r['drafter'] if r['speculate'] else '-'} | {r['depth']} | "
                   f"{r['model_fps']:.1f} | {r['end_to_end_fps']:.1f} | {'-' if rate is None else f'{100 * rate:.0f}%'} | "
                   f"{r['frames_per_pass']:.2f} |")
    return out


def _profile_table(profile: dict) -> list[str]:
    """Where the xjfast engine's steady pass spends the GPU's time, by kernel family."""
    if "families" not in profile:
        return []
    out = [f"\nWhere a steady pass of {profile['engine']} ({profile['steps']} step(s), {profile['frames_per_block']} "
           f"frame(s)/block, sink+window {profile['sink']}+{profile['window']}, CUDA graph "
           f"{'replayed' if profile.get('cuda_graph_in_use') else 'not in use'}) spends the GPU's time: "
           f"{profile['ms_per_pass']:.2f} ms of kernels in {profile['launches_per_pass']:.0f} launches per pass "
           f"(torch.profiler over {profile['passes']} passes; families by kernel name, bench/step_profile.py).\n",
           "| kernel family | ms per pass | share | the kernel that takes most |\n|---|---|---|---|"]
    for family, fig in profile["families"].items():
        top = next((k for k in profile.get("top", []) if k["family"] == family), None)
        named = f"`{top['name'][:60].replace('|', '/')}` ({top['ms_per_pass']:.3f} ms)" if top else "-"
        out.append(f"| {family} | {fig['ms_per_pass']:.3f} | {100 * fig['share']:.0f}% | {named} |")
    return out


def _of_ceiling(row: dict) -> str:
    """The fraction of the ceiling a row was measured against (its precision's GEMM rate)."""
    if "fraction_of_ceiling" not in row:
        return "-"
    return f"{100 * row['fraction_of_ceiling']:.0f}% of {CEILINGS.get(row.get('ceiling'), row.get('ceiling'))}"


def _not_measured(row: dict) -> str:
    """What a skipped or failed row stands for: an implementation, or every one at a case."""
    if row.get("impl") != "*":
        return row["impl"]
    return f"every implementation at D={row['D']}, {row['query_frames']} query and {row['cached']} cached frames"


def main() -> int:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    block = f"{BEGIN}\n{tables(os.path.join(ROOT, 'bench', 'results'))}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)
    with open(RANKING, "w") as f:
        json.dump(ranking_file(os.path.join(ROOT, "bench", "results")), f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
