"""Train a multigrid ResNet20 briefly, export it to int8 TFLite, verify it, time it.

    python examples/export_tflite.py

Trains on the embedded `digits` dataset (real 8x8 handwritten digits, no
download) for a few epochs, exports the checkpoint that the validation split
selected as a fully quantized int8 `.tflite` file calibrated on training
images, compares it with the Keras model on the test split, and times it with
LiteRT (XNNPACK on and off, 1 and 2 threads). Everything goes to
runs/export_example/.
"""

import os

from keras_mgconv import data, training
from keras_mgconv._keras import keras
from keras_mgconv.export import export_tflite, format_latency, measure_latency

OUTPUT_DIR = os.path.join("runs", "export_example")


def main():
    summary = training.train(
        "ResNet20", "digits", epochs=8, output_dir=OUTPUT_DIR, overwrite=True, verbose=2
    )
    print(
        f"Keras model: {summary['parameters']:,} parameters, epoch "
        f"{summary['selected_epoch']} selected on {summary['selected_by']}, "
        f"test accuracy {summary['selected_test_accuracy']:.3f}\n"
    )

    model = keras.models.load_model(os.path.join(OUTPUT_DIR, "best.keras"))
    image_shape = model.input_shape[1:]
    # A few hundred training images are enough to calibrate the activation ranges
    # (uncached: tf.data warns about a cache that is not read to its end).
    calibration = data.image_pipeline(
        "digits", "train", 64, image_shape=image_shape, cache=False
    ).take(4)
    test = data.image_pipeline("digits", "test", 64, image_shape=image_shape)
    report = export_tflite(
        model,
        os.path.join(OUTPUT_DIR, "model.int8.tflite"),
        "int8",
        representative_data=calibration,
        verification_data=test,
    )
    print(report, end="\n\n")
    print(format_latency(measure_latency(report.path)))


if __name__ == "__main__":
    main()
