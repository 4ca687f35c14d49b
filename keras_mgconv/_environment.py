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
  to nobody: there the package disables the GPU device type, which TensorFlow
  could not use anyway (the one info line that says so is TensorFlow's; the
  CPU and the XLA types stay enabled, each of which would add another). Where
  TensorFlow is imported already (`import keras` first), it lists the devices
  itself at once, without that line.
- Logging, for the `keras-mgconv` command only: its TensorFlow info and
  warning lines are news to none of its users (scripts keep TensorFlow's
  own default).
"""

import ctypes
import importlib.util
import os
import platform
import site
import sys

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
DEVICE_TYPES = "TF_ENABLED_DEVICE_TYPES"
POOLED_CPU_ALLOCATOR = "TF_CPU_ALLOCATOR_USE_BFC"
LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"

# Every device type of TensorFlow's builds but GPU: TensorFlow logs a line for
# each registered type the variable leaves out.
_TYPES_BUT_GPU = "CPU,XLA_CPU,XLA_GPU"

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
    """Whether a GPU, TPU or pluggable device runtime TensorFlow could use may be present."""
    if importlib.util.find_spec("libtpu") is not None or os.path.exists("/dev/kfd"):
        return True  # A TPU VM, or a ROCm GPU.
    # A pluggable device (e.g. Intel's XPU) registers a device type of its own,
    # which an explicit list of types would disable.
    site_packages = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    if any(os.path.isdir(os.path.join(folder, "tensorflow-plugins")) for folder in site_packages):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cpu_only_without_cuda():
    """Spares TensorFlow's cuInit error on Linux without a CUDA driver; True when it did.

    Before TensorFlow is imported, disables its GPU device type
    (`TF_ENABLED_DEVICE_TYPES`). After, if the variable is not set, lists the
    devices once with the error line left out: TensorFlow tries the GPU only
    the first time it lists them. Listing leaves the devices configurable
    (`tf.config.set_visible_devices`, threading), unlike running an op.
    """
    if DEVICE_TYPES in os.environ or sys.platform != "linux" or _has_accelerator_runtime():
        return False
    if "tensorflow" not in sys.modules:
        os.environ[DEVICE_TYPES] = _TYPES_BUT_GPU
        return True
    from keras_mgconv import _tensorflow_logs

    tensorflow = sys.modules["tensorflow"]
    with _tensorflow_logs.hidden(_tensorflow_logs.records_saying("failed call to cuInit")):
        tensorflow.config.list_physical_devices()
    return True


def quiet_command_line_logs():
    """Sets `TF_CPP_MIN_LOG_LEVEL=2` (errors only) for the `keras-mgconv` command; True when it did.

    Only where the user has not set it and TensorFlow is not imported yet:
    it reads the level once.
    """
    if not _settable(LOG_LEVEL):
        return False
    os.environ[LOG_LEVEL] = "2"
    return True
