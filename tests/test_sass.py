"""Static checks of the Triton kernels' machine code for Hopper and Blackwell, without a GPU."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the SASS checks compile the Triton kernels")
from xjfast.tools import sass  # noqa: E402

ARCHS = (89, 90, 100, 120)  # Ada, Hopper, Blackwell and consumer Blackwell (mma.sync, as Ada)
FP8_MMA = {89: "QMMA", 90: "QGMMA", 100: "UTCQMMA", 120: "QMMA"}
BF16_MMA = {89: "HMMA", 90: "HGMMA", 100: "UTCHMMA", 120: "HMMA"}
# Where no tile tried avoids a spill on sm_89 and sm_120 (kernels/temporal_attention.py,
# SIXTEEN_BIT_CONFIG): 16-bit launches (precision "bf16", a bf16-stored cache), and under Triton
# 3.6 the attention-mass kernel (run once per evicted page) on sm_89: at most these bytes of
# stack, the larger of Triton 3.6's and 3.9's
KNOWN_SPILLS = {("temporal_attention[fp8,bf16 cache,D=128]", 89): 16, ("attention_mass[fp8,D=128]", 89): 8,
                ("temporal_attention[bf16,D=128]", 120): 240, ("temporal_attention[fp8,bf16 cache,D=128]", 120): 144}


def covered(spec, arch: int) -> bool:
    """What the reports hold: every kernel on sm_90a and sm_100a; on sm_89 and sm_120a, whose
    tensor cores only the attention kernels use, those (the others compile as they do elsewhere)."""
    return arch in (90, 100) or "attention" in spec.name


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The tool's own report, run as users run it: in a process where Triton compiles (the test
    session may run Triton's interpreter, whose kernels cannot be compiled); FP fusion off by
    default, as Triton 3.10 will have it, which the kernels' own compile options override."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    reports = []
    for index, archs in enumerate((["--arch", "90", "100"], ["--arch", "89", "120", "--kernel", "attention"])):
        out = tmp_path_factory.mktemp("sass") / f"report{index}.json"
        subprocess.run([sys.executable, "-m", "xjfast.tools.sass", "--backend", "triton", "--candidates", *archs,
                        "--json", str(out)], env=env, check=True, capture_output=True, text=True)
        reports += json.loads(out.read_text())
    return {(r["kernel"], sass.arch_number(r["arch"])): r for r in reports}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_attention_uses_fp8_tensor_cores(reports, arch):
    for name in ("temporal_attention[fp8,D=128]", "temporal_attention[fp8,D=64]", "attention_mass[fp8,D=128]"):
        ops = reports[(name, arch)]["tensor_core"]
        assert ops.get(FP8_MMA[arch], 0) > 0, (name, ops)
        assert set(ops) == {FP8_MMA[arch]}, f"{name}: 16-bit MMAs in the FP8 kernel: {ops}"


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_attention_uses_bf16_tensor_cores(reports, arch):
    ops = reports[("temporal_attention[bf16,D=128]", arch)]["tensor_core"]
    assert ops.get(BF16_MMA[arch], 0) > 0, ops


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits(reports, arch):
    for (name, a), r in reports.items():
        if a == arch:
            assert r["shared_bytes"] <= r["shared_limit"], name


@pytest.mark.parametrize("name, arch", [pytest.param(spec.name, arch, id=f"{spec.name}-{sass.arch_name(arch)}")
                                        for spec in sass.stream_specs() for arch in ARCHS if covered(spec, arch)] +
                         [pytest.param(spec.name, arch, id=f"{spec.name}-{sass.arch_name(arch)}")
                          for spec in sass.candidate_specs() for arch in spec.configs])
def test_nothing_spills(reports, name, arch):
    """Every kernel, and the FP8 attention in every configuration the benchmark may rank first;
    on sm_89 and sm_120, no more than KNOWN_SPILLS says."""
    r = reports[(name, arch)]
    if (name, arch) in KNOWN_SPILLS:
        assert r["stack_bytes"] <= KNOWN_SPILLS[(name, arch)], r
        return
    assert r["stack_bytes"] == 0 and r["spill_stores"] == 0, r
    if r.get("config"):
        assert r["tensor_core"].get(FP8_MMA[arch], 0) > 0, r


@pytest.mark.parametrize("name, arch", [pytest.param(spec.name, arch, id=f"{spec.name}-{sass.arch_name(arch)}")
                                        for spec in sass.stream_specs() if spec.function == "temporal_attention_kernel"
                                        for arch in ARCHS])
def test_attention_computes_each_softmax_once(reports, name, arch):
    """In the configuration a GPU runs before any ranking, one key step's exp2 per thread, over the
    CTA's threads, is the score tile's BLOCK_M x BLOCK_N plus a few per row (the rescale factors).
    On sm_90 a 64-row tile at 8 warps had both warpgroups exponentiate the whole tile: twice that.
    sm_89 and sm_120 run a 64-row 8-warp tile whose warps split the columns there: at most twice
    (their 128-row tiles spill)."""
    r = reports[(name, arch)]
    block_m, block_n = r["block"]
    threads = 32 * r["num_warps"]
    assert r["inner_loop"]["exp2"] * threads <= (2 if arch in (89, 120) else 1) * block_m * block_n + 4 * threads, r


@pytest.mark.parametrize("name", [spec.name for spec in sass.stream_specs() + sass.candidate_specs()
                                  if spec.tags.get("precision") == "fp8" and spec.tags.get("storage") == "fp8"
                                  and 90 in spec.configs])
def test_fp8_attention_stores_value_tiles_in_words_on_sm_90(reports, name):
    """FP8 wgmma takes V only K-major, so each V tile is transposed into shared memory; loaded as
    plain rows, Triton did it one byte at a time (STS.U8: 32 per thread per 32 keys, the store
    unit's whole budget); the kernel loads V by fours of keys instead (hopper_paths)."""
    loop = reports[(name, 90)]["inner_loop"]
    assert loop["byte_stores"] == 0, loop


@pytest.mark.parametrize("name, arch", [pytest.param(spec.name, arch, id=f"{spec.name}-{sass.arch_name(arch)}")
                                        for spec in sass.candidate_specs() for arch in spec.configs])
def test_programs_per_sm_are_what_the_split_heuristic_assumes(reports, name, arch):
    """kv_splits counts the programs a GPU runs at once from ctas_per_sm(warps): the registers of
    every candidate (allocated 8 at a time per thread) must give that many in an SM's 64K."""
    from xjfast.kernels.temporal_attention import ctas_per_sm
    r = reports[(name, arch)]
    per_program = -(-r["registers"] // 8) * 8 * 32 * r["num_warps"]
    assert 65536 // per_program == ctas_per_sm(r["num_warps"]), r


def test_loop_analysis_sees_a_duplicated_softmax(reports):
    """The check above can fail: the 8-warp candidate kept for the benchmark to weigh exponentiates
    each score twice on sm_90 (both warpgroups), and the tool's loop analysis shows it."""
    r = reports[("temporal_attention[fp8,D=128] 64,64,8,2", 90)]
    assert r["inner_loop"]["exp2"] * 32 * r["num_warps"] >= 2 * 64 * 64, r


def test_every_denoise_step_variant_compiles_without_spills(tmp_path):
    """The launcher's denoise_step variants (tokens or latents, row groups or not, a next sigma or
    not, the frame index in memory or given, each dtype) compiled for sm_90a: the interpreter runs
    them, but only a compile shows a lowering error or a spill. (`--variants` also covers the
    attention's hundreds of variants, too many for CI.)"""
    out = tmp_path / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "xjfast.tools.sass", "--variants", "--kernel", "denoise_step[", "--arch",
                    "90", "--json", str(out)], env=env, check=True, capture_output=True, text=True)
    reports = json.loads(out.read_text())
    assert len(reports) == 1 + sum(spec.function == "denoise_step_kernel" for spec in sass.variant_specs())
    assert [r["kernel"] for r in reports if r["stack_bytes"] or r["spill_stores"]] == []


