"""The `xjfast` command: `info` (what runs here and why not), `generate` (a video stream) and
`bench` (the benchmarks, bench/run.py's options)."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys


def _info(args) -> int:
    from xjfast.info import collect_info, format_info
    print(format_info(collect_info()))
    return 0


def device_option(value: str):
    """The --device of `generate` and `bench`: the CPU or a CUDA GPU torch can use; a ValueError
    names the option otherwise."""
    import torch
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"--device: expected a torch device (cpu, cuda, cuda:1), got {value!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: expected cuda:0 to cuda:{torch.cuda.device_count() - 1} (the GPUs torch sees), "
                         f"got {value!r}")
    return device


def _generate(args) -> int:
    import torch

    from xjfast.video import require_av
    try:  # before any model is built: fail in a second, not after the warm-up
        require_av()
    except ImportError as exc:
        print(f"xjfast generate: {exc}", file=sys.stderr)
        return 2
    from xjfast.errors import BackendUnavailable

    try:
        device = device_option(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as exc:
        print(f"xjfast generate: {exc}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # the tiny preset's ops are too small to split across threads, and the H.264 encoder runs
        # threads of its own: one torch thread is several times faster there than two
        torch.set_num_threads(args.threads or (1 if args.preset == "tiny" else threads))
    try:
        return _stream(args, device, dtype)
    except (ValueError, TypeError, FileNotFoundError, BackendUnavailable) as exc:
        # the library's checks name the argument: one line instead of a traceback
        print(f"xjfast generate: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        memory = _memory_run_out(exc)
        if memory is None:
            raise
        print(f"xjfast generate: out of {memory}; a smaller --window, --keep-tokens or --preset needs less",
              file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def _memory_run_out(exc: BaseException) -> str | None:
    """ "GPU memory (what torch said)" or "CPU memory (...)" when `exc` is an allocation that failed,
    else None. torch's CPU allocator raises a plain RuntimeError, its message the only sign."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return f"GPU memory ({str(exc).splitlines()[0]})"
    if isinstance(exc, MemoryError):
        return "CPU memory"
    match = re.search(r"DefaultCPUAllocator: can't allocate memory: (you tried to allocate \d+ bytes)", str(exc))
    return f"CPU memory ({match[1]})" if match else None


