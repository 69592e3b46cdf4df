"""Compile every Triton kernel, in its tuned configurations, for sm_90a and sm_100a (or sm_89 and
sm_120a) without a GPU, read every CUDA kernel of the installed xjfast._C, and report per kernel
and arch: registers, spills, shared memory, the tensor-core instructions in the SASS, and what
one iteration of the innermost tensor-core loop issues per thread ("loop": instructions and exp2).

    python -m xjfast.tools.sass [--backend triton cuda] [--arch 89 90 100 120] [--kernel NAME ...]
                                [--candidates] [--variants] [--ones] [--json FILE]

Triton compiles for a target it does not have (`triton.compile(ASTSource(...), target=GPUTarget)`),
and the cuobjdump/nvdisasm shipped inside Triton's wheel read the cubin. Integer arguments are
specialized as Triton does at launch (divisible by 16 or not) from the stream-shape values below.
The CUDA kernels are read from _C's cubins (the toolkit's cuobjdump, else Triton's); their shared
memory is the static part, the launch adds the dynamic tiles. The loop counts every branch inside
it once, so a key loop with a masked and an unmasked softmax counts both.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# Shared memory a block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TENSOR_CORE_OPS = ("QGMMA", "HGMMA", "QMMA", "HMMA", "IMMA", "UTCQMMA", "UTCHMMA", "UTCOMMA", "UTCIMMA")  # QMMA: warp FP8 (sm_89, sm_120)


@dataclass
class KernelSpec:
    name: str
    module: str          # xjfast.kernels.<module>
    function: str        # the @triton.jit function
    args: dict           # example value per runtime argument: "*bf16"-style strings for pointers
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    tags: dict = field(default_factory=dict)
    configs: dict | None = None  # arch -> (BLOCK_M, BLOCK_N, warps, stages), as the launcher picks them


def arch_target(arch: int) -> str:
    """The tuning target (xjfast.kernels.temporal_attention.target) of an arch number: 89 -> sm_89."""
    from xjfast.kernels.temporal_attention import target
    return target(divmod(arch, 10))


def arch_name(arch: int) -> str:
    """sm_90a for 90: Triton compiles the architecture-specific target from sm_90 on."""
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


def arch_number(name: str) -> int:
    """90 for sm_90a (or sm_90): arch_name's inverse."""
    return int(re.sub(r"\D", "", name))


