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
            "not installed: `pip install \"keras-mgconv[optimization]\"`, or unset "
            "TF_USE_LEGACY_KERAS to use Keras 3. Received: TF_USE_LEGACY_KERAS="
            f"{os.environ['TF_USE_LEGACY_KERAS']!r}.") from error
else:
    import keras

# Every class the package can save is defined under keras_mgconv.layers:
# importing it registers them, so that saved models load wherever Keras is.
# Last, because the layers import `keras` from here.
importlib.import_module("keras_mgconv.layers")

__all__ = ["USE_LEGACY_KERAS", "keras"]
