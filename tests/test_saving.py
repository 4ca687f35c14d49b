"""Every kind of model the package makes loads after nothing but `import keras_mgconv`.

The package's names load lazily, so the layers register with Keras through a
post-import hook on Keras. Loading runs in fresh processes, in both import
orders, and must give the predictions of the saved model.
"""

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_mgconv
from keras_mgconv import models
from keras_mgconv._keras import SAVED_CLASS_MODULES, USE_LEGACY_KERAS, keras


def _layer_model(layer, channels):
    return keras.Sequential([keras.Input((8, 8, channels)), layer])


def _saved_kinds():
    """name -> (model, input shape): every layer class and factory design the package saves."""
    small = {"classes": 3, "weights": None}
    return {
        "multigrid_conv": _layer_model(keras_mgconv.MultigridConv2D(16, 3, group_size=4), 16),
        "grouped_conv": _layer_model(keras_mgconv.GroupedConv2D(8, 3, groups=2), 8),
        "restriction": _layer_model(keras_mgconv.ChannelRestriction(4), 8),
        "prolongation": _layer_model(keras_mgconv.ChannelProlongation(4), 8),
        # ResNet8: the layers of every CIFAR ResNet (test_models), zero-padded shortcuts.
        "resnet8_layer": models.CIFARResNet(8, input_shape=(8, 8, 1), group_size=8, **small),
        "resnet8_block": models.CIFARResNet(
            8, input_shape=(8, 8, 1), group_size=8, multigrid="block", **small
        ),
        "mobilenet_v2": models.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, group_size=8, **small
        ),
        # Hard-swish, squeeze-and-excitation and preprocessing: layers of Keras' own.
        "mobilenet_v3": models.MobileNetV3Small(
            input_shape=(32, 32, 3), alpha=0.75, group_size=32, **small
        ),
    }


LOAD = textwrap.dedent("""
    import sys
    import numpy as np
    if sys.argv[1] == "keras first":
        import keras
    import keras_mgconv
    from keras_mgconv._keras import keras
    for path in sys.argv[2:]:
        model = keras.models.load_model(path + ".keras")
        inputs = np.load(path + ".inputs.npy")
        np.save(path + ".loaded.npy", np.asarray(model(inputs, training=False)))
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    rng = np.random.default_rng(0)
    paths = []
    for name, model in _saved_kinds().items():
        path = str(folder / name)
        inputs = rng.standard_normal((2, *model.input_shape[1:])).astype("float32")
        np.save(path + ".inputs.npy", inputs)
        np.save(path + ".expected.npy", np.asarray(model(inputs, training=False)))
        model.save(path + ".keras")
        paths.append(path)
    return paths


@pytest.mark.parametrize("order", ["keras_mgconv first", "keras first"])
def test_every_saved_kind_loads_in_a_fresh_process(saved, order):
    result = subprocess.run(
        [sys.executable, "-c", LOAD, order, *saved], capture_output=True, text=True, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in saved:
        # The same weights and graph on the same machine: the same arithmetic.
        np.testing.assert_array_equal(
            np.load(path + ".loaded.npy"), np.load(path + ".expected.npy"), err_msg=path
        )


def test_every_serializable_class_is_defined_where_the_hook_imports():
    """The hook imports `_keras.SAVED_CLASS_MODULES` only: every registered class lives there."""
    for module in pkgutil.walk_packages(keras_mgconv.__path__, "keras_mgconv."):
        if module.name.endswith(("optimization", "_quantization", "_pruning")) and (
            not USE_LEGACY_KERAS
        ):
            continue  # tensorflow-model-optimization switches the process to Keras 2.
        importlib.import_module(module.name)
    registered = {
        name: value
        for name, value in keras.saving.get_custom_objects().items()
        if name.startswith("keras_mgconv>")
    }
    assert "keras_mgconv>ChannelZeroPadding" in registered
    assert {
        name: value.__module__
        for name, value in registered.items()
        if not value.__module__.startswith(SAVED_CLASS_MODULES)
    } == {}