def stream_specs() -> list[KernelSpec]:
    """The tuned configurations at the Wan2.1-1.3B stream shape (H=12, 1560-token frames)."""
    import triton.language as tl

    from xjfast.kernels.denoise_step import BLOCK as DENOISE_BLOCK
    from xjfast.kernels.kv_cache_commit import BLOCK_T as COMMIT_BLOCK_T
    from xjfast.kernels.kv_cache_commit import WARPS as COMMIT_WARPS
    from xjfast.kernels.kv_cache_compact import BLOCK_T as COMPACT_BLOCK_T
    from xjfast.kernels.temporal_attention import CANDIDATES, COMBINE_ROWS, Q_TILE, precision_config

    B, H, T, L = 1, 12, 1560, 2 * 1560
    per_arch = {arch: CANDIDATES[arch_target(arch)][0] for arch in SHARED_LIMIT}  # what a GPU runs before any ranking
    specs = []
    # (the stream's cache stores e4m3 pages, which bf16 precision reads dequantized; a cache may
    # also store bf16, whose units FP8 precision reads unquantized beside its FP8 pass units)
    for D, rope, precision, storage in ((128, 44, "fp8", "fp8"), (64, 24, "fp8", "fp8"), (128, 44, "bf16", "fp8"),
                                        (128, 44, "fp8", "bf16")):
        fp8 = precision == "fp8"
        page = "*fp8e4nv" if storage == "fp8" else "*bf16"
        pass_kv = "*fp8e4nv" if fp8 else "*bf16"
        args = dict(
            # two key-unit splits' fp32 outputs (kv_splits' choice for 2 query frames on an H100)
            q_ptr="*bf16", out_ptr="*fp32", lse_ptr="*fp32", stride_qb=L * H * D, stride_ql=H * D, stride_qh=D,
            stride_os=B * L * H * D, stride_ob=L * H * D, stride_ol=H * D, stride_oh=D, stride_ls=B * H * L,
            split_units=12, ck_ptr=page, cv_ptr=page, cks_ptr="*fp32",
            ckm_ptr="*fp32", cvs_ptr="*fp32", page_table_ptr="*i32", n_pages=21, n_sinks=1, cache_T=T,
            kk_ptr=page, kv_ptr=page, kks_ptr="*fp32", kkm_ptr="*fp32", kvs_ptr="*fp32", keep_count=0, keep_cap=3,
            pk_ptr=pass_kv, pv_ptr=pass_kv, pks_ptr="*fp32", pkm_ptr="*fp32", pvs_ptr="*fp32",
            stride_pkb=L * H * D, stride_pkl=H * D, stride_pkh=D, stride_pvb=L * H * D, stride_pvl=H * D,
            stride_pvh=D, n_units=2, unit_T=T, private_ptr="*i8", slots_ptr="*i32", lags_ptr="*i32", block_units=1,
            B=B, H=H, Lq=L, first_slot=21,
            sm_scale_log2=0.127, rope_ptr="*fp32", rope_center=27)
        all_fp8 = fp8 and storage == "fp8"
        const = dict(D=D, ROPE_DIMS=rope, CACHE_FP8=all_fp8, PASS_FP8=fp8, CAUSAL=True,
                     DT=tl.bfloat16, INTERPRET=False, LAGGED=False)
        name = f"temporal_attention[{precision}{'' if storage == 'fp8' else f',{storage} cache'},D={D}]"
        specs.append(KernelSpec(name, "temporal_attention", "temporal_attention_kernel", args, const,
                                configs={arch: precision_config(cfg, all_fp8, arch_target(arch))
                                         for arch, cfg in per_arch.items()},
                                tags=dict(op="temporal_attention", precision=precision, head_dim=D,
                                          storage=storage)))
    # a speculative pass's (frame_lags: each frame's view of the cache); the Triton kernel runs it
    fp8_128 = next(spec for spec in specs if spec.name == "temporal_attention[fp8,D=128]")
    specs.append(dataclasses.replace(fp8_128, name="temporal_attention[fp8,D=128,lagged]",
                                     constexprs=dict(fp8_128.constexprs, LAGGED=True)))
    specs.append(KernelSpec(
        "attention_mass[fp8,D=128]", "temporal_attention", "attention_mass_kernel",
        dict(q_ptr="*bf16", lse_ptr="*fp32", stride_qb=L * H * 128, stride_ql=H * 128, stride_qh=128,
             ck_ptr="*fp8e4nv", cks_ptr="*fp32", ckm_ptr="*fp32", mass_ptr="*i64", page_table_ptr="*i32",
             table_index=1, slot=1, B=B, H=H,
             Lq=L, cache_T=T, first_slot=21, unit_T=T, slots_ptr="*i32", lags_ptr="*i32", window_index=0,
             sm_scale_log2=0.127, rope_ptr="*fp32", rope_center=27),
        dict(D=128, ROPE_DIMS=44, BLOCK_M=Q_TILE, CACHE_FP8=True, DT=tl.bfloat16, INTERPRET=False, LAGGED=False),
        configs=per_arch,
        tags=dict(op="temporal_attention")))
    specs.append(KernelSpec(  # the merge of three key-unit splits
        "attention_combine[D=128]", "temporal_attention", "attention_combine_kernel",
        dict(part_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16", lse_ptr="*fp32", splits=3,
             stride_ps=B * L * H * 128, stride_ls=B * H * L, stride_ob=L * H * 128, stride_ol=H * 128, stride_oh=128,
             H=H, Lq=L),
        dict(D=128, BLOCK_M=COMBINE_ROWS), 4, tags=dict(op="temporal_attention")))
    strides = dict(stride_kb=3 * T * H * 128, stride_kl=H * 128, stride_kh=128, stride_vb=3 * T * H * 128,
                   stride_vl=H * 128, stride_vh=128)
    chunk = 2 * COMMIT_BLOCK_T  # one frame of 12 heads over 132 SMs
    specs.append(KernelSpec(
        "kv_cache_commit_stats[D=128]", "kv_cache_commit", "kv_cache_commit_stats_kernel",
        dict(k_ptr="*bf16", v_ptr="*bf16", stats_ptr="*fp32", **strides, H=H, T=T, chunk=chunk),
        dict(D=128, BLOCK_T=COMMIT_BLOCK_T), COMMIT_WARPS, tags=dict(op="kv_cache_commit")))
    specs.append(KernelSpec(
        "kv_cache_commit[fp8,D=128]", "kv_cache_commit", "kv_cache_commit_kernel",
        dict(k_ptr="*bf16", v_ptr="*bf16", stats_ptr="*fp32", page_ids_ptr="*i32", kp_ptr="*fp8e4nv",
             vp_ptr="*fp8e4nv", ks_ptr="*fp32", km_ptr="*fp32", vs_ptr="*fp32", **strides, P=24, B=B, H=H, T=T,
             chunk=chunk),
        dict(D=128, BLOCK_T=COMMIT_BLOCK_T, FP8=True, INTERPRET=False), COMMIT_WARPS,
        tags=dict(op="kv_cache_commit")))
    compact = dict(keep_k="*fp8e4nv", keep_v="*fp8e4nv", keep_ks="*fp32", keep_km="*fp32", keep_vs="*fp32",
                   page_k="*fp8e4nv", page_v="*fp8e4nv", page_ks="*fp32", page_km="*fp32", page_vs="*fp32",
                   top_ptr="*i64", scratch_k="*fp8e4nv", scratch_v="*fp8e4nv", stats_ptr="*fp32", old_ptr="*fp32",
                   keep_count=256, count=512, K=512, T=T, H=H, chunk=2 * COMPACT_BLOCK_T)  # 12 heads x 16 chunks
    specs.append(KernelSpec(
        "kv_cache_compact_stats[fp8,D=128]", "kv_cache_compact", "kv_cache_compact_stats_kernel", compact,
        dict(D=128, BLOCK_T=COMPACT_BLOCK_T), COMMIT_WARPS, tags=dict(op="kv_cache_compact")))
    specs.append(KernelSpec(
        "kv_cache_compact[fp8,D=128]", "kv_cache_compact", "kv_cache_compact_kernel", compact,
        dict(D=128, BLOCK_T=COMPACT_BLOCK_T, FP8=True, INTERPRET=False), COMMIT_WARPS,
        tags=dict(op="kv_cache_compact")))
    # the stream's step: the head's bf16 tokens in, bf16 latents out, a next noise level to reach
    C, F, LH, LW = 16, 1, 60, 104
    specs.append(KernelSpec(
        "denoise_step[tokens,bf16]", "denoise_step", "denoise_step_kernel",
        dict(xt_ptr="*bf16", mo_ptr="*bf16", coef_ptr="*fp32", x0_ptr="*bf16", xn_ptr="*bf16",
             s_xb=C * F * LH * LW // 4, s_xc=F * LH * LW // 4, s_xf=LH * LW // 4, s_xh=LW // 4, s_xw=1,  # ROWS: / 4
             s_m0=T * 4 * C, s_m1=4 * C, s_m2=1, s_m3=0, s_m4=0,
             total=B * C * LH * LW, C=C, H=LH, W=LW, F=F, frame_index=0, frame_ptr="*i64",
             seed_lo=7, seed_hi=0),
        dict(TOKENS=True, PT=1, PH=2, PW=2, HAS_NEXT=True, FRAME_IN_MEMORY=True, ROWS=True, BLOCK=DENOISE_BLOCK),
        4, tags=dict(op="denoise_step")))
    return specs


