"""The one place where keras_mgconv chooses its Keras.

Keras 3 normally; Keras 2 (`tf_keras`) when `TF_USE_LEGACY_KERAS=1`, the switch
TensorFlow itself reads and the only Keras tensorflow-model-optimization runs on.
Every other module does `from keras_mgconv._keras import keras` and uses the API
both versions share.
"""

import os

USE_LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true")

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

__all__ = ["USE_LEGACY_KERAS", "keras"]
