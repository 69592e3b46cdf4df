"""The compiled extension xjfast._C: device queries, CUDA errors as exceptions, SASS for each arch."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from xjfast.tools import sass as sass_tool

C = pytest.importorskip("xjfast._C", reason="xjfast._C is not built (no nvcc, or XJFAST_CUDA_ARCHS empty)")

# What setup.py builds for unless XJFAST_CUDA_ARCHS says otherwise.
EXPECTED_ARCHS = os.environ.get("XJFAST_CUDA_ARCHS", "90a;100a").split(";")


def test_built_archs_are_the_requested_ones():
    assert C.built_archs() == EXPECTED_ARCHS


def test_device_count_agrees_with_torch():
    count = C.device_count()
    assert isinstance(count, int) and count >= 0
    if torch.cuda.is_available():
        assert count == torch.cuda.device_count()
        assert C.compute_capability(0) == torch.cuda.get_device_capability(0)
        assert C.device_name(0) == torch.cuda.get_device_name(0)


def test_runtime_version_needs_no_driver():
    assert C.runtime_version() >= 12000  # the static runtime inside _C: 13000 for CUDA 13.0
    assert isinstance(C.driver_version(), int) and C.driver_version() >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised where there is no GPU")
def test_cuda_errors_become_exceptions_naming_the_call():
    assert C.device_count() == 0
    assert issubclass(C.CudaError, RuntimeError)
    with pytest.raises(C.CudaError, match=r"cudaDeviceGetAttribute\(.*\) failed: cuda\w+"):
        C.compute_capability(0)
    with pytest.raises(C.CudaError, match=r"cudaGetDeviceProperties\(.*\) failed"):
        C.device_name(0)


def test_bad_device_index_raises():
    with pytest.raises(C.CudaError):
        C.compute_capability(C.device_count() + 7)


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, else the one inside Triton's wheel."""
    tool = sass_tool.toolkit_tool("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump: neither the CUDA toolkit's (/usr/local/cuda/bin) nor Triton's")
    return tool


def embedded_archs(library: str) -> set:
    """The archs of the cubins in `library`, from their headers: an older cuobjdump (CUDA 12.8, in
    Triton 3.6's wheel) names a sm_90a cubin "...sm_90.cubin" in --list-elf and "code for sm_90" in -sass."""
    usage = subprocess.run([cuobjdump(), "-res-usage", library], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"Fatbin elf code:\s*=+\s*arch = (sm_\w+)", usage))


def test_sass_of_every_arch_is_embedded():
    assert embedded_archs(C.__file__) == {f"sm_{arch}" for arch in EXPECTED_ARCHS}


def cuda_listing() -> dict:
    """xjfast.tools.sass.cuda_listing of _C: {(arch, mangled kernel name): {"sass", "registers",
    "stack_bytes", "shared_bytes"}} for every kernel (read once per session)."""
    cuobjdump()  # (skips the test where there is none)
    kernels = sass_tool.cuda_listing(C.__file__)
    assert kernels and all(k["sass"] for k in kernels.values())
    return kernels


def test_no_kernel_spills_or_uses_local_memory():
    """-Xptxas -v in CI's terms: every kernel in _C, for every arch, has no stack frame."""
    assert [(key, k["stack_bytes"]) for key, k in cuda_listing().items() if k["stack_bytes"] != 0] == []


def sass_by_function() -> dict:
    """{(arch, mangled kernel name): its SASS text} for every kernel in _C."""
    return {key: k["sass"] for key, k in cuda_listing().items()}