def candidate_specs() -> list[KernelSpec]:
    """The FP8 attention at the stream shape (head_dim 128) in every candidate configuration the
    benchmark ranks (xjfast.kernels.temporal_attention.CANDIDATES), one spec per target's candidate."""
    from xjfast.kernels.temporal_attention import CANDIDATES, config_name
    base = next(s for s in stream_specs() if s.name == "temporal_attention[fp8,D=128]")
    return [dataclasses.replace(base, name=f"{base.name} {config_name(cfg)}", configs={arch: cfg},
                                tags=dict(base.tags, config=config_name(cfg)))
            for arch in SHARED_LIMIT for cfg in CANDIDATES[arch_target(arch)]]


def variant_specs() -> list[KernelSpec]:
    """Every variant the launchers compile beyond stream_specs (for --variants: a compile error or a
    spill only a variant shows). The attention in each candidate configuration, as precision_config
    adapts it, x head_dim 128/64 x {FP8 over an e4m3 cache or none, FP8 over a bf16-stored cache,
    bf16} x block-causal or not x bf16/fp16 inputs x split (fp32) or unsplit output; denoise_step
    with tokens or latents x row groups or not x with or without a next sigma x frame index in
    memory or not, per dtype."""
    import itertools

    import triton.language as tl

    from xjfast.kernels.temporal_attention import CANDIDATES, config_name, precision_config
    stream = {spec.name: spec for spec in stream_specs()}
    specs = []
    base = stream["temporal_attention[fp8,D=128]"]
    kinds = (("fp8", "fp8"), ("fp8", "bf16"), ("bf16", "fp8"))
    for arch, (D, rope), (precision, storage), causal, dtype, split in itertools.product(
            SHARED_LIMIT, ((128, 44), (64, 24)), kinds, (True, False), ("bf16", "fp16"), (True, False)):
        all_fp8 = precision == "fp8" and storage == "fp8"
        page = "*fp8e4nv" if storage == "fp8" else f"*{dtype}"
        pass_kv = "*fp8e4nv" if precision == "fp8" else f"*{dtype}"
        args = dict(base.args, q_ptr=f"*{dtype}", out_ptr="*fp32" if split else f"*{dtype}", ck_ptr=page,
                    cv_ptr=page, kk_ptr=page, kv_ptr=page, pk_ptr=pass_kv, pv_ptr=pass_kv)
        const = dict(base.constexprs, D=D, ROPE_DIMS=rope, CACHE_FP8=all_fp8, PASS_FP8=precision == "fp8",
                     CAUSAL=causal, DT={"bf16": tl.bfloat16, "fp16": tl.float16}[dtype])
        for cfg in CANDIDATES[arch_target(arch)]:
            name = (f"temporal_attention[{precision},{storage} cache,D={D},{'causal' if causal else 'full'},{dtype},"
                    f"{'split' if split else 'unsplit'}] {config_name(cfg)}")
            specs.append(dataclasses.replace(base, name=name, args=args, constexprs=const,
                                             configs={arch: precision_config(cfg, all_fp8, arch_target(arch))},
                                             tags=dict(base.tags, precision=precision, storage=storage, head_dim=D)))
    base = stream["denoise_step[tokens,bf16]"]
    for tokens, rows, has_next, in_memory, dtype in itertools.product(
            (True, False), (True, False), (True, False), (True, False), ("bf16", "fp16", "fp32")):
        name = (f"denoise_step[{'tokens' if tokens else 'latents'},{'rows' if rows else 'general'},"
                f"{'next' if has_next else 'last'},{'frame in memory' if in_memory else 'frame given'},{dtype}]")
        args = dict(base.args, xt_ptr=f"*{dtype}", mo_ptr=f"*{dtype}", x0_ptr=f"*{dtype}", xn_ptr=f"*{dtype}")
        const = dict(base.constexprs, TOKENS=tokens, ROWS=rows, HAS_NEXT=has_next, FRAME_IN_MEMORY=in_memory)
        specs.append(dataclasses.replace(base, name=name, args=args, constexprs=const))
    return specs


