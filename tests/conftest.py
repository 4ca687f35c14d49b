import contextlib
import io
import os

# Before TensorFlow is imported anywhere: keep test output readable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from keras_mgconv._keras import keras


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """`keras-mgconv train --epochs 6`, run once: (its output_dir, what it printed).

    A multigrid ResNet20 at about 95% test accuracy on the embedded digits, for
    the tests that need a trained model.
    """
    from keras_mgconv import cli

    output_dir = str(tmp_path_factory.mktemp("digits") / "run")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["train", "--epochs", "6", "--output-dir", output_dir]) == 0
    return output_dir, printed.getvalue()


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Every test starts from the same seed and the float32 policy."""
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


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
        full[:, :, g * group_in:(g + 1) * group_in, g * group_out:(g + 1) * group_out] = (
            kernel[..., g * group_out:(g + 1) * group_out])
    return full