def test_attention_kernels_multiply_e4m3_on_the_tensor_cores():
    """Two tensor-core paths (csrc/attention_cores.cuh). wgmma on sm_90a: QGMMA e4m3, no 16-bit MMA
    (built for sm_100a the kernel is one trap: the host never picks it there). mma.sync m16n8k32 e4m3
    elsewhere: the hardware unpacks the e4m3 operands for the 16-bit HMMA
    (F2FP...E4M3.UNPACK_B + HMMA.16816.F32); a scalar fallback would show no HMMA. cp.async
    (LDGSTS) feeds shared memory in both."""
    kernels = {key: sass for key, sass in sass_by_function().items()
               if "temporal_attention_kernel" in key[1] or "attention_mass_kernel" in key[1]}
    assert {arch for arch, _ in kernels} == {f"sm_{arch}" for arch in EXPECTED_ARCHS}
    for (arch, name), sass in kernels.items():
        if "WgmmaCore" in name and arch != "sm_90a":  # only a trap: the host never launches it there
            assert "BPT.TRAP" in sass and not re.search(r"MMA|LDGSTS", sass), (arch, name)
            continue
        assert "LDGSTS" in sass, (arch, name)
        if "WgmmaCore" not in name:
            assert re.search(r"\bHMMA\.16816\.F32\b", sass), (arch, name)
            assert re.search(r"\bF2FP\.F16\.E4M3\.UNPACK_B\b", sass) and "LDSM" in sass, (arch, name)
        else:
            assert re.search(r"\bQGMMA\.64x64x32\.F32\.E4M3\.E4M3\b", sass), (arch, name)
            assert "HMMA" not in sass, (arch, name)
            if "temporal_attention_kernel" in name:  # P.V: m64 x head_dim
                assert re.search(r"\bQGMMA\.64x(64|128)x32\.F32\.E4M3\.E4M3\b", sass), (arch, name)
        if "temporal_attention_kernel" in name:  # P is rounded to e4m3 in registers, saturating
            assert re.search(r"\bF2FP\.SATFINITE\.E4M3\.F32", sass), (arch, name)


def test_warp_specialized_attention_uses_tma_mbarriers_and_wgmma():
    """csrc/temporal_attention_ws.cu on sm_90a: K/V tiles by TMA (UTMALDG.5D) into an mbarrier
    pipeline (SYNCS arrive / transaction / try-wait), the registers moved from the producer to the
    consumer warpgroups (USETMAXREG), S and P.V on FP8 wgmma (QGMMA), nothing through cp.async or
    16-bit MMA. A wait whose phase never completes reads the global timer and traps after a
    timeout (csrc/tma.cuh) rather than hang the GPU. Built for sm_100a it only traps (the host
    never launches it there)."""
    kernels = {key: sass for key, sass in sass_by_function().items() if "temporal_attention_ws_kernel" in key[1]}
    assert {arch for arch, _ in kernels} == {f"sm_{arch}" for arch in EXPECTED_ARCHS}
    assert len(kernels) == 6 * len(EXPECTED_ARCHS)  # fp32 / bf16 / fp16 queries x head_dim 64, 128
    for (arch, name), sass in kernels.items():
        if arch != "sm_90a":
            assert "BPT.TRAP" in sass and not re.search(r"MMA|UTMALDG", sass), (arch, name)
            continue
        assert re.search(r"\bUTMALDG\.5D\b", sass), name
        assert re.search(r"\bSYNCS\.ARRIVE\.TRANS64", sass) and "SYNCS.PHASECHK.TRANS64.TRYWAIT" in sass, name
        assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY" in sass, name
        assert "SR_GLOBALTIMER" in sass and "BPT.TRAP" in sass, name
        assert re.search(r"\bQGMMA\.64x64x32\.F32\.E4M3\.E4M3\b", sass), name
        head_dim = 64 if "Li64E" in name else 128
        assert re.search(rf"\bQGMMA\.64x{head_dim}x32\.F32\.E4M3\.E4M3\b", sass), name  # P.V
        assert "HMMA" not in sass and "LDGSTS" not in sass, name
        assert re.search(r"\bF2FP\.SATFINITE\.E4M3\.F32", sass), name


def test_attention_key_steps_exponentiate_each_score_once():
    """Every path's key loop (xjfast.tools.sass.inner_loop on the SASS): a thread owns 32 scores of a
    64-key step (16 rows of a warp, or 64 of a warpgroup) and 2 rows' rescale factors, so 34 exp2
    per iteration; twice as many would mean a duplicated softmax (as Triton's 8-warp 64-row tile
    on sm_90 has)."""
    loops = {key: sass_tool.inner_loop(sass) for key, sass in sass_by_function().items()
             if re.search(r"temporal_attention(_ws)?_kernel", key[1])
             and not (key[0] != "sm_90a" and ("WgmmaCore" in key[1] or "_ws_" in key[1]))}  # traps there
    # 6 instantiations (query dtype x head_dim) of the mma.sync path per arch, of wgmma and ws on sm_90a
    assert len(loops) == 6 * len(EXPECTED_ARCHS) + (12 if "90a" in EXPECTED_ARCHS else 0), sorted(loops)
    for key, loop in loops.items():
        assert loop is not None and loop["exp2"] == 34, (key, loop)