def test_loop_spills_counts_only_spills_inside_loops():
    """A spill once per program (before or after the loops) costs next to nothing; one inside the
    key loop costs every iteration: the tool tells them apart from the SASS's backward branches."""
    text = """
        /*0000*/                   STL [R1], R3 ;
    .L_x_0:
        /*0010*/                   LDL R4, [R1] ;
        /*0020*/                   QGMMA.64x32x32.F32.E4M3.E4M3 R24, R8, gdesc[UR4], R24 ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
        /*0040*/                   LDL.LU R5, [R1+0x4] ;
    """
    assert sass.loop_spills(text) == 1
    assert sass.inner_loop(text)["instructions"] == 3


@pytest.mark.parametrize("name, arch", [
    ("temporal_attention[fp8,fp8 cache,D=128,causal,fp16,split] 64,32,4,1", 90),
    ("temporal_attention[fp8,fp8 cache,D=128,causal,fp16,split] 64,64,8,1", 100)])
def test_fp16_attention_spills_nothing_in_its_loops(tmp_path, name, arch):
    """fp16 inputs, the stream's configuration, split output: at 255 registers under Triton 3.6,
    sm_90a spills 24 bytes around the loops (prologue and epilogue, once per program), none inside
    them; the key loops must stay free of spills on every version."""
    out = tmp_path / "fp16.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "xjfast.tools.sass", "--variants", "--kernel", name, "--arch", str(arch),
                    "--json", str(out)], env=env, check=True, capture_output=True, text=True)
    [r] = [r for r in json.loads(out.read_text()) if r["kernel"] == name]
    assert r["loop_spills"] == 0 and r["stack_bytes"] <= 32, r


