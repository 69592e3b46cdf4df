"""PNG plots of a results file: attention TFLOP/s by cached frames per implementation, and stream
fps (steady state) per configuration. matplotlib is optional: without it the run says so and writes no PNG.
`python -m bench.plots RESULTS.json ...` draws a results file's plots next to it (gpu_check.sh does,
after a run cut off before it drew them)."""
from __future__ import annotations

import json
import os
import sys


def write(results: dict, out_dir: str, stem: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes = results.setdefault("notes", [])
        if "no plots: matplotlib is not installed" not in notes:  # written after each section
            notes.append("no plots: matplotlib is not installed")
        return []
    paths = []
    rows = [r for r in results.get("attention", []) if "TFLOP/s" in r]
    if rows:
        spans = sorted({r["query_frames"] for r in rows})
        fig, axes = plt.subplots(1, len(spans), figsize=(6 * len(spans), 4.5), sharey=True, squeeze=False)
        axes = axes[0]
        for ax, qf in zip(axes, spans):
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["cached"], r["TFLOP/s"]) for r in rows
                             if r["impl"] == impl and r["query_frames"] == qf and r["D"] == max(x["D"] for x in rows))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_title(f"temporal_attention, {qf} query frame(s)")
            ax.set_xlabel("cached frames")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("TFLOP/s")
        axes[-1].legend(fontsize=8)
        fig.suptitle(results["environment"]["device"]["name"])
        paths.append(os.path.join(out_dir, f"{stem}-attention.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    stream = [r for r in results.get("stream", {}).get("rows", []) if "steady_model_fps" in r]
    if stream:
        labels = sorted({f"{r['steps']} step, {r['frames_per_block']} fpb, {r['sink']}+{r['window']}" for r in stream})
        fig, ax = plt.subplots(figsize=(10, 4.5))
        engines = sorted({r["engine"] for r in stream})
        width = 0.8 / (2 * len(engines))
        for i, engine in enumerate(engines):
            for j, key in enumerate(("steady_model_fps", "steady_end_to_end_fps")):
                vals = [next((r[key] for r in stream if r["engine"] == engine and
                              f"{r['steps']} step, {r['frames_per_block']} fpb, {r['sink']}+{r['window']}" == lab), 0)
                        for lab in labels]
                ax.bar([x + (2 * i + j) * width for x in range(len(labels))], vals, width,
                       label=f"{engine} ({'model' if j == 0 else 'end-to-end'})")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=8)
        ax.set_ylabel("video frames / s (steady state)")
        ax.legend(fontsize=8)
        ax.set_title(f"stream ({results['stream']['preset']}) on {results['environment']['device']['name']}")
        paths.append(os.path.join(out_dir, f"{stem}-stream.png"))
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        for written in write(results, os.path.dirname(path) or ".", stem):
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
