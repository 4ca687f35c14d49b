"""Multigrid residual blocks start as the identity; the standard ones as keras.applications'."""

import numpy as np
import pytest

import keras_mgconv
from keras_mgconv._keras import keras


def _stream(model, block, images):
    """The residual stream after `block`, in training mode (batch statistics)."""
    probe = keras.Model(model.input, model.get_layer(f"{block}_out").output)
    return probe(images, training=True).numpy()


def _images(size, count=16):
    return np.random.default_rng(0).uniform(size=(count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("multigrid", ["layer", "block"])
def test_a_multigrid_block_without_connector_starts_as_the_identity(multigrid):
    # Every width multigrid (coarsest level 8), so every stage's blocks are.
    keras.utils.set_random_seed(0)
    model = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3), multigrid=multigrid, coarsest_channels=8
    )
    images = _images(8)
    for stage in (2, 3, 4):
        first, second = (_stream(model, f"conv{stage}_block{index}", images) for index in (1, 2))
        np.testing.assert_array_equal(second, first)


def test_the_standard_blocks_of_a_multigrid_network_keep_their_initialisation():
    keras.utils.set_random_seed(0)
    model = keras_mgconv.models.ResNet20(input_shape=(8, 8, 3))
    scales = {
        layer.name: float(np.min(layer.gamma.numpy()))
        for layer in model.layers
        if layer.name.endswith("_2_bn")
    }
    # The 16- and 32-channel stages stay Conv2D (coarsest_channels=32): scale 1.
    assert {name for name, scale in scales.items() if scale == 0} == {
        f"conv4_block{index}_2_bn" for index in (1, 2, 3)
    }
    assert all(scale == 1 for name, scale in scales.items() if not name.startswith("conv4"))


@pytest.mark.parametrize("zero_init_residual, within", [(None, True), (False, False)])
def test_a_deep_multigrid_stream_stays_within_1_5x_of_the_baselines(zero_init_residual, within):
    """ResNet56 at initialisation: the stream's std after the last block.

    The scale-1 start (False) grows it to about 3x the baseline's, the default
    keeps it below the baseline's.
    """
    images = _images(16, count=32)
    deviations = {}
    for multigrid in (False, True):
        keras.utils.set_random_seed(0)
        model = keras_mgconv.models.ResNet56(
            input_shape=(16, 16, 3), multigrid=multigrid, zero_init_residual=zero_init_residual
        )
        deviations[multigrid] = float(np.std(_stream(model, "conv4_block9", images)))
    assert (deviations[True] <= 1.5 * deviations[False]) == within, deviations


def test_zero_init_residual_true_zeroes_every_residual_branch_and_false_none():
    keras.utils.set_random_seed(0)
    everywhere = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3), multigrid=False, zero_init_residual=True
    )
    assert all(
        float(np.max(np.abs(layer.gamma.numpy()))) == 0
        for layer in everywhere.layers
        if layer.name.endswith("_2_bn")
    )
    nowhere = keras_mgconv.models.ResNet20(
        input_shape=(8, 8, 3), multigrid="block", coarsest_channels=8, zero_init_residual=False
    )
    assert all(
        float(np.min(layer.gamma.numpy())) == 1
        for layer in nowhere.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_a_bad_zero_init_residual_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"zero_init_residual='yes'"):
        keras_mgconv.models.ResNet20(zero_init_residual="yes")
