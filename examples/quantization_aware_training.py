"""Quantization-aware training of a multigrid ResNet20, exported to an int8 TFLite model.

Trains a multigrid ResNet20 (group size 8) on the digits embedded in the
package, fine-tunes its quantization-aware copy for a few epochs, converts that
to a TFLite model whose convolutions, additions and classifier compute in int8,
runs it with LiteRT, and prints the test accuracy of the float, QAT and TFLite
models. About a minute and a half on a 2-core CPU:

    pip install "keras-mgconv[optimization]"
    python examples/quantization_aware_training.py [OUTPUT_DIR]

tensorflow-model-optimization runs only on Keras 2 (tf_keras): this script sets
TF_USE_LEGACY_KERAS=1 itself, before TensorFlow is imported.
"""

import os
import sys

# Before TensorFlow is imported: tfmot runs only on tf_keras.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from keras_mgconv import data, optimization, training  # noqa: E402

FLOAT_EPOCHS = 10
QAT_EPOCHS = 3
BATCH_SIZE = 64


def train_float_model(output_dir):
    """Trains a multigrid ResNet20 on the digits; returns its `.keras` path and test accuracy."""
    summary = training.train(
        "ResNet20",
        "digits",
        epochs=FLOAT_EPOCHS,
        batch_size=BATCH_SIZE,
        optimizer="adam",
        learning_rate=3e-3,
        weight_decay=0,
        group_size=8,
        output_dir=f"{output_dir}/float",
        overwrite=True,
        verbose=0,
    )
    return f"{output_dir}/float/last.keras", summary["final_test_accuracy"]


def digits():
    """The digits' training split (shuffled, augmented) and test split."""
    return (
        data.image_pipeline("digits", "train", BATCH_SIZE, training=True, seed=0),
        data.image_pipeline("digits", "test", 256),
    )


def compile_for_fine_tuning(model, learning_rate, epochs, train):
    """Adam, its learning rate decaying from `learning_rate` to 0 over `epochs` of `train`."""
    model.compile(
        keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(learning_rate, epochs * int(train.cardinality()))
        ),
        keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )


def tflite_accuracy(tflite_model, test):
    """Accuracy of a TFLite classifier, run with LiteRT on the whole split at once."""
    images, labels = next(iter(test.unbatch().batch(1_000_000)))
    interpreter = Interpreter(model_content=tflite_model)
    input_index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(input_index, images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_index, images.numpy())
    interpreter.invoke()
    predictions = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return float(np.mean(np.argmax(predictions, -1) == labels.numpy()))


def main(output_dir):
    # The same figures on every run on one machine.
    tf.config.experimental.enable_op_determinism()
    float_path, float_accuracy = train_float_model(output_dir)
    train, test = digits()

    # Activation ranges calibrated on 8 batches: tfmot's start at [-6, 6] and
    # would take thousands of steps to settle.
    qat_model = optimization.quantize_model(
        keras.models.load_model(float_path), calibration_data=train.take(8)
    )
    compile_for_fine_tuning(qat_model, 1e-4, QAT_EPOCHS, train)
    qat_model.fit(train, epochs=QAT_EPOCHS, verbose=2)
    _, qat_accuracy = qat_model.evaluate(test, verbose=0)
    # HDF5: tfmot cannot reload its quantizers from .keras files.
    qat_model.save(f"{output_dir}/qat.h5")

    converter = optimization.tflite_converter(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    tflite_model = converter.convert()
    with open(f"{output_dir}/qat_int8.tflite", "wb") as file:
        file.write(tflite_model)

    print(f"float Keras model: test accuracy {float_accuracy:.4f}")
    print(f"QAT Keras model:   test accuracy {qat_accuracy:.4f}")
    print(
        f"int8 TFLite model: test accuracy {tflite_accuracy(tflite_model, test):.4f}, "
        f"{len(tflite_model) / 1024:.0f} KiB ({output_dir}/qat_int8.tflite)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/qat-digits")
