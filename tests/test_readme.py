"""Every Python block of the README and of the guides in docs/ runs as written.

Each block runs in a fresh Python process, in an empty directory, with nothing
but what the block itself imports: a block that leans on an import or a
variable of another block fails here as it would for a reader. Blocks that
load `runs/ResNet20-multigrid-digits/best.keras` get conftest's `digits_run`
model there, as `keras-mgconv train` would leave it.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [
    "README.md",
    *sorted(
        os.path.relpath(path, ROOT)
        for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    ),
]
TRAINED_MODEL = "runs/ResNet20-multigrid-digits/best.keras"
# Blocks that take minutes, with what runs the same steps instead.
NOT_RUN = {
    "model.fit(train, epochs=10)": "trains, fine-tunes and prunes for minutes under tf_keras; "
    "examples/quantization_aware_training.py and examples/pruning.py run these steps, "
    "tests/test_optimization.py checks them",
}


def _python_blocks(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as file:
        return re.findall(r"^```python\n(.*?)^```", file.read(), flags=re.DOTALL | re.MULTILINE)


BLOCKS = [
    (document, index, code)
    for document in DOCUMENTS
    for index, code in enumerate(_python_blocks(document))
]


# Runs blocks one after another in one process, each with nothing in its namespace
# but what it imports itself: the guides' blocks share TensorFlow's import (seconds
# a process) and the digits_run model.
_RUN_EACH = """
import json, sys, traceback
for name, code in json.load(sys.stdin):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        sys.exit(f"{name} failed:\\n{code}\\n{traceback.format_exc()}")
"""


def _run(blocks, directory, timeout=600):
    """Runs `[(name, code)]` in a fresh Python process in `directory`."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    environment.pop("TF_USE_LEGACY_KERAS", None)  # A block that wants tf_keras says so itself.
    result = subprocess.run(
        [sys.executable, "-c", _RUN_EACH],
        input=json.dumps(blocks),
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _with_trained_model(request, directory):
    output_dir, _ = request.getfixturevalue("digits_run")
    (directory / "runs").mkdir()
    (directory / "runs" / "ResNet20-multigrid-digits").symlink_to(output_dir)
    return output_dir


def _check_printed_test_accuracy(printed, output_dir):
    """A printed "test split: A" is the test accuracy train recorded in summary.json."""
    figures = re.findall(r"test split: ([0-9.]+)", printed)
    for figure in figures:
        with open(os.path.join(output_dir, "summary.json")) as file:
            recorded = json.load(file)["selected_test_accuracy"]
        assert abs(float(figure) - recorded) <= 1 / 355 + 1e-6, (figure, recorded)
    return len(figures)


def _name(document, index):
    return f"{document}, python block {index}"


def test_the_readme_has_a_quick_start():
    assert any(
        "export_tflite(" in code and ".fit(" in code
        for document, _, code in BLOCKS
        if document == "README.md"
    )


@pytest.mark.parametrize(
    "index, code",
    [(index, code) for document, index, code in BLOCKS if document == "README.md"],
    ids=lambda value: f"block{value}" if isinstance(value, int) else "",
)
def test_readme_block_runs_on_its_own(index, code, tmp_path, request):
    """Each README block in a fresh process of its own."""
    output_dir = _with_trained_model(request, tmp_path) if TRAINED_MODEL in code else None
    printed = _run([(_name("README.md", index), code)], tmp_path)
    _check_printed_test_accuracy(printed, output_dir)


def test_guide_blocks_run_on_their_own(tmp_path, request):
    """The guides' blocks, each in a fresh namespace; tf_keras ones in a process of their own."""
    blocks, legacy = [], []
    for document, index, code in BLOCKS:
        if document == "README.md" or any(marker in code for marker in NOT_RUN):
            continue
        (legacy if "TF_USE_LEGACY_KERAS" in code else blocks).append((_name(document, index), code))
    assert blocks and legacy
    output_dir = _with_trained_model(request, tmp_path)
    assert _check_printed_test_accuracy(_run(blocks, tmp_path), output_dir) == 1
    pytest.importorskip("tf_keras", reason="the [optimization] extra is not installed")
    for block in legacy:
        _run([block], tmp_path)


def test_quantize_follows_the_train_command_before_it():
    """The guide's QAT commands quantize the model the train command before them wrote."""
    with open(os.path.join(ROOT, "docs", "guides", "optimization.md"), encoding="utf-8") as file:
        text = file.read()
    train = re.search(r"keras-mgconv train (.*)--output-dir (\S+)", text)
    quantize = re.search(r"keras-mgconv quantize (\S+)", text)
    assert train and quantize, "the guide lost its train and quantize commands"
    assert quantize.group(1) == f"{train.group(2)}/best.keras"
