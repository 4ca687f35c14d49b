"""The learning-rate warm-up `train` uses: its rates, its config, its errors."""

import numpy as np
import pytest

from keras_mgconv import training
from keras_mgconv._keras import keras
from keras_mgconv.schedules import LinearWarmup


def rates(schedule, steps):
    return np.array([float(schedule(step)) for step in range(steps)])


def test_rises_linearly_then_runs_the_whole_schedule_after_it():
    cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=6)
    warmed = LinearWarmup(cosine, warmup_steps=4)
    np.testing.assert_allclose(rates(warmed, 4), [0.025, 0.05, 0.075, 0.1], rtol=1e-6)
    np.testing.assert_allclose(rates(warmed, 11)[4:], rates(cosine, 7), rtol=1e-6)
    np.testing.assert_allclose(rates(LinearWarmup(0.2, 2), 4), [0.1, 0.2, 0.2, 0.2])


def test_saved_with_the_optimizer_it_computes_the_same_rates(tmp_path):
    schedule = LinearWarmup(
        keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.1, 0.01]), warmup_steps=2
    )
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(keras.optimizers.SGD(schedule), "mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras").optimizer._learning_rate
    assert isinstance(loaded, LinearWarmup)
    np.testing.assert_array_equal(rates(loaded, 8), rates(schedule, 8))


@pytest.mark.parametrize(
    "arguments,message",
    [
        ((0.1, 0), "warmup_steps=0"),
        ((0.1, 2.5), "warmup_steps=2.5"),
        ((-0.1, 2), "after=-0.1"),
        (("0.1", 2), "after='0.1'"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        LinearWarmup(*arguments)


def test_train_warms_up_for_two_epochs_or_a_fifth_of_the_run():
    # Without a warm-up, SGD's 0.1 left the block design at chance (18.9%).
    config = dict(
        model="ResNet20",
        dataset="digits",
        batch_size=64,
        learning_rate=0.1,
        schedule="cosine",
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        multigrid="block",
        group_size=None,
        width=1.0,
        image_size=None,
        batch_norm_momentum=None,
        validation_fraction=0.1,
        seed=0,
    )
    assert training._config(epochs=15, warmup_epochs=None, **config)["warmup_epochs"] == 2
    assert training._config(epochs=6, warmup_epochs=None, **config)["warmup_epochs"] == 1
    assert training._config(epochs=6, warmup_epochs=0, **config)["warmup_epochs"] == 0
    with pytest.raises(ValueError, match="warmup_epochs=6"):
        training._config(epochs=6, warmup_epochs=6, **config)


def test_a_run_at_chance_is_told_apart():
    assert not training.learned_anything(0.19, 10)  # The block design that never learned.
    assert training.learned_anything(0.30, 10)
    assert not training.learned_anything(0.55, 2)
    assert training.learned_anything(0.70, 2)
