"""The full kernel of a grouped convolution: an independent, NumPy-only reference.

NumPy only, so that the backend checks' subprocesses (tests/backend_checks.py)
can use it on any Keras backend without pytest or TensorFlow.
"""

import numpy as np


def block_diagonal_kernel(kernel, groups):
    """Expands a grouped kernel (kh, kw, C_in/G, C_out) to the full (kh, kw, C_in, C_out) one.

    The full convolution with this kernel is the grouped convolution: an
    independent reference that involves no grouped op at all.
    """
    kernel = np.asarray(kernel)
    kh, kw, group_in, channels_out = kernel.shape
    group_out = channels_out // groups
    full = np.zeros((kh, kw, group_in * groups, channels_out), kernel.dtype)
    for g in range(groups):
        full[:, :, g * group_in : (g + 1) * group_in, g * group_out : (g + 1) * group_out] = kernel[
            ..., g * group_out : (g + 1) * group_out
        ]
    return full


def diagonal_blocks(full_kernel, groups):
    """The grouped kernel (kh, kw, C_in/G, C_out) `block_diagonal_kernel` expands to `full_kernel`.

    Also the gradient of a grouped kernel, from its full kernel's gradient.
    """
    full_kernel = np.asarray(full_kernel)
    group_in = full_kernel.shape[2] // groups
    group_out = full_kernel.shape[3] // groups
    return np.concatenate(
        [
            full_kernel[
                :, :, g * group_in : (g + 1) * group_in, g * group_out : (g + 1) * group_out
            ]
            for g in range(groups)
        ],
        axis=-1,
    )