def _stream(args, device, dtype) -> int:
    import time

    import torch
    from tqdm import tqdm

    from xjfast.engine.generator import CacheConfig, StreamGenerator
    from xjfast.models.decoder import VIDEO_FRAMES_PER_LATENT
    from xjfast.models.presets import build
    from xjfast.video import Mp4Writer

    model, decoder, encoder, preset = build(args.preset, device=device, dtype=dtype, seed=args.weights_seed,
                                            weights=args.weights)
    generator = StreamGenerator(model, decoder, CacheConfig(args.sink, args.window, args.keep_tokens, args.storage),
                                steps=args.steps, frames_per_block=args.frames_per_block, seed=args.seed,
                                backend=args.backend, latent_hw=preset.latent_hw, precision=args.precision,
                                text_encoder=encoder, speculate=args.speculate, drafter=args.drafter,
                                accept_tol=args.accept_tol)
    schedule = args.schedule

    def conditioning(text):
        if args.embeds is not None:  # --prompt-embeds: `text` is the file's path
            return args.embeds[text].to(dtype)
        if encoder is not None:
            return text
        # the Wan preset takes text embeddings: a deterministic stand-in derived from the prompt
        g = torch.Generator().manual_seed(sum(text.encode()) + len(text))
        return torch.randn(preset.text_tokens, preset.dit.text_dim, generator=g).to(dtype)

    generator.set_prompt(conditioning(schedule[0][1]))
    # warm-up: first-call costs (imports, kernel selection and compilation, allocator growth) are
    # paid before the stream starts, so the figures below describe the stream, not process start;
    # every Triton kernel the stream launches is compiled first, so none compiles mid-stream
    started = time.perf_counter()
    compiled = generator.precompile()["compiled"]
    for _ in range(args.warmup):
        generator.step()
    generator.reset()
    generator.set_prompt(conditioning(schedule[0][1]))
    warmup_s = time.perf_counter() - started
    switches = list(schedule[1:])
    # whole passes: a pass emits a block of frames_per_block latent frames (4 video frames each)
    total = math.ceil(args.frames / (args.frames_per_block * VIDEO_FRAMES_PER_LATENT)) * \
        args.frames_per_block * VIDEO_FRAMES_PER_LATENT
    for frame, text in switches:
        if frame >= total:
            print(f"xjfast generate: the switch to {text!r} at frame {frame} is past the stream's {total} frames",
                  file=sys.stderr)
    latents = []  # with --save-latents: the clean latents of every pass, on the CPU
    with Mp4Writer(args.out, preset.fps) as writer, \
            tqdm(total=total, desc=f"xjfast {args.preset}", unit="frame", disable=args.quiet) as bar:
        while writer.frames < total:
            if switches and writer.frames >= switches[0][0]:
                generator.set_prompt(conditioning(switches.pop(0)[1]), transition_frames=args.transition,
                                     recache=args.recache)
            # a speculative pass stops at the next switch and at the stream's end (in latent frames)
            until = min([total] + [frame for frame, _ in switches[:1]])
            limit = max(1, math.ceil((until - writer.frames) / VIDEO_FRAMES_PER_LATENT))
            block = generator.step(max_frames=limit)
            video = block.video.numpy()[:total - writer.frames]
            writer.write(video)
            if args.save_latents:
                latents.append(block.latents.float().cpu())
            bar.update(len(video))
    s = generator.stats()
    print(f"wrote {args.out}: {writer.frames} frames at {preset.fps} fps "
          f"({s['latent_frames']} latent frames, {writer.size[1]}x{writer.size[0]}) on {device}")
    if args.save_latents:
        stream_latents = torch.cat(latents, dim=2)
        save_latents(args.save_latents, stream_latents)
        print(f"wrote {args.save_latents}: latents {list(stream_latents.shape)} [B, C, frames, h, w]")
    print(f"model {s['model_fps']:.3g} fps | end-to-end {s['end_to_end_fps']:.3g} fps (video frames, decode included)"
          f" | first frame {s['time_to_first_frame_ms']:.1f} ms")
    print(f"interval per latent frame (4 video frames) p50 {s['interval_p50_ms']:.1f} ms, p99 "
          f"{s['interval_p99_ms']:.1f} ms | KV cache {s['cache_bytes'] / 2 ** 20:.2f} MiB | warm-up "
          f"{warmup_s:.2f} s ({compiled} Triton kernels compiled, {args.warmup} blocks before the stream, not counted)")
    spec = s["speculation"]
    if args.speculate:
        rate = "-" if spec["acceptance_rate"] is None else f"{spec['acceptance_rate']:.0%}"
        print(f"speculation: depth {spec['depth']}, acceptance {rate}, "
              f"{spec['frames_per_pass']:.2f} latent frames per pass")
    if s["nonfinite_frames"]:
        print(f"xjfast generate: {s['nonfinite_frames']} latent frames came out NaN or inf, the first at latent frame "
              f"{s['first_nonfinite_frame']} (video frame {VIDEO_FRAMES_PER_LATENT * s['first_nonfinite_frame']}): "
              f"the video is broken from there", file=sys.stderr)
    if s["switch_frames"]:
        print(f"prompt switches: {len(schedule) - 1}, {s['switch_frames']} switching passes, latency p50 "
              f"{s['switch_latency_p50_ms']:.1f} ms, max {s['switch_latency_max_ms']:.1f} ms (separate from the above)"
              + (f"; recache {max(s['recache_ms']):.1f} ms at most" if s["recache_ms"] else ""))
    return 0


def prompt_schedule(prompts: list[str], option: str = "--prompt") -> list[tuple[int, str]]:
    """[(video frame, text)] from --prompt (or --prompt-embeds) values: the first starts the stream
    (a trailing "@0" allowed), each later "text@N" switches to `text` at video frame N, N
    increasing. A ValueError names the value that is not."""
    schedule = []
    for i, item in enumerate(prompts):
        text, _, frame = item.rpartition("@")
        if not re.fullmatch(r"[0-9]+", frame):
            text, frame = item, None
        if frame is None and i > 0:
            raise ValueError(f"{option} {item!r}: a later prompt needs a switch frame, as 'text@48'")
        if not text.strip():
            raise ValueError(f"{option} {item!r}: expected a non-empty prompt text")
        at = 0 if frame is None else int(frame)
        if (i == 0 and at != 0) or (i > 0 and at <= schedule[-1][0]):
            raise ValueError(f"{option} {item!r}: the first prompt starts at frame 0 and each switch comes after "
                             f"the one before (frames increasing)")
        schedule.append((at, text))
    return schedule


