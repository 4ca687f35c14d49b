"""The README's Python examples that use a model trained by `keras-mgconv train` run as shown."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_block(containing):
    with open(README) as file:
        blocks = re.findall(r"```python\n(.*?)```", file.read(), flags=re.DOTALL)
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"{len(matching)} README blocks contain {containing!r}"
    return matching[0]


def test_predicting_scikit_learns_digits_with_a_trained_model(digits_run, tmp_path,
                                                              monkeypatch):
    """The trained model takes 0-255 pixels; the README scales scikit-learn's 0-16 ones."""
    output_dir, _ = digits_run
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ResNet20-multigrid-digits").symlink_to(output_dir)
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(_python_block("load_digits"), {"__name__": "readme"})
    assert float(printed.getvalue()) > 0.9
