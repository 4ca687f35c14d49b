"""Magnitude pruning of a multigrid ResNet20, weight by weight and by whole groups.

Trains a multigrid ResNet20 (group size 8) on the digits embedded in the
package, then prunes two copies of it to 50% with tensorflow-model-optimization
while fine-tuning: one weight by weight, one by whole groups of its grouped
convolutions. Each is stripped of its pruning wrappers, exported to TFLite and
run with LiteRT; the script prints the sparsity of the pruned kernels, the test
accuracy and the gzipped size of each model. About two minutes on a 2-core CPU:

    pip install "keras-mgconv[optimization]"
    python examples/pruning.py [OUTPUT_DIR]

tensorflow-model-optimization runs only on Keras 2 (tf_keras): this script sets
TF_USE_LEGACY_KERAS=1 itself, before TensorFlow is imported.
"""

import gzip
import os
import sys

# Before TensorFlow is imported: tfmot runs only on tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402
from quantization_aware_training import (  # noqa: E402
    compile_for_fine_tuning,
    digits,
    tflite_accuracy,
    train_float_model,
)

from keras_mgconv import optimization  # noqa: E402

SPARSITY = 0.5
# The sparsity rises to SPARSITY over the first RAMP_EPOCHS, then the masks stay.
RAMP_EPOCHS = 2
EPOCHS = 8


def prune(model, structured, train):
    """`model` pruned while fine-tuned, then stripped; and the sparsity of its pruned kernels."""
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, SPARSITY, begin_step=0, end_step=RAMP_EPOCHS * int(train.cardinality()), frequency=5
    )
    pruned = optimization.prune_low_magnitude(model, schedule, structured=structured)
    compile_for_fine_tuning(pruned, 1e-3, EPOCHS, train)
    pruned.fit(
        train, epochs=EPOCHS, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()]
    )
    kernels = [
        weight.numpy()
        for layer in pruned.layers
        for weight, _, _ in getattr(layer, "pruning_vars", [])
    ]
    sparsity = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    return tfmot.sparsity.keras.strip_pruning(pruned), sparsity


def report(name, model, sparsity, test):
    tflite_model = optimization.tflite_converter(model).convert()
    print(
        f"{name:>16}: sparsity {sparsity:.3f}, TFLite test accuracy "
        f"{tflite_accuracy(tflite_model, test):.4f}, gzipped "
        f"{len(gzip.compress(tflite_model)) / 1024:.0f} KiB"
    )


def main(output_dir):
    # The same figures on every run on one machine.
    tf.config.experimental.enable_op_determinism()
    float_path, _ = train_float_model(output_dir)
    train, test = digits()
    report("float", keras.models.load_model(float_path), 0.0, test)
    for structured in (False, True):
        # Each from a fresh copy: pruning changes the weights of the model it wraps.
        pruned, sparsity = prune(keras.models.load_model(float_path), structured, train)
        name = "groups" if structured else "weights"
        pruned.save(f"{output_dir}/pruned_{name}.keras")
        report(f"50% of {name}", pruned, sparsity, test)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/pruning-digits")
