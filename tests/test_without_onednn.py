"""The layer trains where TensorFlow cannot differentiate grouped convolutions.

oneDNN is chosen when TensorFlow is imported, so this runs in a fresh process
with `TF_ENABLE_ONEDNN_OPTS=0`, the configuration of CPUs without oneDNN.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    import keras_mgconv
    from keras_mgconv._keras import keras
    from keras_mgconv.layers.grouped_conv import grouped_gradient_supported

    def train_step(implementation):
        model = keras.Sequential([
            keras.Input((8, 8, 32)),
            keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8,
                                         implementation=implementation),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [w.numpy().copy() for w in model.trainable_weights]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 8, 8, 32)).astype("float32")
        loss = model.train_on_batch(x, rng.standard_normal(x.shape).astype("float32"))
        changed = sum(not np.array_equal(b, w.numpy())
                      for b, w in zip(before, model.trainable_weights))
        return float(loss), changed, len(before)

    loss, changed, total = train_step("auto")
    try:
        train_step("grouped")
        direct_error = None
    except tf.errors.OpError as error:
        direct_error = error.message
    print(json.dumps({"probe": grouped_gradient_supported(tf.float32), "loss": loss,
                      "changed": changed, "total": total, "direct_error": direct_error}))
""")


def test_trains_through_split_fallback_with_onednn_off():
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["probe"] is False
    assert report["changed"] == report["total"] == 8
    assert report["loss"] > 0
    # What the fallback avoids: without oneDNN, TensorFlow's CPU kernels refuse
    # grouped convolutions, in the gradient or (fused with the bias) forward.
    assert re.search("(Gradients for|does not support) grouped convolutions",
                     report["direct_error"])
