"""Quantization-aware training of a multigrid ResNet20, exported to an int8 TFLite model.

Trains a multigrid ResNet20 (group size 8) on the embedded digits, fine-tunes
its quantization-aware copy, converts that to a TFLite model whose
convolutions, additions and classifier run in int8, runs it with LiteRT, and
prints the test accuracy of the float, QAT and TFLite models:

    pip install -e ".[optimization]"
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
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from keras_mgconv import data, optimization, training  # noqa: E402
from keras_mgconv._keras import keras  # noqa: E402

QAT_EPOCHS = 10


def tflite_accuracy(tflite_model, dataset):
    """Test accuracy of a TFLite classifier run with LiteRT, one image at a time."""
    interpreter = Interpreter(model_content=tflite_model)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    correct = total = 0
    for images, labels in dataset.unbatch().batch(1):
        interpreter.set_tensor(input_index, images.numpy())
        interpreter.invoke()
        correct += int(np.argmax(interpreter.get_tensor(output_index)) == int(labels[0]))
        total += 1
    return correct / total


def main(output_dir):
    # The same figures on every run on one machine.
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    summary = training.train("ResNet20", "digits", epochs=20, optimizer="adam",
                             learning_rate=3e-3, weight_decay=0, group_size=8,
                             output_dir=f"{output_dir}/float", overwrite=True, verbose=0)
    model = keras.models.load_model(f"{output_dir}/float/last.keras")
    train = data.image_pipeline("digits", "train", 64, training=True, seed=0)
    test = data.image_pipeline("digits", "test", 256)

    qat_model = optimization.quantize_model(model)
    qat_model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            1e-4, QAT_EPOCHS * int(train.cardinality()))),
        keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    qat_model.fit(train, epochs=QAT_EPOCHS, verbose=2)
    _, qat_accuracy = qat_model.evaluate(test, verbose=0)
    # HDF5: tfmot cannot reload its quantizers from .keras files.
    qat_model.save(f"{output_dir}/qat.h5")

    converter = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    tflite_model = converter.convert()
    with open(f"{output_dir}/qat_int8.tflite", "wb") as file:
        file.write(tflite_model)

    print(f"float Keras model: test accuracy {summary['final_test_accuracy']:.4f}, "
          f"{summary['parameters']:,} parameters")
    print(f"QAT Keras model:   test accuracy {qat_accuracy:.4f}")
    print(f"int8 TFLite model: test accuracy {tflite_accuracy(tflite_model, test):.4f}, "
          f"{len(tflite_model) / 1024:.0f} KiB ({output_dir}/qat_int8.tflite)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/qat-digits")
