"""keras_mgconv: multigrid-in-channels (MGIC) convolutional networks for Keras.

The public names load on first use (PEP 562), so that `import keras_mgconv`
and the `keras-mgconv` command answer without importing TensorFlow until they
need it; before that import, `_environment` turns oneDNN on where TensorFlow
would leave it off, and quiets its CUDA error where there is no GPU.
"""

import importlib

from keras_mgconv import _environment

_environment.enable_onednn()
_environment.cpu_only_without_cuda()

__version__ = "0.1.0"

_SUBMODULES = ("batch_norm", "data", "export", "models", "optimization", "training")
_ATTRIBUTES = {
    "ChannelProlongation": "keras_mgconv.layers",
    "ChannelRestriction": "keras_mgconv.layers",
    "GroupedConv2D": "keras_mgconv.layers",
    "MultigridConv2D": "keras_mgconv.layers",
    "count_multiply_adds": "keras_mgconv.complexity",
}

__all__ = [
    "ChannelProlongation",
    "ChannelRestriction",
    "GroupedConv2D",
    "MultigridConv2D",
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