def test_every_launched_kernel_is_checked():
    """A Triton kernel added to kernels/ without a spec here would escape every check above."""
    import importlib
    import pkgutil

    import xjfast.kernels

    launched = {(info.name, name) for info in pkgutil.iter_modules(xjfast.kernels.__path__)
                for name in dir(importlib.import_module(f"xjfast.kernels.{info.name}")) if name.endswith("_kernel")}
    checked = {(spec.module, spec.function) for spec in sass.stream_specs()}
    assert launched and launched <= checked, sorted(launched - checked)


def test_every_kernel_is_compiled_with_fma_contraction_whatever_tritons_default(reports):
    """The softmax's exponents are one FMA each: compiled without contraction (Triton 3.10's
    default), the kernels would run other code than the SASS checks above saw."""
    assert all(r["fp_fusion"] is True for r in reports.values()), [k for k, r in reports.items() if not r["fp_fusion"]]


def test_every_kernel_compiles_with_its_integer_arguments_equal_to_one(tmp_path):
    """Triton's launcher compiles an integer argument equal to 1 as the constant 1 (unless the kernel
    says do_not_specialize); the interpreter never does, so only a compile shows code that breaks on
    it: a seed half of 1 (step_seed(0, 1)) made `.to(tl.uint32)` fail in denoise_step."""
    out = tmp_path / "ones.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "xjfast.tools.sass", "--backend", "triton", "--ones", "--arch", "90",
                          "--json", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(out.read_text())) == len(sass.stream_specs())


@pytest.mark.parametrize("name", [spec.name for spec in sass.stream_specs() + sass.candidate_specs()
                                  if spec.name.startswith("temporal_attention[fp8") and "D=128" in spec.name
                                  and (spec.configs is None or 90 in spec.configs)])
def test_fp8_pv_is_summed_per_tile_on_sm_90(reports, name):
    """Hopper's FP8 wgmma keeps 13 mantissa bits of the accumulator it adds into: P.V (64 rows x
    128 channels over a warpgroup's share of them, A from registers) starts from zero every key
    tile and is added to the output in fp32, or the error grows with the number of keys
    (SageAttention2's two-level accumulation)."""
    r = reports[(name, 90)]
    pv = r["register_a"][f"QGMMA.64x{128 * 4 // r['num_warps']}x32"]
    assert pv["fresh"] * r["block"][1] // 32 >= pv["total"] > 0, (name, pv)


def test_compile_only_compiles_every_launch_for_real_on_threads_and_once(tmp_path):
    """What StreamGenerator.precompile relies on, under the Triton that runs (CI runs this file under
    3.9 and 3.6): launches inside kernels.launch.compile_only() compile their kernels on a thread
    pool (Triton's AsyncCompileMode) and leave them in the JIT's cache, where a later launch finds
    them; under the interpreter nothing compiles, so a child process drives the real JIT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiles, not loads from an earlier run's cache
    child = os.path.join(os.path.dirname(__file__), "compile_only_child.py")
    run = subprocess.run([sys.executable, child, "2"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    # denoise with and without re-noising, the commit's statistics and its write
    assert counts == {"first": 4, "second": 0, "cubins": 4}, counts