LATENTS_SUFFIXES = (".pt", ".safetensors")


def save_latents(path: str, latents) -> None:
    """The stream's clean latents [B, C, frames, h, w] (fp32) as a torch.save file, or a
    .safetensors file holding them as "latents": what a VAE decodes (Wan's, after un-normalizing)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({"latents": latents.contiguous()}, path)
    else:
        import torch
        torch.save(latents, path)


def _prompt_embeds(args, p: argparse.ArgumentParser) -> dict:
    """{path: [S, D] embeddings} of the --prompt-embeds schedule, read and checked against the
    preset's text_dim before any model is built; a transition blends embeddings of one shape."""
    from xjfast.models.presets import PRESETS
    from xjfast.models.prompt_embeds import load_prompt_embeds
    embeds = {}
    for _, path in args.schedule:
        try:
            embeds[path] = load_prompt_embeds(path, PRESETS[args.preset].dit.text_dim)
        except (OSError, ValueError) as exc:
            p.error(f"--prompt-embeds: {exc}")
    first = args.schedule[0][1]
    for path, tensor in embeds.items():
        if args.transition and tensor.shape != embeds[first].shape:
            p.error(f"--prompt-embeds: a transition blends embeddings of one shape: {path} is "
                    f"{tuple(tensor.shape)}, {first} {tuple(embeds[first].shape)} (pad them to the same tokens, "
                    f"or cut with --transition 0)")
    return embeds


def speculation_depth(value: str):
    """--speculate: a depth or "auto" (named for argparse's messages)."""
    return value if value == "auto" else int(value)


speculation_depth.__name__ = "depth or 'auto'"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xjfast", description="Real-time streaming video generation kernels and engine.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, compiled archs, usable backends and why not").set_defaults(run=_info)
    g = sub.add_parser("generate", help="generate a video stream and write it as MP4")
    g.add_argument("--preset", default="tiny", choices=("tiny", "wan2.1-1.3b"),
                   help="model shapes: tiny (runs on a CPU) or Wan2.1-1.3B's (480x832 video; a GPU)")
    g.add_argument("--prompt", action="append",
                   help="the prompt; repeat with 'text@N' to switch to text at video frame N "
                        "(default: 'a paper boat drifting down a rainy street')")
    g.add_argument("--prompt-embeds", action="append", metavar="PATH[@N]",
                   help="the prompt as embeddings instead of text: a torch.save or .safetensors file of one tensor "
                        "[tokens, text_dim] or [1, tokens, text_dim] (for wan2.1-1.3b, Wan2.1's UMT5 output); "
                        "repeat with 'PATH@N' to switch at video frame N")
    g.add_argument("--transition", type=int, default=8,
                   help="latent frames over which a prompt switch blends old into new (0: a cut)")
    g.add_argument("--recache", action="store_true", help="re-encode the cached frames under a new prompt")
    g.add_argument("--speculate", default=0, type=speculation_depth,
                   help="speculative drafting depth (frames per pass, 0: off, or 'auto')")
    g.add_argument("--drafter", default="extrapolate", help="hold | extrapolate | shallow:L")
    g.add_argument("--accept-tol", type=float, default=0.05, help="relative L2 within which a draft is accepted")
    g.add_argument("--frames", type=int, default=48,
                   help="video frames to write (4 per latent frame; rounded up to whole blocks)")
    g.add_argument("--out", default="stream.mp4", help="the H.264 MP4 to write (needs PyAV: pip install 'xjfast[video]')")
    g.add_argument("--save-latents", metavar="PATH",
                   help="also write the stream's latents [B, C, frames, h, w] (fp32) to PATH (.pt or .safetensors), "
                        "for a VAE to decode")
    g.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same stream")
    g.add_argument("--weights", help="a Wan2.1 or diffusers WanTransformer3DModel checkpoint (.safetensors file or "
                                    "folder), or a Self-Forcing/CausVid/LongLive training checkpoint (.pt), matching "
                                    "the preset's shape; default: the preset's random weights")
    g.add_argument("--weights-seed", type=int, default=0, help="seed of the preset's random weights")
    g.add_argument("--steps", type=int, default=1, help="denoising steps per frame (1 to 4)")
    g.add_argument("--frames-per-block", type=int, default=1, help="latent frames generated per model pass")
    g.add_argument("--sink", type=int, default=1, help="attention-sink frames kept for the whole stream")
    g.add_argument("--window", type=int, default=8, help="rolling window of recent frames in the KV cache")
    g.add_argument("--keep-tokens", type=int, default=0, help="highest-attention tokens kept from evicted frames")
    g.add_argument("--storage", default="fp8", choices=("fp8", "bf16", "fp32"), help="KV cache storage")
    g.add_argument("--precision", default="fp8", choices=("fp8", "bf16"), help="attention precision")
    g.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                   help="the ops' implementation (auto: the fastest this machine runs; `xjfast info` says which)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the tiny preset, torch's otherwise)")
    g.add_argument("--warmup", type=int, default=2, help="blocks generated and discarded before the stream is timed")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(run=_generate, subparser=g)
    # listed here for --help; main() hands its arguments to bench/run.py, which owns its options
    sub.add_parser("bench", help="benchmark the kernels and the stream here against the machine's roofline "
                                 "and the peers installed (xjfast bench --help)")
    return p