def test_wgmma_attention_sums_pv_per_tile_in_fp32():
    """Hopper's FP8 wgmma keeps 13 mantissa bits of the accumulator it adds into: the wgmma and ws
    paths sum each 64-key tile's P.V (two k-steps, A from registers) from zero and add it to O in
    fp32 (two-level accumulation), or the error would grow with the number of keys."""
    if "90a" not in EXPECTED_ARCHS:
        pytest.skip("no sm_90a in this build")
    chains = {key: sass_tool.register_a_chains(sass) for key, sass in sass_by_function().items()
              if key[0] == "sm_90a" and re.search(r"temporal_attention(_ws)?_kernel", key[1])
              and ("WgmmaCore" in key[1] or "_ws_" in key[1])}
    assert len(chains) == 12, sorted(chains)
    for key, by_shape in chains.items():
        [(shape, pv)] = by_shape.items()  # P.V is the only product with A in registers
        assert 2 * pv["fresh"] >= pv["total"] > 0, (key, shape, pv)


def test_warp_specialized_attention_starts_with_the_registers_its_split_assumes():
    """setmaxnreg moves registers within the CTA's launch allocation: the producer warpgroup drops to 40
    per thread and the two consumer warpgroups rise to 232, which needs exactly 168 per thread at
    launch (65536 / 384 threads, rounded down to 8). With fewer the consumers' increase would wait
    forever."""
    registers = {name: k["registers"] for (arch, name), k in cuda_listing().items()
                 if arch == "sm_90a" and "temporal_attention_ws_kernel" in name}
    assert len(registers) == 6 and set(registers.values()) == {168}, registers


def test_cache_kernels_move_16_byte_vectors():
    """kv_cache_commit/compact: rows are read 16 bytes per load (LDG.E.128), e4m3 is written 8 or 16
    bytes per store after a saturating conversion, two at a time (F2FP.SATFINITE.E4M3...PACK_AB);
    the CTAs of a unit combine statistics through the cluster barrier (UCGABAR)."""
    kernels = {key: sass for key, sass in sass_by_function().items()
               if "kv_cache_commit_kernel" in key[1] or "kv_cache_compact_kernel" in key[1]}
    assert {arch for arch, _ in kernels} == {f"sm_{arch}" for arch in EXPECTED_ARCHS}
    for (arch, name), sass in kernels.items():
        assert re.search(r"\bLDG\.E\.128\b", sass), (arch, name)
        assert not re.search(r"\b(LDL|STL)\b", sass), (arch, name)
        commit = "kv_cache_commit_kernel" in name
        assert "UCGABAR_ARV" in sass and "UCGABAR_WAIT" in sass, (arch, name)
        storage = re.search(r"kernelI(?:6__half|13__nv_bfloat16|f)(h|f|13__nv_bfloat16|S\d_)" if commit
                            else r"kernelI(h|f|13__nv_bfloat16)Lb", name).group(1)
        if storage == "h":  # e4m3 (__nv_fp8_storage_t is unsigned char)
            assert re.search(r"\bF2FP\.SATFINITE\.E4M3\.F32\.PACK_AB", sass), (arch, name)
            assert re.search(r"\bSTG\.E\.64\b" if commit else r"\bSTG\.E\.128\b", sass), (arch, name)
        else:
            assert re.search(r"\bSTG\.E\.128\b", sass), (arch, name)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CI builds the wheel; a GPU run spends its time on the GPU")
