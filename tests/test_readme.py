"""The README's Python examples run as written (on the CPU: the reference ops), so the API tour
stays true; the drop-in one-liners, which need the user's own pipeline, and the examples that
download Wan's text encoder or VAE, at least compile."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# names the README leaves to the user's code, and downloads from the Hugging Face hub
USERS_OWN = ("pipeline", "pipe.", 'from_pretrained("Wan-AI/')


def python_blocks() -> list:
    with open(README) as f:
        text = f.read()
    return [pytest.param(m.group(1), id=f"line-{text[:m.start()].count(chr(10)) + 1}")
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_the_readme_has_its_examples():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("code", python_blocks())
def test_readme_example_runs(code):
    compiled = compile(code, README, "exec")
    if any(name in code for name in USERS_OWN):
        return  # compiled above
    exec(compiled, {"__name__": "readme_example"})
