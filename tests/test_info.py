"""xjfast info: reports what can run here and why not, without raising on a CPU machine; what
backend="auto" picks, from the committed benchmark ranking."""
import json
import re

import pytest
import torch

from xjfast import _ext
from xjfast.backends import backend_unavailable_reason, resolve
from xjfast.errors import BackendUnavailable
from xjfast.info import collect_info, format_info

from backends import GPU_CHECK_EXCLUSIONS


def test_collect_info_on_this_machine():
    info = collect_info()
    assert info["xjfast"] == "0.1.0" and info["torch"] == torch.__version__
    assert info["backends"]["reference"] is None
    for name in ("triton", "cuda"):
        assert info["backends"][name] is None or (isinstance(info["backends"][name], str) and info["backends"][name])
    if _ext.extension() is None:
        assert info["extension_archs"] == [] and "xjfast._C" in info["extension_reason"]
    else:
        assert info["extension_archs"] == _ext.built_archs() and info["extension_reason"] is None
    text = format_info(info)
    assert "xjfast 0.1.0" in text and "backend reference: usable" in text and "backend cuda" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what is reported where there is no GPU")
def test_no_gpu_is_reported_with_the_reason():
    info = collect_info()
    assert info["gpus"] == [] and info["gpu_reason"]
    assert info["backends"]["cuda"]  # a sentence, e.g. "no CUDA GPU is visible to torch"
    assert f"GPU: none ({info['gpu_reason']})" in format_info(info)


def test_a_gpu_is_formatted():
    info = collect_info()
    info.update(gpus=[{"name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "memory_gib": 79.2,
                       "extension_reason": None}], driver="580.159.04", gpu_reason=None)
    assert "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, 79.2 GiB, driver 580.159.04" in format_info(info)


def test_cuda_backend_on_a_cpu_device_says_why():
    reason = backend_unavailable_reason("cuda", "cpu")
    assert reason and ("CUDA device" in reason or "xjfast._C" in reason)


def test_triton_without_the_installed_kernels_says_how_to_install_them(monkeypatch):
    """A checkout put on sys.path without installing it has xjfast but not xjfast.kernels (kernels/
    is mapped there by the install): the Triton backend says so, auto passes it over."""
    import importlib.util

    from xjfast import backends
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xjfast.kernels" else find_spec(name, *a))
    backends._triton_kernels_installed.cache_clear()
    try:
        reason = backend_unavailable_reason("triton", "cuda")
    finally:
        monkeypatch.undo()
        backends._triton_kernels_installed.cache_clear()
    assert reason.startswith("xjfast.kernels is not installed") and "pip install" in reason


def test_triton_interpreter_beside_a_numpy_it_cannot_run_with_says_which_versions_would(monkeypatch):
    """Triton 3.6's interpreter (torch 2.11's Triton) calls int() on one-element arrays, an error
    since NumPy 2.4: the Triton backend on the CPU is refused with the versions, not an
    InterpreterError from inside a kernel."""
    from xjfast.backends import interpreter_numpy_reason
    reason = interpreter_numpy_reason("3.6.0", "2.4.6")
    assert reason and "Triton 3.6.0" in reason and "NumPy 2.4.6" in reason and "Triton >= 3.7 or NumPy < 2.4" in reason
    assert interpreter_numpy_reason("3.5.1", "2.5.0rc1")
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.10.0", "2.5.2"), ("dev", "2.4.0")):
        assert interpreter_numpy_reason(triton_version, numpy_version) is None
    pytest.importorskip("triton")
    import numpy
    import triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert backend_unavailable_reason("triton", "cpu") == interpreter_numpy_reason()
    if torch.cuda.is_available():  # compiled for the GPU: no interpreter
        assert backend_unavailable_reason("triton", "cuda") is None


def test_a_triton_older_than_the_kernels_need_is_refused_with_the_versions(monkeypatch):
    """torch before 2.10 pins a Triton before 3.6, whose language the kernels outgrew: the backend
    says so (auto passes over it) instead of failing inside Triton at the first launch."""
    from xjfast.backends import triton_version_reason
    reason = triton_version_reason("3.1.0")
    assert reason and "Triton 3.1.0 is older than 3.6" in reason and "triton>=3.6" in reason
    for version in ("3.6.0", "3.9.0", "4.0.0", "3.10.0+git1234", "dev"):
        assert triton_version_reason(version) is None
    pytest.importorskip("triton")
    import triton
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    for device in ("cpu", "cuda"):
        assert backend_unavailable_reason("triton", device) == triton_version_reason()
    with pytest.raises(BackendUnavailable, match="Triton 3.2.0 is older than 3.6"):
        resolve("temporal_attention", "triton", torch.device("cpu"))


