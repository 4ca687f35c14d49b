"""Two replicas follow the one-device trajectory, multigrid networks as the baseline.

The issue's audit saw a multigrid network trained with SGD momentum on two
replicas leave the one-device trajectory from its second step. One
subprocess configures two logical CPUs before TensorFlow starts, and runs both
networks.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_TRAJECTORIES = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras_mgconv
    from keras_mgconv._keras import keras

    STEPS = 5

    def build(network):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 16))
        if network == "multigrid":
            x = keras_mgconv.MultigridConv2D(32, 3, padding="same", group_size=8)(inputs)
        else:
            x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
        x = keras.layers.BatchNormalization(synchronized=True)(x)
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(x))
        return keras.Model(inputs, keras.layers.Dense(4)(x))

    rng = np.random.default_rng(0)
    images = rng.normal(size=(16 * STEPS, 8, 8, 16)).astype("float32")
    targets = rng.normal(size=(16 * STEPS, 4)).astype("float32")

    class Trajectory(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.steps = [[w.numpy() for w in self.model.trainable_weights]]

        def on_train_batch_end(self, batch, logs=None):
            self.steps.append([w.numpy() for w in self.model.trainable_weights])

    def trajectory(network, strategy):
        with strategy.scope():
            model = build(network)
            model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), "mse")
        recorder = Trajectory()
        model.fit(images, targets, batch_size=16, shuffle=False, verbose=0,
                  callbacks=[recorder])
        return recorder.steps

    # One strategy for both networks: a second one in the process fails its
    # first collective (InvalidArgumentError at CollectiveReduceV2).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    differences = {}
    for network in sys.argv[1:]:
        one = trajectory(network, tf.distribute.get_strategy())
        two = trajectory(network, mirrored)
        # How far each step's weights are apart, relative to how far training moved them.
        differences[network] = [
            float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(mine, theirs))
                          / sum(np.sum((a - w) ** 2) for a, w in zip(mine, one[0]))))
            for mine, theirs in zip(one[1:], two[1:])]
    print(json.dumps(differences))
""")

NETWORKS = ["baseline", "multigrid"]


@pytest.fixture(scope="module")
def differences():
    """Each network's distance between the trajectories, step by step: one process for both."""
    result = subprocess.run(
        [sys.executable, "-c", _TRAJECTORIES, *NETWORKS],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("network", NETWORKS)
def test_two_replicas_follow_the_one_device_trajectory(differences, network):
    steps = differences[network]
    assert len(steps) == 5
    # Rounding (the replicas sum the batch in another order) only: about 1e-6
    # here for both networks; a replica-dependent computation would be percent.
    assert max(steps) < 1e-4, steps
