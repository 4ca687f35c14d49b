import contextlib
import io
import os

# Before TensorFlow is imported anywhere: keep test output readable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import filelock
import numpy as np
import pytest
import tensorflow as tf

from keras_mgconv import models
from keras_mgconv._keras import keras
from keras_mgconv.models import resnet


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, worker_id):
    """`keras-mgconv train --epochs 6`, run once: (its output_dir, what it printed).

    A multigrid ResNet20 at about 95% test accuracy on the embedded digits, for
    the tests that need a trained model. Once for all pytest-xdist workers
    (their common temporary root, under a file lock): each would train it again.
    """
    from keras_mgconv import cli

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    output_dir = str(shared / "digits_run")
    printed_path = shared / "digits_run.txt"
    with filelock.FileLock(str(shared / "digits_run.lock")):
        if not printed_path.exists():
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                assert cli.main(["train", "--epochs", "6", "--output-dir", output_dir]) == 0
            printed_path.write_text(printed.getvalue())
    return output_dir, printed_path.read_text()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Every test starts from the same seed and the float32 policy."""
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


def bottleneck_resnet(**kwargs):
    """ResNet50's blocks, 2 a stage instead of 3, 4, 6, 3."""
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return models.ResNet(
        resnet.bottleneck_block, stages, "imagenet", "projection", name="resnet50_2222", **kwargs
    )


# The factories of a family differ only in how often they repeat the same
# layers, and the slow tests (training, TFLite export) take seconds per layer:
# they run one member of each family, and test_models shows that every other
# factory is made of exactly its member's layers.
FAMILY_MEMBER = {
    models.ResNet32: models.ResNet20,
    models.ResNet44: models.ResNet20,
    models.ResNet56: models.ResNet20,
    models.ResNet110: models.ResNet20,
    models.ResNet34: models.ResNet18,
    models.ResNet50: bottleneck_resnet,
}


def layer_kinds(model):
    """The distinct (class, config but the name, input shapes) of a model's layers.

    What a layer computes, and the TFLite ops it converts to, depend on these
    alone.
    """

    def kind(layer):
        config = {key: value for key, value in layer.get_config().items() if key != "name"}
        # tf.nest: tf_keras has no keras.tree.
        shapes = tf.nest.map_structure(lambda tensor: tuple(tensor.shape), layer.input)
        return type(layer).__name__, repr(sorted(config.items())), repr(shapes)

    return {kind(layer) for layer in model.layers}
