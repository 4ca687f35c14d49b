"""Magnitude pruning of a multigrid ResNet20, unstructured and by whole groups.

Trains a multigrid ResNet20 (group size 8) on the embedded digits, then prunes
two copies of it to 50% with tensorflow-model-optimization while fine-tuning:
one weight by weight, one by whole groups of its grouped convolutions. Each is
stripped of its pruning wrappers, exported to TFLite and run with LiteRT; the
script prints sparsity, test accuracy and the gzipped size of each model:

    pip install -e ".[optimization]"
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
from quantization_aware_training import tflite_accuracy  # noqa: E402

from keras_mgconv import data, optimization, training  # noqa: E402
from keras_mgconv._keras import keras  # noqa: E402

SPARSITY = 0.5
# The sparsity rises to SPARSITY over the first RAMP_EPOCHS, then the masks stay.
RAMP_EPOCHS = 4
EPOCHS = 10


def prune(model, structured, train):
    """`model` pruned, fine-tuned and stripped, and the sparsity of its pruned kernels."""
    steps_per_epoch = int(train.cardinality())
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0, SPARSITY, begin_step=0, end_step=RAMP_EPOCHS * steps_per_epoch, frequency=5)
    pruned = optimization.prune_low_magnitude(model, schedule, structured=structured)
    pruned.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            1e-3, EPOCHS * steps_per_epoch)),
        keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    pruned.fit(train, epochs=EPOCHS, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    kernels = [weight.numpy() for layer in pruned.layers
               for weight, _, _ in getattr(layer, "pruning_vars", [])]
    sparsity = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    return tfmot.sparsity.keras.strip_pruning(pruned), sparsity


def report(name, model, sparsity, test):
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    _, accuracy = model.evaluate(test, verbose=0)
    tflite_model = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    print(f"{name:>12}: sparsity {sparsity:.3f}, Keras test accuracy {accuracy:.4f}, "
          f"TFLite {tflite_accuracy(tflite_model, test):.4f}, "
          f"gzipped TFLite {len(gzip.compress(tflite_model)) / 1024:.0f} KiB")


def main(output_dir):
    # The same figures on every run on one machine.
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    training.train("ResNet20", "digits", epochs=20, optimizer="adam", learning_rate=3e-3,
                   weight_decay=0, group_size=8, output_dir=f"{output_dir}/float",
                   overwrite=True, verbose=0)
    float_path = f"{output_dir}/float/last.keras"
    train = data.image_pipeline("digits", "train", 64, training=True, seed=0)
    test = data.image_pipeline("digits", "test", 256)
    report("float", keras.models.load_model(float_path), 0.0, test)
    for structured in (False, True):
        # Each from a fresh copy: pruning changes the weights of the model it wraps.
        pruned, sparsity = prune(keras.models.load_model(float_path), structured, train)
        name = "groups" if structured else "weights"
        pruned.save(f"{output_dir}/pruned_{name}.keras")
        report(f"{name} 50%", pruned, sparsity, test)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/pruning-digits")
