"""oneDNN on by default on x86, where TensorFlow leaves it off for most CPUs.

TensorFlow turns oneDNN on by itself only on x86 CPUs with AVX-512 VNNI/BF16 or
AMX. Elsewhere (AVX2-only CPUs: AMD Zen 1-3, most laptops, many cloud VMs) it
stays off, and then TensorFlow cannot differentiate a grouped convolution on
CPU: every grouped convolution of a multigrid layer would train through the
slower per-group fallback (`grouped_conv2d`'s "split"), and full convolutions
lose oneDNN's speed too. TensorFlow reads the switch, `TF_ENABLE_ONEDNN_OPTS`,
once, when it is imported, so the package sets it before its first import of
TensorFlow: it must be imported before TensorFlow for this to work, and it
never overrides a value the user set.
"""

import os
import platform
import sys

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def enable_by_default():
    """Sets `TF_ENABLE_ONEDNN_OPTS=1` if unset, TensorFlow not yet imported, and the CPU x86.

    Returns:
        True when this call set the variable.
    """
    if (VARIABLE in os.environ or "tensorflow" in sys.modules
            or platform.machine().lower() not in _X86):
        return False
    os.environ[VARIABLE] = "1"
    return True
