"""The settings TensorFlow reads once, chosen before it reads them.

The package sets each only where the user has not. oneDNN and the device
types TensorFlow reads when it is imported: those only if TensorFlow is not
imported yet. The CPU allocator it reads when it first allocates, so that one
also in the order most scripts use, `import keras` first.

- oneDNN. TensorFlow turns it on by itself only on x86 CPUs with AVX-512
  VNNI/BF16 or AMX. Elsewhere (AVX2-only CPUs: AMD Zen 1-3, most laptops, many
  cloud VMs) it stays off, and then TensorFlow cannot differentiate a grouped
  convolution on CPU (the layers then call its oneDNN kernels themselves,
  `layers/_tensorflow_ops.py`), and full convolutions lose oneDNN's speed.
- The CPU allocator. With oneDNN off TensorFlow takes every tensor's memory
  from malloc, which maps and faults in fresh pages for each large one: an
  elementwise op on 64 MB of activations takes 33 ms instead of 11. With
  oneDNN on it pools large blocks (`MklCPUAllocator`); the package asks for
  the pooling allocator it has for the other case, `TF_CPU_ALLOCATOR_USE_BFC`.
- CUDA. On a Linux machine without a CUDA driver TensorFlow logs an
  error-level "failed call to cuInit" the first time it lists devices, news
  to nobody: there the package enables only the CPU device type, which is all
  TensorFlow could use anyway.
"""

import ctypes
import importlib.util
import os
import platform
import sys

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
DEVICE_TYPES = "TF_ENABLED_DEVICE_TYPES"
POOLED_CPU_ALLOCATOR = "TF_CPU_ALLOCATOR_USE_BFC"

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def uses_legacy_keras():
    """Whether `TF_USE_LEGACY_KERAS` selects Keras 2 (`tf_keras`), as TensorFlow reads it."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true")


def keras_module_name():
    """The module keras_mgconv takes its Keras from: "tf_keras" or "keras"."""
    return "tf_keras" if uses_legacy_keras() else "keras"


def _settable(variable):
    return variable not in os.environ and "tensorflow" not in sys.modules


def enable_onednn():
    """Sets `TF_ENABLE_ONEDNN_OPTS=1` on x86 CPUs; True when it did."""
    if not _settable(ONEDNN) or platform.machine().lower() not in _X86:
        return False
    os.environ[ONEDNN] = "1"
    return True


def pool_cpu_memory():
    """Sets `TF_CPU_ALLOCATOR_USE_BFC=1`; True when it did.

    TensorFlow reads it when its CPU allocator is created, at its first
    tensor, so it takes effect if TensorFlow has not computed anything yet.
    """
    if POOLED_CPU_ALLOCATOR in os.environ:
        return False
    os.environ[POOLED_CPU_ALLOCATOR] = "1"
    return True


def _has_accelerator_runtime():
    """Whether a GPU or TPU runtime TensorFlow could use may be present."""
    if importlib.util.find_spec("libtpu") is not None or os.path.exists("/dev/kfd"):
        return True  # A TPU VM, or a ROCm GPU.
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cpu_only_without_cuda():
    """Sets `TF_ENABLED_DEVICE_TYPES=CPU` on Linux without a CUDA driver; True when it did."""
    if not _settable(DEVICE_TYPES) or sys.platform != "linux" or _has_accelerator_runtime():
        return False
    os.environ[DEVICE_TYPES] = "CPU"
    return True
