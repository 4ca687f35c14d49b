"""The `Example:` sections of the public docstrings run and print what they claim."""

import doctest

import numpy as np
import pytest

import keras_mgconv
from keras_mgconv import (
    _keras,
    batch_norm,
    complexity,
    data,
    export,
    optimization,
    schedules,
    training,
)
from keras_mgconv._keras import keras
from keras_mgconv.layers import channel_transfer, grouped_conv, multigrid_conv
from keras_mgconv.models import mobilenet_v2, multigrid_block, resnet

MODULES = [
    grouped_conv,
    channel_transfer,
    multigrid_conv,
    complexity,
    resnet,
    mobilenet_v2,
    multigrid_block,
    batch_norm,
    data,
    training,
    export,
    schedules,
]
# tfmot's helpers run only under tf_keras, where test_optimization.py runs this
# file's test of them in a subprocess; export converts through Keras 3's
# `Model.export`, and under tf_keras refuses (test_multigrid_block.py).
if _keras.USE_LEGACY_KERAS:
    MODULES.append(optimization)
    MODULES.remove(export)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module, tmp_path):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(
        module,
        globs={
            "np": np,
            "keras": keras,
            "keras_mgconv": keras_mgconv,
            "optimization": optimization,
            "count_multiply_adds": complexity.count_multiply_adds,
            "tmp_dir": str(tmp_path),
        },
    )
    examples = sum(len(test.examples) for test in tests)
    assert examples > 0
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
