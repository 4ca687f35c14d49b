"""keras_mgconv: multigrid-in-channels (MGIC) convolutional networks for Keras.

The public names load on first use (PEP 562), so that `import keras_mgconv`
and the `keras-mgconv` command answer without importing TensorFlow until they
need it; before that import, `_environment` turns oneDNN on where TensorFlow
would leave it off, has TensorFlow pool its CPU memory, and quiets its CUDA
error where there is no GPU.

Saved models must load after nothing but `import keras_mgconv`, in either
import order: the package's layers register with Keras as soon as Keras is
imported (at once if it already is), through a post-import hook on the Keras
that `_keras` chooses.
"""

import importlib

import wrapt

from keras_mgconv import _environment

_environment.enable_onednn()
_environment.pool_cpu_memory()
_environment.cpu_only_without_cuda()


def _register_layers(keras_module):
    # Only for the Keras the package uses (tensorflow-model-optimization may
    # switch to Keras 2 after this import). `_keras` imports the layers once
    # it holds Keras; inside the package's own import of Keras, import_module
    # returns `_keras` in progress.
    if keras_module.__name__ == _environment.keras_module_name():
        importlib.import_module("keras_mgconv._keras")


for _name in ("keras", "tf_keras"):
    wrapt.register_post_import_hook(_register_layers, _name)

__version__ = "0.1.0"

_SUBMODULES = ("batch_norm", "data", "export", "layers", "models", "optimization", "training")
_ATTRIBUTES = {
    "ChannelProlongation": "keras_mgconv.layers",
    "ChannelRestriction": "keras_mgconv.layers",
    "ChannelZeroPadding": "keras_mgconv.layers",
    "GroupedConv2D": "keras_mgconv.layers",
    "MultigridConv2D": "keras_mgconv.layers",
    "PreciseBatchNormModel": "keras_mgconv.batch_norm",
    "count_multiply_adds": "keras_mgconv.complexity",
}

__all__ = [
    "ChannelProlongation",
    "ChannelRestriction",
    "ChannelZeroPadding",
    "GroupedConv2D",
    "MultigridConv2D",
    "PreciseBatchNormModel",
    "__version__",
    "batch_norm",
    "count_multiply_adds",
    "data",
    "models",
]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_mgconv.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'keras_mgconv' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBMODULES, *_ATTRIBUTES})
