"""The benchmark harness in its CPU mode (tiny shapes, reference backend), so it never rots."""
import json
import os
import subprocess
import sys

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
    impls = {r["impl"] for r in results["attention"]}
    assert {"xjfast-fp8", "xjfast-bf16", "torch-sdpa-math"} <= impls
    for r in results["attention"]:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and 0.9 < r["cosine"] <= 1
    assert {r["op"] for r in results["memory_bound"]} == {"kv_cache_commit", "kv_cache_compact", "denoise_step"}
    engines = {r["engine"] for r in results["stream"]["rows"] if "model_fps" in r}
    assert engines == {"xjfast-fp8", "baseline-sdpa-bf16"}


def test_readme_tables_come_from_results_files(tmp_path):
    sys.path.insert(0, ROOT)
    from bench.readme_tables import tables
    assert "No GPU results yet" in tables(str(tmp_path))
