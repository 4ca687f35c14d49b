"""A baseline factory against keras.applications' model: their weights in ours, the same outputs.

The strongest check that a baseline is keras.applications' network: every
weighted layer of theirs has a layer of the same name in ours, with weights of
the same shapes; copied, both models compute bitwise the same outputs, in
inference mode and in training mode (batch statistics, and Dropout's masks,
whose random state is copied too).
"""

import numpy as np

from keras_mgconv._keras import keras


def _seeded_layers(model):
    """The layers that draw random numbers (Dropout), in the model's order."""
    return [layer for layer in model.layers if getattr(layer, "seed_generator", None)]


def copy_weights(source, target):
    """Copies `source`'s weights into `target`, layer by layer, by name.

    Raises:
        AssertionError: if the two models' weighted layers differ in name,
            class or weight shapes.
    """
    theirs = {layer.name: layer for layer in source.layers if layer.weights}
    ours = {layer.name: layer for layer in target.layers if layer.weights}
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    for name, layer in theirs.items():
        assert type(ours[name]).__name__ == type(layer).__name__, name
        weights = layer.get_weights()
        assert [w.shape for w in ours[name].get_weights()] == [w.shape for w in weights], name
        ours[name].set_weights(weights)
    seeded_theirs, seeded_ours = _seeded_layers(source), _seeded_layers(target)
    assert len(seeded_ours) == len(seeded_theirs)
    for mine, other in zip(seeded_ours, seeded_theirs):
        mine.seed_generator.state.assign(other.seed_generator.state)


def assert_same_function(ours, theirs, inputs):
    """Copies `theirs`' weights into `ours` and checks both give bitwise the same outputs."""
    copy_weights(theirs, ours)
    for training in (False, True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ours(inputs, training=training)),
            keras.ops.convert_to_numpy(theirs(inputs, training=training)),
            err_msg=f"training={training}",
        )