def _bench(argv: list[str]) -> int:
    from xjfast.bench.run import main as bench_main
    return bench_main(argv, prog="xjfast bench", default_out="xjfast-bench")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    if args.command == "generate":
        _check_generate(args, args.subparser)
    return args.run(args)


def _check_generate(args, p: argparse.ArgumentParser) -> None:
    """What `generate` can check before building a model (exit status 2, as argparse's own checks)."""
    if args.prompt and args.prompt_embeds:
        p.error("--prompt-embeds: expected prompts as text (--prompt) or as embeddings files, not both")
    args.prompt = args.prompt or ["a paper boat drifting down a rainy street"]
    try:
        args.schedule = prompt_schedule(args.prompt_embeds or args.prompt,
                                        "--prompt-embeds" if args.prompt_embeds else "--prompt")
    except ValueError as exc:
        p.error(str(exc))
    args.embeds = _prompt_embeds(args, p) if args.prompt_embeds else None
    from xjfast.engine.speculation import MAX_DEPTH, parse_drafter
    for name, value, low in (("--frames", args.frames, 1), ("--warmup", args.warmup, 0),
                             ("--transition", args.transition, 0), ("--weights-seed", args.weights_seed, 0),
                             ("--threads", 1 if args.threads is None else args.threads, 1), ("--seed", args.seed, 0),
                             ("--frames-per-block", args.frames_per_block, 1), ("--window", args.window, 1),
                             ("--sink", args.sink, 0), ("--keep-tokens", args.keep_tokens, 0)):
        if value < low:
            p.error(f"{name}: expected an int >= {low}, got {value}")
    if args.weights_seed >= 2 ** 64:  # a torch.Generator's seed
        p.error(f"--weights-seed: expected an int below 2^64, got {args.weights_seed}")
    if not 1 <= args.steps <= 4:
        p.error(f"--steps: expected 1 to 4 denoising steps, got {args.steps}")
    if args.speculate != "auto" and not 0 <= args.speculate <= MAX_DEPTH:
        p.error(f"--speculate: expected 'auto' or a depth in [0, {MAX_DEPTH}], got {args.speculate}")
    if not 0 <= args.accept_tol < math.inf:
        p.error(f"--accept-tol: expected a finite relative L2 tolerance >= 0, got {args.accept_tol}")
    try:
        parse_drafter(args.drafter)
    except ValueError as exc:
        p.error(f"--{exc}")
    if args.speculate not in (0, 1) and (args.steps != 1 or args.frames_per_block != 1 or args.backend == "cuda"):
        p.error("--speculate: drafting needs --steps 1, --frames-per-block 1 and a backend other than cuda "
                "(auto runs drafted passes on the Triton kernel)")
    if not args.out.lower().endswith(".mp4") or os.path.isdir(args.out):
        p.error(f"--out: expected the path of an .mp4 file (the stream is written as MP4), got {args.out!r}")
    if args.save_latents is not None and (not args.save_latents.endswith(LATENTS_SUFFIXES)
                                          or os.path.isdir(args.save_latents)):
        p.error(f"--save-latents: expected the path of a .pt or .safetensors file, got {args.save_latents!r}")
    for option, path in (("--out", args.out), ("--save-latents", args.save_latents)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            p.error(f"{option}: cannot create the folder {folder}: {exc.strerror}")


if __name__ == "__main__":
    sys.exit(main())