def _signature(fn, spec: KernelSpec):
    """Signature, attributes and constexprs as Triton's launcher specializes these values: an
    integer equal to 1 becomes the constant 1, one divisible by 16 is marked so, unless the kernel
    lists the argument in do_not_specialize (the interpreter does neither, so only a compile shows
    code that breaks on the constant: `seed.to(tl.uint32)` of a constexpr 1 does)."""
    signature, attrs, constexprs = {}, {}, dict(spec.constexprs)
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        value = spec.args[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs, constexprs


def _tool(name: str) -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else name


_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


@functools.lru_cache(maxsize=8)  # a kernel's report parses its SASS several times
def _instructions(sass: str) -> tuple[list, list]:
    """One kernel's SASS as `nvdisasm -c` (branch targets as labels) or `cuobjdump -sass` (as
    addresses) prints it: its instructions [(opcode, operands)] and its loops [(first, last)],
    positions in that list, from every backward branch."""
    body, index = [], {}  # label or address -> position in body
    for line in sass.splitlines():
        if label := _LABEL.match(line):
            index[label.group(1)] = len(body)
        elif ins := _INSTRUCTION.match(line):
            index[int(ins.group(1), 16)] = len(body)
            body.append((ins.group(2), ins.group(3)))

    def target(operands):
        found = re.search(r"(\.L_x_\d+)|0x([0-9a-f]+)", operands)
        return None if found is None else index.get(found.group(1) or int(found.group(2), 16))

    loops = [(start, i) for i, (op, rest) in enumerate(body)
             if op.startswith("BRA") and (start := target(rest)) is not None and start <= i]
    return body, loops


def inner_loop(sass: str) -> dict | None:
    """The per-iteration cost of the innermost loop that holds tensor-core instructions (the key
    loop of an attention kernel: its first copy): instructions, MUFU.EX2 (exp2) and single-byte
    shared stores (STS.U8) a thread issues per iteration, both branches of an if inside the loop
    counted. None without such a loop."""
    body, loops = _instructions(sass)
    mma = [(a, b) for a, b in loops if any(body[j][0].split(".")[0] in TENSOR_CORE_OPS for j in range(a, b + 1))]
    innermost = [(a, b) for a, b in mma if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in mma)]
    if not innermost:
        return None
    a, b = min(innermost)
    ops = [body[j][0] for j in range(a, b + 1)]
    return dict(instructions=len(ops), exp2=ops.count("MUFU.EX2"), byte_stores=ops.count("STS.U8"))


