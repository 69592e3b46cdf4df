"""Prompt embeddings read from a file (xjfast.models.load_prompt_embeds), as `xjfast generate
--prompt-embeds` reads them: what diffusers' WanPipeline.encode_prompt returns, saved by the user."""
import pytest
import torch
from safetensors.torch import save_file

from xjfast.models import load_prompt_embeds


@pytest.mark.parametrize("shape", [(7, 64), (1, 7, 64)])
def test_a_saved_tensor_reads_back_as_tokens_by_dim(tmp_path, shape):
    embeds = torch.randn(shape, dtype=torch.bfloat16)
    torch.save(embeds, tmp_path / "e.pt")
    got = load_prompt_embeds(tmp_path / "e.pt", text_dim=64)
    assert got.dtype == torch.float32 and torch.equal(got, embeds.reshape(7, 64).float())


def test_a_safetensors_file_gives_its_prompt_embeds_or_its_one_tensor(tmp_path):
    embeds = torch.randn(5, 32)
    save_file({"prompt_embeds": embeds, "negative_prompt_embeds": torch.randn(5, 32)}, tmp_path / "two.safetensors")
    save_file({"anything": embeds}, tmp_path / "one.safetensors")
    assert torch.equal(load_prompt_embeds(tmp_path / "two.safetensors"), embeds)
    assert torch.equal(load_prompt_embeds(str(tmp_path / "one.safetensors"), 32), embeds)


@pytest.mark.parametrize("contents, message", [
    ({"a": torch.randn(3, 8), "b": torch.randn(3, 8)}, r"holds 2 tensors \['a', 'b'\], none named 'prompt_embeds'"),
    ([1, 2], "holds a list, expected a tensor"),
    (torch.randint(0, 9, (3, 8)), r"holds a torch.int64 tensor of shape \(3, 8\), expected float embeddings"),
    (torch.randn(2, 3, 8), r"shape \(2, 3, 8\), expected float embeddings \[tokens, dim\] or \[1, tokens, dim\]"),
    (torch.randn(0, 8), r"shape \(0, 8\)"),
    (torch.randn(3, 16), r"holds embeddings of dim 16, expected the model's text_dim 8"),
    (torch.tensor([[1.0] * 8, [float("nan")] * 8]), "NaN or infinite values"),
])
def test_what_is_not_one_tensor_of_embeddings_is_refused_naming_the_file(tmp_path, contents, message):
    path = tmp_path / "bad.pt"
    torch.save(contents, path)
    with pytest.raises(ValueError, match=message) as error:
        load_prompt_embeds(path, text_dim=8)
    assert str(path) in str(error.value)


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompt embeddings file at"):
        load_prompt_embeds(tmp_path / "none.pt")
    (tmp_path / "text.pt").write_text("a paper boat")
    with pytest.raises(ValueError, match="is not a readable torch.save file"):
        load_prompt_embeds(tmp_path / "text.pt")
    (tmp_path / "text.safetensors").write_text("a paper boat")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_prompt_embeds(tmp_path / "text.safetensors")