def test_the_sass_tool_reports_every_cuda_kernel_by_its_readable_name(tmp_path, capsys):
    """`python -m xjfast.tools.sass --backend cuda` reads _C: one report per kernel and arch, named
    by kernel and template arguments in xjfast's words, all but the instantiations that are only a
    trap (the wgmma and warp-specialized paths outside sm_90a), which it counts."""
    listing = cuda_listing()
    assert sass_tool.main(["--backend", "cuda", "--json", str(tmp_path / "cuda.json")]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "cuda.json") as f:
        reports = json.load(f)
    traps = [key for key, k in listing.items() if sass_tool.trap_only(k["sass"])]
    assert all(("WgmmaCore" in name or "_ws_" in name) and arch != "sm_90a" for arch, name in traps), traps
    assert len(traps) == 18 * len([arch for arch in EXPECTED_ARCHS if arch != "90a"])  # 3 kernels x 6
    assert sorted((r["arch"], r["mangled"]) for r in reports) == sorted(set(listing) - set(traps))
    assert f"{len(traps)} instantiations are only a trap" in out
    rows = {(r["kernel"], r["arch"]): r for r in reports}
    if "90a" in EXPECTED_ARCHS:
        ws = rows["temporal_attention_ws_kernel<bf16, 128>", "sm_90a"]
        assert ws["registers"] == 168 and set(ws["tensor_core"]) == {"QGMMA"} and ws["inner_loop"]["exp2"] == 34
        assert set(rows["temporal_attention_kernel<fp16, 64, wgmma>", "sm_90a"]["tensor_core"]) == {"QGMMA"}
        assert "kv_cache_commit_kernel<fp32, e4m3, true>" in out and "temporal_attention_ws_kernel<bf16, 128>" in out
    for arch in EXPECTED_ARCHS:
        mma = rows["temporal_attention_kernel<bf16, 128, mma>", f"sm_{arch}"]
        assert set(mma["tensor_core"]) == {"HMMA"} and mma["stack_bytes"] == 0 and mma["spill_stores"] == 0


@pytest.mark.parametrize("arch", ["75", "sm_90"])
def test_an_arch_the_kernels_cannot_be_built_for_is_refused_by_name(tmp_path, arch):
    """CMake's configure step (before it looks for a compiler) names an arch below sm_80, whose
    cp.async and bf16 the kernels need, instead of failing later with nvcc's errors."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")
    run = subprocess.run([cmake, "-S", ROOT, "-B", str(tmp_path), f"-DXJFAST_CUDA_ARCHS=90a;{arch}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f'the CUDA kernels need sm_80 or later, got "{arch}"' in run.stderr, run.stderr


def test_a_wheel_for_one_arch_carries_its_sass_only_and_says_so_in_its_name(tmp_path):
    """`make wheel ARCHS="80"`'s build (pip wheel with XJFAST_CUDA_ARCHS), from a copy of the sources:
    the wheel's version carries the arch as a local label, so wheels for different GPUs differ
    by name, and it holds _C with that arch's SASS alone, the kernels and the benchmarks. sm_80 is
    the oldest arch an op runs on (denoise_step): it has no e4m3 mma.sync (sm_89) and no clusters
    (sm_90), so there the attention and cache kernels build as a trap, which the host never
    launches (they need sm_90)."""
    import zipfile

    import xjfast
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "_C*.so", "*.egg-info")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "MANIFEST.in", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("xjfast", "kernels", "bench", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    env = dict(os.environ, XJFAST_CUDA_ARCHS="80")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], env=env, check=True, capture_output=True, timeout=600)
    wheels = os.listdir(tmp_path / "dist")
    assert len(wheels) == 1 and wheels[0].startswith(f"xjfast-{xjfast.__version__}+sm80-"), wheels
    with zipfile.ZipFile(tmp_path / "dist" / wheels[0]) as wheel:
        names = wheel.namelist()
        for needed in ("xjfast/kernels/temporal_attention.py", "xjfast/bench/run.py", "xjfast/backend_ranking.json"):
            assert needed in names
        [library] = [n for n in names if re.fullmatch(r"xjfast/_C\..*\.so", n)]
        wheel.extract(library, tmp_path)
    assert embedded_archs(str(tmp_path / library)) == {"sm_80"}
    kernels = {name: k["sass"] for (arch, name), k in sass_tool.cuda_listing(str(tmp_path / library)).items()}
    traps = {name for name, sass in kernels.items() if sass_tool.trap_only(sass)}
    assert traps == {name for name in kernels if "denoise_step" not in name} and len(kernels) > len(traps)