def loop_spills(sass: str) -> int:
    """Local-memory loads and stores (STL/LDL) inside any loop: the spills that cost per iteration
    (a few around the loops, once per program, cost next to nothing)."""
    body, loops = _instructions(sass)
    inside = {j for a, b in loops for j in range(a, b + 1)}
    return sum(1 for j in inside if body[j][0].split(".")[0] in ("STL", "LDL"))


def register_a_chains(sass: str) -> dict:
    """For each wgmma shape whose A operand comes from registers (attention's P.V), how many of its
    instructions there are and how many start from a zero accumulator (`RZ, !UPT`): with FP8,
    Hopper keeps 13 mantissa bits of the accumulator a wgmma adds into, so P.V is summed per tile
    from zero and added to the output in fp32, and every chain of tile/32 must start fresh."""
    out: dict = {}
    for shape, acc in re.findall(r"\b([QH]GMMA\.\d+x\d+x\d+)\.\S+ R\d+, R\d+, gdesc\[[^\]]*\], (RZ|R\d+)", sass):
        total, fresh = out.get(shape, (0, 0))
        out[shape] = (total + 1, fresh + (acc == "RZ"))
    return {shape: {"total": t, "fresh": f} for shape, (t, f) in out.items()}


def analyse(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes and instruction counts of a cubin holding one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout).groups())
    return sass_report(sass, regs, stack)