def test_arch_matching():
    # "a": exactly that compute capability; plain and "f": same major, equal or higher minor.
    assert _ext.arch_runs_on("90a", (9, 0)) and not _ext.arch_runs_on("90a", (10, 0))
    assert _ext.arch_runs_on("100a", (10, 0)) and not _ext.arch_runs_on("100a", (10, 3))
    assert _ext.arch_runs_on("89", (8, 9)) and not _ext.arch_runs_on("89", (9, 0))
    assert _ext.arch_runs_on("80", (8, 6)) and not _ext.arch_runs_on("86", (8, 0))
    assert _ext.arch_runs_on("100f", (10, 3)) and not _ext.arch_runs_on("100f", (12, 0))
    with pytest.raises(ValueError, match="arch"):
        _ext.arch_runs_on("sm_90", (9, 0))


def test_capability_reason_names_the_archs(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (type("C", (), {"built_archs": staticmethod(lambda: ["90a"])}), None))
    assert _ext.capability_reason((9, 0)) is None
    reason = _ext.capability_reason((10, 0))
    assert "sm_90a" in reason and "10.0" in reason and 'XJFAST_CUDA_ARCHS="100a"' in reason
    assert 'XJFAST_CUDA_ARCHS="89"' in _ext.capability_reason((8, 9))  # nvcc knows no sm_89a


@pytest.fixture
def ranked(monkeypatch):
    """A ranking that puts CUDA first for denoise_step on compute capability 9.0, and a faked
    device query saying an H100 is there (no kernel runs)."""
    from xjfast import backends
    ranking = {"denoise_step": {"9.0": {"order": ["cuda", "triton", "reference"], "source": "bench/results/h100.json",
                                        "gpu": "NVIDIA H100 80GB HBM3"}}}
    monkeypatch.setattr(backends, "ranking", lambda: ranking)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fake_c = type("C", (), {"built_archs": staticmethod(lambda: ["90a"]), "runtime_version": staticmethod(lambda: 13000)})
    monkeypatch.setattr(_ext, "_load", lambda: (fake_c, None))
    for name in ("TRITON_INTERPRET",) + GPU_CHECK_EXCLUSIONS:
        monkeypatch.delenv(name, raising=False)
    return backends


def test_auto_follows_the_ranking_then_the_default_order(ranked):
    assert ranked.auto_order("denoise_step", (9, 0)) == (["cuda", "triton", "reference"], "bench/results/h100.json")
    # no entry for this op, or for this capability: the default order, and no source
    assert ranked.auto_order("temporal_attention", (9, 0)) == (list(ranked.PREFERENCE), None)
    assert ranked.auto_order("denoise_step", (10, 0)) == (list(ranked.PREFERENCE), None)
    assert ranked.resolve("denoise_step", "auto", "cuda").backend == "cuda"
    assert ranked.resolve("kv_cache_commit", "auto", "cuda").backend == "triton"
    assert ranked.resolve("denoise_step", "auto", "cpu").backend == "reference"


def test_a_partial_ranking_keeps_the_other_backends_after_it(ranked, monkeypatch):
    monkeypatch.setattr(ranked, "ranking", lambda: {"denoise_step": {"9.0": {"order": ["reference"], "source": "x"}}})
    assert ranked.auto_order("denoise_step", (9, 0))[0] == ["reference", "triton", "cuda"]


def test_info_tells_what_auto_picks_and_why(ranked):
    info = collect_info()
    assert info["auto"]["denoise_step"] == {"backend": "cuda", "why": "ranked by bench/results/h100.json"}
    assert info["auto"]["temporal_attention"]["backend"] == "triton[64,32,4,1]"  # sm_90's first configuration
    assert "default order" in info["auto"]["temporal_attention"]["why"]
    assert "auto denoise_step: cuda (ranked by bench/results/h100.json)" in format_info(info)


def test_disabled_implementations_are_passed_over_and_refused(ranked, monkeypatch):
    """XJFAST_DISABLE (gpu_check.sh: an implementation whose first launch hung or crashed)."""
    monkeypatch.setenv("XJFAST_DISABLE", "denoise_step:cuda, kv_cache_commit : triton")
    assert ranked.resolve("denoise_step", "auto", "cuda").backend == "triton"  # ranked first, disabled
    assert ranked.resolve("kv_cache_commit", "auto", "cuda").backend == "cuda"
    with pytest.raises(BackendUnavailable, match="denoise_step:cuda is disabled by XJFAST_DISABLE"):
        ranked.resolve("denoise_step", "cuda", "cuda")
    assert ranked.unusable_reason("denoise_step", "cuda", "cuda") == "denoise_step:cuda is disabled by XJFAST_DISABLE"
    for bad in ("denoise_step:reference", "denoise:cuda", "denoise_step"):
        monkeypatch.setenv("XJFAST_DISABLE", bad)
        with pytest.raises(ValueError, match=f"XJFAST_DISABLE: expected op:backend pairs .* got '{bad}'"):
            ranked.resolve("denoise_step", "auto", "cuda")


