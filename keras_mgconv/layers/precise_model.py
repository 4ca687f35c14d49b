"""A functional model whose `fit` leaves BatchNormalization statistics of its final weights.

Keras' BatchNormalization evaluates with exponential moving averages of the
batch statistics seen in training. They describe the weights of the last
1 / (1 - momentum) steps, not the final ones, and start from mean 0 and
variance 1: after a short run (Keras' default momentum 0.99 averages over
about 100 steps) or one whose weights still move at its end (Adam or any
constant learning rate), `evaluate` and `predict` compute another function
than the one trained, and the error compounds through the layers. Measured on
the embedded digits at 32x32 (ResNet20, 1000 training images, Adam 1e-3, batch
64, 6 epochs of plain `fit`, Keras' default momentum 0.99): 9.9% test accuracy
after `fit`, 99.4% with the statistics recomputed for the final weights.

Every keras_mgconv model factory returns a `PreciseBatchNormModel`, which
recomputes the statistics (`keras_mgconv.batch_norm`) inside `fit`, so that
`fit` then `evaluate` needs nothing more.
"""

import collections.abc
import inspect
import math
import sys
import warnings

import numpy as np

from keras_mgconv._keras import keras


class _RecomputeInFit(keras.callbacks.Callback):
    """Recomputes before every validation of `fit` and once at its end.

    `keras_mgconv.batch_norm.PreciseBatchNormalization` recomputes; it is
    imported here, not with this module, because `batch_norm` imports the
    layers, this module among them.
    """

    def __init__(self, data, steps):
        super().__init__()
        from keras_mgconv.batch_norm import PreciseBatchNormalization

        self._precise = PreciseBatchNormalization(data, steps)

    def set_model(self, model):
        super().set_model(model)
        self._precise.set_model(model)

    def on_train_begin(self, logs=None):
        self._precise.on_train_begin(logs)
        self._recomputed_at = None

    def on_test_begin(self, logs=None):
        self._recompute()

    def on_train_end(self, logs=None):
        # Unless the last validation already recomputed for these weights.
        if self._iterations() != self._recomputed_at:
            self._recompute()

    def _recompute(self):
        # Without validation data, the callback's epoch end only recomputes.
        self._precise.on_epoch_end(None)
        self._recomputed_at = self._iterations()

    def _iterations(self):
        return int(self.model.optimizer.iterations.numpy())


class _Batches(keras.utils.Sequence):  # PyDataset in Keras 3.
    """`inputs` (arrays, or lists or dicts of them) in batches of `batch_size`."""

    def __init__(self, inputs, batch_size):
        super().__init__()
        self.inputs = inputs
        self.batch_size = batch_size

    def __len__(self):
        return math.ceil(_length(self.inputs) / self.batch_size)

    def __getitem__(self, index):
        return _take(self.inputs, slice(index * self.batch_size, (index + 1) * self.batch_size))


def _length(inputs):
    if isinstance(inputs, dict):
        return _length(next(iter(inputs.values())))
    if isinstance(inputs, (list, tuple)):
        return _length(inputs[0])
    return len(inputs)


def _take(inputs, indices):
    if isinstance(inputs, dict):
        return {key: _take(value, indices) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_take(value, indices) for value in inputs)
    return np.asarray(inputs)[indices]


