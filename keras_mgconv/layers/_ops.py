"""The tensor operations of the layers, for the backend Keras runs on.

One module per backend family, with the same functions: `_tensorflow_ops` on
TensorFlow (Keras 3's TensorFlow backend and tf_keras), which keeps grouped
convolutions out of Keras' XLA wrapper; `_keras_ops` on JAX and PyTorch,
which never imports TensorFlow.
"""

import importlib

from keras_mgconv._keras import keras

TENSORFLOW = keras.backend.backend() == "tensorflow"

ops = importlib.import_module(
    "keras_mgconv.layers._tensorflow_ops" if TENSORFLOW else "keras_mgconv.layers._keras_ops"
)
