"""`digits`: a TFDS image-classification dataset that needs no network.

scikit-learn ships the UCI "optical recognition of handwritten digits" test set
inside its wheel: 1797 real 8x8 grayscale images of the digits 0-9. This
builder turns them into a TFDS dataset, so that once keras_mgconv is imported

    tfds.load("digits", split="train", as_supervised=True)

works offline like any other TFDS dataset, and `keras-mgconv train` has a real
default dataset that trains in minutes on a laptop CPU.

The splits are fixed and stratified: of each digit's images, in scikit-learn's
order, every fifth (the 5th, 10th, ...) is in the test split (355 images), the
others in the train split (1442). Pixel intensities 0-16 are scaled to 0-255.
"""

import numpy as np
import tensorflow_datasets as tfds

TEST_EVERY = 5


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (8x8 grayscale, 10 classes) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Every fifth image of each digit is the test split."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the images are in scikit-learn's wheel.
        return {
            "train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True),
        }

    def _generate_examples(self, test):
        # Imported here: scikit-learn is needed only the first time the dataset is prepared.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        seen = np.zeros(10, int)
        for index, (image, label) in enumerate(zip(images, digits.target)):
            seen[label] += 1
            if (seen[label] % TEST_EVERY == 0) == test:
                yield index, {"image": image, "label": int(label)}
