"""The one place where keras_mgconv chooses its Keras, and registers its layers with it.

Keras 3 normally; Keras 2 (`tf_keras`) when `TF_USE_LEGACY_KERAS=1`, the switch
TensorFlow itself reads and the only Keras tensorflow-model-optimization runs on.
Every other module does `from keras_mgconv._keras import keras` and uses the API
both versions share.
"""

import importlib
import os

from keras_mgconv import _environment

USE_LEGACY_KERAS = _environment.uses_legacy_keras()

if USE_LEGACY_KERAS:
    try:
        import tf_keras as keras
    except ImportError as error:
        raise ImportError(
            "TF_USE_LEGACY_KERAS=1 selects Keras 2, the `tf_keras` package, which is "
            'not installed: `pip install "keras-mgconv[optimization]"`, or unset '
            "TF_USE_LEGACY_KERAS to use Keras 3. Received: TF_USE_LEGACY_KERAS="
            f"{os.environ['TF_USE_LEGACY_KERAS']!r}."
        ) from error
else:
    import keras

# Every class the package can write into a saved model, registered here so
# that saved models load wherever Keras is: the layers (keras_mgconv.layers)
# the model the factories return (keras_mgconv.batch_norm) and the learning-rate
# schedule `train` saves with its optimizer (keras_mgconv.schedules). Last, because
# they import `keras` from here.
SAVED_CLASS_MODULES = ("keras_mgconv.layers", "keras_mgconv.batch_norm", "keras_mgconv.schedules")
for _module in SAVED_CLASS_MODULES:
    importlib.import_module(_module)

__all__ = ["SAVED_CLASS_MODULES", "USE_LEGACY_KERAS", "keras"]