@keras.saving.register_keras_serializable(package="keras_mgconv")
class PreciseBatchNormModel(keras.Model):
    """A functional `keras.Model` whose `fit` recomputes the BatchNormalization statistics.

    Built and used as any functional model: `PreciseBatchNormModel(inputs,
    outputs)`. Its `fit` is Keras' `fit`, and then sets every BatchNormalization's
    `moving_mean` and `moving_variance` to the average batch statistics of the
    final weights on training data ("precise BN",
    `keras_mgconv.batch_norm.recompute_batch_norm_statistics`), so that
    `evaluate`, `predict` and a saved model after `fit` compute the function
    that was trained, whatever the momentum, the optimizer or the run's length.
    It does so also before every validation inside `fit` (`validation_data` or
    `validation_split`), so that `val_*` metrics, and the callbacks that read
    them (EarlyStopping, ModelCheckpoint), judge the weights of that epoch; the
    training continues from the recomputed statistics. (A checkpoint written
    at an epoch without validation keeps the moving averages.)

    The statistics come from up to `batch_norm_statistics_batches` batches
    (default 50, each of `fit`'s batch size) of the data being fitted:

    - arrays or tensors: a fixed random sample of the training part (without
      the `validation_split` part), batched with `batch_size`;
    - a `tf.data.Dataset` or a `keras.utils.PyDataset`: its first batches, as
      `fit` sees them (augmented where it augments);
    - a Python generator or iterator, which `fit` consumes: nothing is
      recomputed, and `fit` warns; call `recompute_batch_norm_statistics`
      with training data before evaluating.

    Each recomputation costs a forward pass over those batches (about a third
    of a training step each), on every Keras backend. Set
    `model.batch_norm_statistics_batches = 0` to keep Keras' moving averages
    instead. A `fit` given a
    `keras_mgconv.batch_norm.PreciseBatchNormalization` callback leaves the
    statistics to it.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    >>> from keras_mgconv.layers.precise_model import PreciseBatchNormModel
    >>> model = PreciseBatchNormModel(inputs, keras.layers.Dense(1)(x))
    >>> model.compile("adam", "mse")
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (64, 4)).astype("float32")
    >>> _ = model.fit(x, x[:, :1], batch_size=64, epochs=1, verbose=0)
    >>> normalised = model.layers[1](x)  # The Dense layer's output on all of x.
    >>> moving_mean = model.layers[2].moving_mean.numpy()
    >>> bool(np.allclose(moving_mean, normalised.numpy().mean(axis=0), atol=1e-5))
    True
    """

    batch_norm_statistics_batches = 50

    def fit(self, *args, **kwargs):
        arguments = inspect.signature(super().fit).bind(*args, **kwargs).arguments
        batches = self.batch_norm_statistics_batches
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(
                "`batch_norm_statistics_batches` must be an int >= 0 (0: keep the "
                f"moving averages). Received: batch_norm_statistics_batches={batches!r}.")
        callbacks = list(arguments.get("callbacks") or [])
        # Not imported yet: no such callback can exist.
        batch_norm = sys.modules.get("keras_mgconv.batch_norm")
        if not batches or (batch_norm is not None and any(
                isinstance(c, batch_norm.PreciseBatchNormalization) for c in callbacks)):
            return super().fit(**arguments)
        data = _statistics_data(arguments, batches)
        if data is None:
            warnings.warn(
                "PreciseBatchNormModel.fit cannot recompute the BatchNormalization "
                "statistics from a generator or iterator, which fit consumes: the "
                "moving averages stay, and evaluation may score far below training. "
                "Pass a tf.data.Dataset, a PyDataset or arrays, or call "
                "keras_mgconv.batch_norm.recompute_batch_norm_statistics(model, "
                "training_data) before evaluating.", stacklevel=2)
        else:
            arguments["callbacks"] = callbacks + [_RecomputeInFit(*data)]
        return super().fit(**arguments)


def _statistics_data(arguments, batches):
    """(data, steps) for the recomputation, or None when `x` cannot be read again."""
    x = arguments.get("x")
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(x, tf.data.Dataset):
        steps = arguments.get("steps_per_epoch")
        cardinality = int(x.cardinality())
        if cardinality > 0:
            steps = cardinality if steps is None else min(steps, cardinality)
        return x, batches if steps is None else min(steps, batches)
    if isinstance(x, keras.utils.Sequence):
        return x, min(len(x), batches)
    if isinstance(x, collections.abc.Iterator):
        return None
    batch_size = arguments.get("batch_size") or 32
    # Keras' validation_split takes the last samples.
    training = math.floor(_length(x) * (1 - (arguments.get("validation_split") or 0.0)))
    # A fixed random sample: the data may be ordered (by class, say), and fit
    # shuffles by default, so that each batch mixes the whole training set.
    sample = np.random.default_rng(0).permutation(training)[:batches * batch_size]
    return _Batches(_take(x, sample), batch_size), None
