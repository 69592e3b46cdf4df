"""The benchmark harness in its CPU mode (tiny shapes, reference backend), so it never rots."""
import importlib.util
import json
import os
import subprocess
import sys

import xjfast  # noqa: F401  (registers the ops)
from xjfast.backends import implementations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_mode_writes_a_complete_results_file(tmp_path):
    env = dict(os.environ, XJFAST_BENCH_DEVICE="cpu", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "bench.run", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    results = json.loads(path.read_text())
    assert "errors" not in results
    assert results["environment"]["device"]["kind"] == "cpu" and results["environment"]["xjfast_commit"]
    assert results["roofline"]["copy"]["GB/s"] > 0
    timed = [r for r in results["attention"] if "median_ms" in r]
    assert {"xjfast-reference-fp8", "xjfast-reference-bf16", "torch-sdpa-math"} <= {r["impl"] for r in timed}
    for r in timed:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and 0.9 < r["cosine"] <= 1
    # every registered backend appears: timed, or skipped with the reason (no GPU here)
    for op, rows in (("temporal_attention", results["attention"]), ("kv_cache_commit", results["memory_bound"]),
                     ("denoise_step", results["memory_bound"])):
        seen = {r["backend"]: r for r in rows if r.get("op") == op}
        assert set(seen) == set(implementations(op)), op
        assert all("GB/s" in r or "TFLOP/s" in r or r["skipped"] for r in seen.values())
        assert "median_ms" in seen["reference"] and "CUDA device" in seen["triton"]["skipped"]
    assert {r["op"] for r in results["memory_bound"]} == {"kv_cache_commit", "kv_cache_compact", "denoise_step"}
    engines = {r["engine"] for r in results["stream"]["rows"] if "model_fps" in r}
    assert engines == {"xjfast-fp8", "baseline-sdpa-bf16"}
    drop_in = results["diffusers_wan"]
    if importlib.util.find_spec("diffusers") is None:
        assert "not installed" in drop_in["skipped"]
    else:  # the reference backend in bf16 precision mode: diffusers' own output up to float32 rounding
        [row] = drop_in["rows"]
        assert row["diffusers_default"]["median_ms"] > 0 and row["xjfast"]["bf16"]["rel_l2"] < 1e-5
    assert set(results["sections_s"]) == {"roofline", "attention", "memory_bound", "diffusers_wan", "stream"}


def test_readme_tables_come_from_results_files(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.readme_tables import tables
    assert "No GPU results yet" in tables(str(tmp_path))
