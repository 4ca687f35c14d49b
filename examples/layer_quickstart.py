"""MultigridConv2D in a small CNN: fewer weights than Conv2D, similar accuracy.

Trains the same network twice on scikit-learn's handwritten digits (1797 real
8x8 images, no download), once with Conv2D and once with MultigridConv2D, and
prints parameters and test accuracy of both:

    python examples/layer_quickstart.py
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_mgconv
from keras_mgconv._keras import keras


def build(conv, width=64):
    def block(x, filters, strides=1):
        x = conv(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        # A short run: the default momentum 0.99 would leave the moving statistics
        # far from the data after a few hundred steps.
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        return keras.layers.ReLU()(x)

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same")(inputs)
    x = block(x, width)
    x = block(x, width)
    x = block(x, 2 * width, strides=2)
    x = block(x, 2 * width)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )

    for name, conv in [
        ("Conv2D", keras.layers.Conv2D),
        ("MultigridConv2D", keras_mgconv.MultigridConv2D),
    ]:
        model = build(conv)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x_train, y_train, batch_size=32, epochs=8, verbose=2)
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        print(f"{name:>16}: {model.count_params():>8,} parameters, test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
