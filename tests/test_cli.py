"""The `xjfast` command as a user runs it."""
import importlib.util
import subprocess
import sys

import pytest
import torch

from xjfast.cli import main

# generating writes MP4 through PyAV (pip install xjfast[video]); parsing and `info` need none
needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="MP4 writing needs PyAV")


@needs_av
def test_generate_writes_a_playable_mp4(tmp_path, capsys):
    out = tmp_path / "stream.mp4"
    assert main(["generate", "--frames", "10", "--out", str(out), "--seed", "2", "--window", "2", "--quiet"]) == 0
    from xjfast.video import probe
    info = probe(out)
    assert info == {"frames": 12, "width": 128, "height": 128, "codec": "h264"}  # rounded up to whole blocks
    printed = capsys.readouterr().out
    assert "model" in printed and "end-to-end" in printed and "first frame" in printed


@needs_av
def test_generate_says_when_the_frames_came_out_nan(tmp_path, capsys, monkeypatch):
    """Weights that overflow make NaN frames: the video is still written, and stderr says from which
    frame it is broken."""
    from xjfast.models import presets
    build = presets.build

    def nan_model(*args, **kwargs):
        model, *rest = build(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        return (model, *rest)

    monkeypatch.setattr(presets, "build", nan_model)
    assert main(["generate", "--frames", "8", "--out", str(tmp_path / "x.mp4"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("xjfast generate: 2 latent frames came out NaN or inf, the first at latent frame 0 (video frame 0): "
            "the video is broken from there") in err


@needs_av
def test_generate_blocks_of_three_frames(tmp_path):
    out = tmp_path / "b.mp4"
    assert main(["generate", "--frames", "12", "--frames-per-block", "3", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    from xjfast.video import probe
    assert probe(out)["frames"] == 12


@needs_av
def test_generate_leaves_torch_threads_as_they_were(tmp_path):
    import torch
    before = torch.get_num_threads()
    assert main(["generate", "--frames", "4", "--warmup", "0", "--out", str(tmp_path / "t.mp4"), "--quiet"]) == 0
    assert torch.get_num_threads() == before


def test_generate_without_pyav_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` sees where PyAV is not installed
    assert main(["generate", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "pip install 'xjfast[video]'" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_info_runs_as_a_command():
    result = subprocess.run([sys.executable, "-m", "xjfast", "info"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "backend reference: usable" in result.stdout and "GPU" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames: expected an int >= 1, got 0"),
    (["--warmup", "-1"], "--warmup: expected an int >= 0, got -1"),
    (["--weights-seed", "-1"], "--weights-seed: expected an int >= 0, got -1"),
    (["--weights-seed", str(2 ** 64)], f"--weights-seed: expected an int below 2^64, got {2 ** 64}"),
    (["--out", "stream"], "--out: expected the path of an .mp4 file"),
    (["--prompt", "a", "--prompt", "b"], "--prompt 'b': a later prompt needs a switch frame"),
    (["--speculate", "foo"], "invalid depth or 'auto' value: 'foo'"),
    (["--speculate", "9"], "--speculate: expected 'auto' or a depth in [0, 4], got 9"),
    (["--seed", "-1"], "--seed: expected an int >= 0, got -1"),
    (["--steps", "9"], "--steps: expected 1 to 4 denoising steps, got 9"),
    (["--window", "0"], "--window: expected an int >= 1, got 0"),
    (["--keep-tokens", "-5"], "--keep-tokens: expected an int >= 0, got -5"),
    (["--accept-tol", "nan"], "--accept-tol: expected a finite relative L2 tolerance >= 0, got nan"),
    (["--drafter", "psychic"], "--drafter: expected 'hold', 'extrapolate', 'shallow:L'"),
    (["--speculate", "2", "--steps", "2"], "--speculate: drafting needs --steps 1"),
    (["--speculate", "2", "--backend", "cuda"], "--speculate: drafting needs --steps 1"),
])
def test_bad_arguments_exit_before_any_model_is_built(capsys, monkeypatch, tmp_path, args, message):
    """argparse's exit status 2 and the generate command's usage, naming the option; no model built."""
    from xjfast.models import presets

    def build(*_, **__):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(presets, "build", build)
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "x.mp4")]
    with pytest.raises(SystemExit) as exit_:
        main(["generate"] + args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "usage: xjfast generate" in err


@needs_av
@pytest.mark.parametrize("error, memory", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 51.00 GiB.\nmore detail"),
     "GPU memory (CUDA out of memory. Tried to allocate 51.00 GiB.)"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "CPU memory (you tried to allocate 40000000000 bytes)"),
    (MemoryError(), "CPU memory"),
])
def test_running_out_of_memory_is_one_line_with_what_to_shrink(tmp_path, capsys, monkeypatch, error, memory):
    from xjfast import cli

    def stream(*_):
        raise error

    monkeypatch.setattr(cli, "_stream", stream)
    assert main(["generate", "--out", str(tmp_path / "x.mp4")]) == 1
    err = capsys.readouterr().err
    assert err == f"xjfast generate: out of {memory}; a smaller --window, --keep-tokens or --preset needs less\n"


@needs_av
def test_a_runtime_error_that_is_no_allocation_keeps_its_traceback(tmp_path, monkeypatch):
    from xjfast import cli

    def stream(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_stream", stream)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "--out", str(tmp_path / "x.mp4")])


def test_an_out_path_that_is_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(SystemExit):
        main(["generate", "--out", str(tmp_path / "clip.mp4")])
    assert "--out: expected the path of an .mp4 file" in capsys.readouterr().err


@needs_av
@pytest.mark.parametrize("args, message", [
    (["--weights", "/nonexistent/model.safetensors"], "path_or_state_dict: /nonexistent/model.safetensors does not exist"),
])
def test_invalid_settings_exit_with_the_library_message(tmp_path, capsys, args, message):
    assert main(["generate", "--frames", "4", "--quiet", "--out", str(tmp_path / "x.mp4")] + args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"xjfast generate: {message}" and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


@needs_av
@pytest.mark.parametrize("args, message", [
    (["--device", "xpu9"], "--device: expected a torch device (cpu, cuda, cuda:1), got 'xpu9'"),
    (["--device", "meta"], "--device: expected cpu or cuda[:N], got 'meta'"),
    pytest.param(["--device", "cuda"], "--device: no CUDA GPU is usable here (torch.cuda.is_available() is False)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is usable here")),
])
def test_unusable_device_exits_with_a_message(tmp_path, capsys, args, message):
    assert main(["generate", "--frames", "4", "--quiet", "--out", str(tmp_path / "x.mp4")] + args) == 2
    assert capsys.readouterr().err.strip() == f"xjfast generate: {message}"


def test_a_gpu_index_torch_does_not_see_is_refused(monkeypatch):
    from xjfast.cli import device_option
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_option("cuda:1") == torch.device("cuda:1") and device_option("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"--device: expected cuda:0 to cuda:1 \(the GPUs torch sees\), got 'cuda:2'"):
        device_option("cuda:2")


def test_zero_threads_is_refused():
    with pytest.raises(SystemExit):
        main(["generate", "--threads", "0"])


@needs_av
def test_generate_with_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from xjfast.models import build
    model, *_ = build("tiny", seed=11)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "tiny.safetensors")
    out = tmp_path / "w.mp4"
    assert main(["generate", "--weights", str(tmp_path / "tiny.safetensors"), "--frames", "4", "--out", str(out),
                 "--quiet"]) == 0
    from xjfast.video import probe
    assert probe(out)["frames"] == 4


@needs_av
def test_prompt_schedule_and_speculation(tmp_path, capsys):
    out = tmp_path / "s.mp4"
    assert main(["generate", "--prompt", "a forest", "--prompt", "a city@16", "--transition", "2", "--recache",
                 "--speculate", "3", "--drafter", "hold", "--accept-tol", "10", "--frames", "40", "--out", str(out),
                 "--quiet", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "prompt switches: 1, 2 switching passes" in printed and "speculation: depth 3" in printed
    assert "recache" in printed and f"wrote {out}: 40 frames" in printed
    from xjfast.video import probe
    assert probe(out)["frames"] == 40


def test_prompt_schedule_parsing():
    from xjfast.cli import prompt_schedule
    assert prompt_schedule(["a", "b@48", "c@96"]) == [(0, "a"), (48, "b"), (96, "c")]
    assert prompt_schedule(["e-mail me@home"]) == [(0, "e-mail me@home")]
    assert prompt_schedule(["a@0", "b@4"]) == [(0, "a"), (4, "b")]
    with pytest.raises(ValueError, match="a later prompt needs a switch frame"):
        prompt_schedule(["a", "b"])
    with pytest.raises(ValueError, match="a later prompt needs a switch frame"):
        prompt_schedule(["a", "b@\u00b2"])  # a superscript two is no frame number
    with pytest.raises(ValueError, match="expected a non-empty prompt text"):
        prompt_schedule(["a", "@48"])
    for switches in (["b@48", "c@48"], ["b@0"], ["b@48", "c@16"]):
        with pytest.raises(ValueError, match="each switch comes after the one before"):
            prompt_schedule(["a"] + switches)


@needs_av
def test_a_switch_is_applied_at_its_frame_under_speculation(tmp_path, capsys, monkeypatch):
    """A speculative pass stops at a switch: the prompt changes at the frame asked for."""
    from xjfast.engine import StreamGenerator
    switched_at = []
    set_prompt = StreamGenerator.set_prompt

    def spy(self, prompt, transition_frames=0, recache=False):
        switched_at.append(self._next_frame)
        return set_prompt(self, prompt, transition_frames, recache)

    monkeypatch.setattr(StreamGenerator, "set_prompt", spy)
    assert main(["generate", "--prompt", "a", "--prompt", "b@24", "--speculate", "4", "--drafter", "hold",
                 "--accept-tol", "10", "--frames", "40", "--out", str(tmp_path / "s.mp4"), "--quiet",
                 "--warmup", "0"]) == 0
    assert switched_at == [0, 0, 6]  # before and after the warm-up; then latent frame 6 = video frame 24


def test_a_negative_transition_is_refused_before_the_stream(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--transition", "-1", "--out", str(tmp_path / "x.mp4")])
    assert "--transition: expected an int >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


@needs_av
def test_generate_conditions_on_prompt_embeddings_files(tmp_path, monkeypatch):
    """--prompt-embeds: the stream is conditioned on the files' embeddings (a torch.save tensor
    with its batch of one, a safetensors file's "prompt_embeds"), switching at the frame asked."""
    from safetensors.torch import save_file

    from xjfast.engine import StreamGenerator
    first, second = torch.randn(1, 16, 64), torch.randn(16, 64)
    torch.save(first, tmp_path / "first.pt")
    save_file({"prompt_embeds": second, "negative_prompt_embeds": -second}, tmp_path / "second.safetensors")
    seen = []
    set_prompt = StreamGenerator.set_prompt

    def spy(self, prompt, transition_frames=0, recache=False):
        seen.append((self._next_frame, prompt))
        return set_prompt(self, prompt, transition_frames, recache)

    monkeypatch.setattr(StreamGenerator, "set_prompt", spy)
    assert main(["generate", "--prompt-embeds", str(tmp_path / "first.pt"), "--prompt-embeds",
                 f"{tmp_path / 'second.safetensors'}@8", "--frames", "16", "--out", str(tmp_path / "e.mp4"),
                 "--quiet", "--warmup", "0"]) == 0
    assert [frame for frame, _ in seen] == [0, 0, 2]  # before and after the warm-up; latent frame 2 = video 8
    assert torch.equal(seen[0][1], first[0]) and torch.equal(seen[1][1], first[0]) and torch.equal(seen[2][1], second)


def test_prompt_embeddings_files_are_checked_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    from xjfast.models import presets

    def build(*_, **__):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(presets, "build", build)
    for name, shape in (("a.pt", (16, 64)), ("b.pt", (8, 64)), ("narrow.pt", (16, 32))):
        torch.save(torch.randn(shape), tmp_path / name)
    a, b, narrow, missing = (str(tmp_path / name) for name in ("a.pt", "b.pt", "narrow.pt", "missing.pt"))
    for args, message in (
            (["--prompt", "a boat", "--prompt-embeds", a], "--prompt-embeds: expected prompts as text (--prompt) or "
                                                           "as embeddings files, not both"),
            (["--prompt-embeds", a, "--prompt-embeds", b], f"--prompt-embeds {b!r}: a later prompt needs a switch"),
            (["--prompt-embeds", missing], f"--prompt-embeds: path: no prompt embeddings file at {missing}"),
            (["--prompt-embeds", narrow], "holds embeddings of dim 32, expected the model's text_dim 64"),
            (["--prompt-embeds", a, "--prompt-embeds", f"{b}@8"],
             f"--prompt-embeds: a transition blends embeddings of one shape: {b} is (8, 64), {a} (16, 64)")):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "--out", str(tmp_path / "x.mp4")] + args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "usage: xjfast generate" in err, (args, err)
    # embeddings of different lengths pass when the switch cuts (the model is built next)
    with pytest.raises(AssertionError, match="a model was built"):
        main(["generate", "--out", str(tmp_path / "x.mp4"), "--prompt-embeds", a, "--prompt-embeds", f"{b}@8",
              "--transition", "0"])


@needs_av
@pytest.mark.parametrize("name", ["stream.pt", "stream.safetensors"])
def test_generate_saves_the_latents_it_decoded(tmp_path, capsys, monkeypatch, name):
    """--save-latents: the clean latents of every pass of the stream, in order, as the generator
    returned them ([B, C, frames, h, w], what a VAE decodes: diffusers' AutoencoderKLWan takes them)."""
    from xjfast.engine import StreamGenerator
    returned = []
    step = StreamGenerator.step

    def spy(self, *args, **kwargs):
        frame = step(self, *args, **kwargs)
        returned.append(frame.latents.clone())
        return frame

    monkeypatch.setattr(StreamGenerator, "step", spy)
    path = tmp_path / "latents" / name  # its folder made as --out's is
    assert main(["generate", "--frames", "12", "--out", str(tmp_path / "s.mp4"), "--save-latents", str(path),
                 "--quiet", "--warmup", "0", "--speculate", "2", "--drafter", "hold", "--accept-tol", "10"]) == 0
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file
        latents = load_file(path)["latents"]
    else:
        latents = torch.load(path, weights_only=True)
    assert latents.shape == (1, 4, 3, 16, 16) and latents.dtype == torch.float32
    assert torch.equal(latents, torch.cat(returned, dim=2).float())
    assert f"wrote {path}: latents [1, 4, 3, 16, 16]" in capsys.readouterr().out
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    with torch.no_grad():
        video = vae.decode(latents).sample
    assert video.shape == (1, 3, 9, 128, 128)  # Wan's VAE: 1 + 4 (frames - 1) video frames, 8x the latent's size


@pytest.mark.parametrize("value", ["latents.npy", "."])
def test_a_latents_path_that_is_no_pt_or_safetensors_file_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        main(["generate", "--save-latents", value, "--out", str(tmp_path / "x.mp4")])
    assert f"--save-latents: expected the path of a .pt or .safetensors file, got {value!r}" in capsys.readouterr().err