def test_a_malformed_ranking_file_is_ignored_with_a_warning(tmp_path, monkeypatch):
    """Entries of the wrong form (an op's entry not a dict, no order) are dropped, the rest kept."""
    from xjfast import backends
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps({"denoise_step": {"9.0": {"source": "x"}, "10.0": {"order": ["cuda"]}},
                                "kv_cache_commit": ["cuda"], "temporal_attention": {"9.0": {"order": "cuda"}}}))
    monkeypatch.setattr(backends, "RANKING_FILE", str(path))
    backends.ranking.cache_clear()
    try:
        with pytest.warns(UserWarning, match="are ignored"):
            ranking = backends.ranking()
        assert ranking == {"denoise_step": {"10.0": {"order": ["cuda"]}}, "temporal_attention": {}}
        assert backends.auto_order("denoise_step", (10, 0)) == (["cuda", "triton", "reference"], None)
    finally:
        backends.ranking.cache_clear()


def test_the_committed_ranking_file_is_well_formed():
    from xjfast import backends
    from xjfast.kernels.temporal_attention import CANDIDATES, config_name
    from xjfast.ops.temporal_attention import CONFIG_RANKING, CUDA_CORE_RANKING, CUDA_CORES
    with open(backends.RANKING_FILE) as f:
        ranking = json.load(f)
    configurations = {config_name(c) for target in CANDIDATES.values() for c in target}
    for op, per_capability in ranking.items():
        # the CUDA attention's paths, the Triton attention's configurations, or backends
        names = {CUDA_CORE_RANKING: CUDA_CORES, CONFIG_RANKING: configurations}.get(op, backends.BACKENDS)
        assert op in (CUDA_CORE_RANKING, CONFIG_RANKING) or op in backends.registered_ops()
        for capability, entry in per_capability.items():
            assert re.fullmatch(r"\d+\.\d+", capability) and entry["source"].startswith("bench/results/")
            assert entry["order"] and set(entry["order"]) <= set(names)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of a chosen compute capability and an `_C` built for 90a and 100a, without either."""
    fake_ext = type("C", (), {"built_archs": staticmethod(lambda: ["90a", "100a"])})
    monkeypatch.setattr(_ext, "_load", lambda: (fake_ext, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in GPU_CHECK_EXCLUSIONS:
        monkeypatch.delenv(name, raising=False)

    def with_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return with_capability


@pytest.mark.parametrize("op", ["kv_cache_commit", "kv_cache_compact", "denoise_step"])
def test_cuda_backend_on_a_gpu_without_sass_says_so(fake_gpu, op):
    # rather than a launch failing with "no kernel image is available for execution on the device"
    fake_gpu((12, 0))
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' is unavailable: xjfast._C holds SASS for "
                                                 r"sm_90a, sm_100a, none of which runs on this GPU \(compute "
                                                 r"capability 12.0\); rebuild with XJFAST_CUDA_ARCHS=\"120a\""):
        resolve(op, "cuda", "cuda")
    fake_gpu((9, 0))
    assert resolve(op, "cuda", "cuda").backend == "cuda"


@pytest.mark.parametrize("op", ["kv_cache_commit", "kv_cache_compact"])
def test_cuda_cache_kernels_need_clusters(fake_gpu, monkeypatch, op):
    monkeypatch.setattr(_ext, "_load", lambda: (type("C", (), {"built_archs": staticmethod(lambda: ["89"])}), None))
    fake_gpu((8, 9))
    with pytest.raises(BackendUnavailable, match=rf"{op}/cuda needs compute capability >= 9.0, this GPU has 8.9"):
        resolve(op, "cuda", "cuda")
    assert resolve("denoise_step", "cuda", "cuda").backend == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_asking_about_a_cuda_device_without_a_gpu_says_so(monkeypatch):
    """What the registry answers for device "cuda" where torch sees no GPU (bench/sanitize.py asks
    before launching): a reason for each fast backend and the reference for auto, not torch's
    "not compiled with CUDA" from a capability query."""
    from xjfast.backends import registered_ops, unusable_reason
    for name in GPU_CHECK_EXCLUSIONS:  # a disabled implementation's reason would come first
        monkeypatch.delenv(name, raising=False)
    for op in registered_ops():
        for backend in ("triton", "cuda"):
            reason = unusable_reason(op, backend, "cuda")
            assert reason is not None and ("no CUDA GPU" in reason or "xjfast._C" in reason or "Triton" in reason), reason
        assert resolve(op, "auto", "cuda").backend == "reference"