def sass_report(sass: str, registers: int, stack_bytes: int) -> dict:
    """The report of one kernel's SASS (nvdisasm's or cuobjdump's listing), given its registers
    and stack bytes: spill instructions (all, and inside loops), tensor-core instructions, FFMA,
    its inner tensor-core loop's per-iteration cost and its register-A product chains."""
    opcodes = collections.Counter(re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", sass, re.M))
    return dict(registers=registers, stack_bytes=stack_bytes, spill_stores=opcodes.get("STL", 0),
                spill_loads=opcodes.get("LDL", 0), loop_spills=loop_spills(sass),
                tensor_core={op: opcodes[op] for op in TENSOR_CORE_OPS if opcodes[op]},
                ffma=opcodes.get("FFMA", 0), inner_loop=inner_loop(sass), register_a=register_a_chains(sass))


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from xjfast.kernels.launch import COMPILE_OPTIONS

    fn = getattr(importlib.import_module(f"xjfast.kernels.{spec.module}"), spec.function)
    if spec.configs:  # the launcher's per-architecture configuration
        block_m, block_n, warps, stages = spec.configs[arch]  # a kernel's own BLOCK_M stands
        spec = dataclasses.replace(spec, constexprs={"BLOCK_M": block_m, **spec.constexprs, "BLOCK_N": block_n},
                                   num_warps=warps,
                                   num_stages=stages)
    if "HOPPER" in fn.arg_names:  # as the launcher sets it for the target
        from xjfast.kernels.temporal_attention import hopper_paths
        spec = dataclasses.replace(spec, constexprs={**spec.constexprs, "HOPPER": hopper_paths((arch // 10, 0))})
    signature, attrs, constexprs = _signature(fn, spec)
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages, **COMPILE_OPTIONS))
    report = analyse(compiled.asm["cubin"])
    report.update(kernel=spec.name, arch=arch_name(arch), shared_bytes=compiled.metadata.shared,
                  fp_fusion=compiled.metadata.enable_fp_fusion,
                  shared_limit=SHARED_LIMIT[arch], num_warps=spec.num_warps, num_stages=spec.num_stages,
                  block=[spec.constexprs.get("BLOCK_M"), spec.constexprs.get("BLOCK_N")], **spec.tags)
    return report


# ---- the CUDA kernels (csrc/) in the installed xjfast._C: read from its cubins, not compiled ----

def toolkit_tool(name: str) -> str | None:
    """The CUDA toolkit's `name` (under $CUDA_HOME, /usr/local/cuda, or on the PATH), else the one
    in Triton's wheel; None where there is neither. _C comes from the toolkit's nvcc, and an older
    cuobjdump (CUDA 12.8's, in Triton 3.6) names its sm_90a cubins sm_90."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name),
                  os.path.join("/usr/local/cuda", "bin", name), shutil.which(name)]
    try:
        candidates.append(_tool(name))
    except ImportError:  # no Triton
        pass
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@functools.lru_cache(maxsize=4)
def cuda_listing(library: str) -> dict:
    """{(arch, mangled kernel name): {"sass", "registers", "stack_bytes", "shared_bytes" (static;
    the launch adds the dynamic part)}} for every kernel of every arch in `library` (a build of
    xjfast._C), from cuobjdump -res-usage and -sass."""
    tool = toolkit_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump: neither the CUDA toolkit's nor the one in Triton's wheel was found")
    usage = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True, check=True).stdout
    kernels, arch = {}, None
    for match in re.finditer(r"arch = (sm_\w+)|Function (\S+):\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        if match.group(1):
            arch = match.group(1)
        else:
            kernels[(arch, match.group(2))] = dict(registers=int(match.group(3)), stack_bytes=int(match.group(4)),
                                                   shared_bytes=int(match.group(5)))
    listing = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True).stdout
    lines, key = collections.defaultdict(list), None
    for line in listing.splitlines():
        if line.startswith("arch = "):  # a fatbin section's header
            arch, key = line.split()[2], None
        elif line.lstrip().startswith("Function : "):
            key = (arch, line.split()[2])
        elif key in kernels:
            lines[key].append(line)
    return {key: dict(k, sass="\n".join(lines[key]) + "\n") for key, k in kernels.items()}


# csrc's template arguments in xjfast's words (the FP8 storage type is an unsigned char)
_TYPE_WORDS = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "unsigned char": "e4m3",
               "xjfast::WgmmaCore": "wgmma", "xjfast::MmaSyncCore": "mma"}


def kernel_names(mangled: list[str]) -> dict:
    """{mangled: readable}, e.g. `temporal_attention_kernel<bf16, 128, wgmma>`: c++filt's demangling
    without namespaces or parameters, the types in xjfast's words; the mangled name where
    c++filt is missing."""
    tool = shutil.which("c++filt")
    if tool is None or not mangled:
        return {m: m for m in mangled}
    lines = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
    names = {}
    for m, full in zip(mangled, lines.splitlines()):
        match = re.fullmatch(r"void (?:[\w:]*::|\(anonymous namespace\)::)*(\w+(?:<.*>)?)\(.*\)", full.strip())
        name = match.group(1) if match else full.strip()
        names[m] = re.sub(r"[\w:]+(?: char)?", lambda t: _TYPE_WORDS.get(t.group(0), t.group(0)), name)
    return names


def trap_only(sass: str) -> bool:
    """Whether a kernel is nothing but a trap: csrc compiles a path out of an arch it cannot run on
    (the wgmma and warp-specialized attention outside sm_90a) and the host never launches it there."""
    ops = [op for op, _ in _instructions(sass)[0] if op != "NOP"]
    return "BPT.TRAP" in ops and len(ops) <= 3


def cuda_reports(library: str) -> tuple[list[dict], int]:
    """sass_report of every kernel of every arch in `library` (a build of xjfast._C), by readable
    name, with its static shared memory; and how many instantiations are only a trap (left out)."""
    listing = cuda_listing(library)
    names = kernel_names(sorted({name for _, name in listing}))
    reports, traps = [], 0
    for (arch, mangled), k in sorted(listing.items(), key=lambda item: (names[item[0][1]], arch_number(item[0][0]))):
        if trap_only(k["sass"]):
            traps += 1
            continue
        report = sass_report(k["sass"], k["registers"], k["stack_bytes"])
        report.update(kernel=names[mangled], arch=arch, backend="cuda", shared_bytes=k["shared_bytes"], mangled=mangled)
        reports.append(report)
    return reports, traps


def _row(r: dict) -> str:
    ops = ", ".join(f"{k} x{v}" for k, v in r["tensor_core"].items()) or "none"
    loop = r["inner_loop"]
    loop = f"{loop['instructions']} i {loop['exp2']} ex2" if loop else "-"
    return (f"{r['kernel']:46} {r['arch']:7} {r['registers']:>4} {r['stack_bytes']:>5} "
            f"{r['spill_stores']:>4}/{r['spill_loads']:<4} {r['loop_spills']:>7} {r['shared_bytes'] / 1024:>8.1f} "
            f"{loop:>15}  {ops}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xjfast.tools.sass", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 100], choices=sorted(SHARED_LIMIT),
                        help="the archs to compile the Triton kernels for (default: 90 100; also 89 and 120)")
    parser.add_argument("--backend", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"],
                        help="the Triton kernels (compiled here), the CUDA kernels of the installed xjfast._C (read "
                             "from it), or both (default)")
    parser.add_argument("--kernel", nargs="*", help="substrings of kernel names to report (default: all)")
    parser.add_argument("--json", help="also write the reports to this file")
    parser.add_argument("--candidates", action="store_true",
                        help="also the FP8 attention in every configuration the benchmark ranks")
    parser.add_argument("--variants", action="store_true",
                        help="also every other variant the launchers compile (hundreds: --kernel narrows them)")
    parser.add_argument("--ones", action="store_true",
                        help="the kernels with every integer argument 1, which the launcher compiles as the "
                             "constant 1 (except do_not_specialize), instead of the stream-shape values")
    args = parser.parse_args(argv)
    wanted = (lambda name: any(k in name for k in args.kernel)) if args.kernel else (lambda name: True)
    reports = []
    print(f"{'kernel':46} {'arch':7} {'regs':>4} {'stack':>5} {'STL/LDL':>9} {'in loop':>7} {'smem KiB':>8} {'loop':>15}  "
          "tensor-core ops")
    if "triton" in args.backend:
        for spec in stream_specs() + (candidate_specs() if args.candidates else []) + \
                (variant_specs() if args.variants else []):
            if args.ones:
                spec = dataclasses.replace(spec, name=f"{spec.name} ints=1",
                                           args={k: 1 if type(v) is int else v for k, v in spec.args.items()})
            if not wanted(spec.name):
                continue
            for arch in [a for a in args.arch if spec.configs is None or a in spec.configs]:
                reports.append(dict(compile_spec(spec, arch), backend="triton"))
                print(_row(reports[-1]), flush=True)
    if "cuda" in args.backend:
        try:
            import xjfast._C as C
        except ImportError as exc:
            print(f"no CUDA kernels to report: xjfast._C is not built ({exc})")
        else:
            found, traps = cuda_reports(C.__file__)
            found = [r for r in found if wanted(r["kernel"]) and arch_number(r["arch"]) in args.arch]
            for r in found:
                print(_row(r))
            reports += found
            print(f"CUDA kernels (xjfast._C): smem is the static part, the launch adds its tiles; {traps} "
                  "instantiations are only a trap on an arch they are not built for, and left out")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
