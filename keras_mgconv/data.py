"""tf.data input pipelines for image classification from tensorflow-datasets.

    info = data.image_dataset_info("cifar10")
    train = data.image_pipeline("cifar10", "train", batch_size=128, training=True)
    test = data.image_pipeline("cifar10", info.test_split, batch_size=256)

Any TFDS dataset with an image and a class label works (cifar10, cifar100,
imagenette, imagenet2012 with a manual dir, the embedded `digits`, ...).
Pipelines yield float32 images in the dataset's pixel range, 0-255; the
per-channel normalisation is a `keras.layers.Normalization` layer made by
`normalization_layer()`, so that a trained model carries it and takes raw
pixels when it is evaluated, saved or exported to TFLite.

Augmentation follows the image size. Small fixed-size images (at most 64
pixels, the CIFAR family) get CIFAR's: zero-pad by an eighth of the side (4
pixels at 32x32), random crop back, random horizontal flip. Larger or
variable-size images get ImageNet's: random resized crop and flip for
training, resize to 1/0.875 of the side and center crop for evaluation.
Datasets of digits and characters are never flipped: mirroring changes their
meaning.
"""

import collections
import functools
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

import keras_mgconv.digits  # noqa: F401  Registers the embedded `digits` dataset with TFDS.
from keras_mgconv._keras import keras
from keras_mgconv.layers import _arguments

DEFAULT_DATASET = "digits"

# Mirroring changes what these images show.
_NOT_FLIPPABLE = frozenset({
    "digits", "mnist", "emnist", "kmnist", "svhn_cropped", "binary_alpha_digits",
    "mnist_corrupted", "omniglot"})

# Fixed-size images up to this side are CIFAR-like: cached in memory, padded and cropped.
_SMALL_IMAGE = 64

# Decoded training sets up to this many bytes are cached in memory.
_CACHE_BYTES = 2 << 30

# ImageNet evaluation: resize to side / 0.875, then center crop to side.
_CENTER_CROP_FRACTION = 0.875

# tfds retries a failed download 10 times with exponential backoff: over three
# minutes before an offline machine learns that it is offline. It has no
# setting for that, so `_prepare` lowers its module constant while it runs.
_DOWNLOAD_RETRIES = 2


ImageDatasetInfo = collections.namedtuple(
    "ImageDatasetInfo",
    ["name", "image_shape", "num_classes", "train_split", "test_split",
     "num_examples", "flippable"])
ImageDatasetInfo.__doc__ = """What a pipeline needs to know about a TFDS image dataset.

Attributes:
    name: the TFDS name.
    image_shape: (height, width, channels); height and width are None where
        the images vary in size.
    num_classes: number of labels.
    train_split: "train".
    test_split: the held-out split used for evaluation: "test" where the
        dataset has one, else "validation".
    num_examples: dict of split name to number of examples.
    flippable: whether horizontal flips are a valid augmentation.
"""


def _builder(name, data_dir):
    if not isinstance(name, str) or not name:
        raise ValueError(f"`dataset` must be a TFDS dataset name. Received: dataset={name!r}.")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset: TFDS has no dataset named {name!r} (see "
            f"`tfds.list_builders()`; the embedded offline dataset is "
            f"{DEFAULT_DATASET!r}). Received: dataset={name!r}."
        ) from None


def _image_and_label(builder):
    features = builder.info.features
    supervised = builder.info.supervised_keys
    if (not supervised or len(supervised) != 2
            or not isinstance(features[supervised[0]], tfds.features.Image)
            or not isinstance(features[supervised[1]], tfds.features.ClassLabel)):
        raise ValueError(
            f"Dataset {builder.name!r} is not an image classification dataset: it "
            f"needs an image feature and a class label as its supervised keys. "
            f"Received: dataset={builder.name!r} with features {features}."
        )
    return features[supervised[0]], features[supervised[1]]


def _prepare(builder, manual_dir):
    """Downloads and prepares `builder`'s data, or says why it cannot."""
    if builder.is_prepared():
        return
    where = builder.data_dir
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with mock.patch.object(downloader, "MAX_RETRIES", _DOWNLOAD_RETRIES):
        try:
            builder.download_and_prepare(download_config=config)
        except AssertionError as error:
            if "manual" not in str(error).lower():
                raise
            raise ValueError(
                f"Dataset {builder.name!r} must be downloaded by hand: TFDS cannot "
                f"fetch it. Put its files in a folder and pass that as `manual_dir` "
                f"(`--manual-dir`), or prepare it once into `data_dir` "
                f"(`--data-dir`). Instructions: "
                f"{' '.join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())} "
                f"Received: dataset={builder.name!r}, manual_dir={manual_dir!r}."
            ) from None
        except (OSError, tfds.download.DownloadError) as error:
            # requests' ConnectionError is an OSError.
            raise ValueError(
                f"Dataset {builder.name!r} is not prepared in {where} and cannot be "
                f"downloaded ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                f"Prepare it on a machine with network access (`tfds.load("
                f"{builder.name!r}, data_dir=...)`) and pass that directory as "
                f"`data_dir` (`--data-dir`), or put manually downloaded files in "
                f"`manual_dir` (`--manual-dir`). Received: dataset={builder.name!r}."
            ) from None


def image_dataset_info(name, data_dir=None, manual_dir=None):
    """Prepares a TFDS image-classification dataset and describes it.

    The first call for a dataset downloads and prepares it into `data_dir`
    (TFDS' default `~/tensorflow_datasets` when None), except `digits`, which is
    embedded in the package.

    Args:
        name: TFDS dataset name, e.g. "digits", "cifar10", "imagenette".
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files (imagenet2012).

    Returns:
        An `ImageDatasetInfo`.

    Raises:
        ValueError: the name is unknown, the dataset is not an image
            classification dataset, or it is not prepared and cannot be
            downloaded; the message says how to provide it.

    Example:

    >>> from keras_mgconv import data
    >>> info = data.image_dataset_info("digits")
    >>> info.image_shape, info.num_classes, info.test_split
    ((8, 8, 1), 10, 'test')
    """
    builder = _builder(name, data_dir)
    image, label = _image_and_label(builder)
    _prepare(builder, manual_dir)
    splits = builder.info.splits
    if "train" not in splits:
        raise ValueError(
            f"Dataset {name!r} has no 'train' split. Received: dataset={name!r} "
            f"with splits {sorted(splits)}.")
    held_out = [split for split in ("test", "validation") if split in splits]
    if not held_out:
        raise ValueError(
            f"Dataset {name!r} has neither a 'test' nor a 'validation' split to "
            f"evaluate on. Received: dataset={name!r} with splits {sorted(splits)}.")
    return ImageDatasetInfo(
        name=name, image_shape=tuple(image.shape), num_classes=label.num_classes,
        train_split="train", test_split=held_out[0],
        num_examples={split: splits[split].num_examples for split in splits},
        flippable=name.split("/")[0] not in _NOT_FLIPPABLE)


def _target_shape(info, image_shape):
    """The (height, width, channels) images are brought to, checked against the dataset."""
    height, width, channels = info.image_shape
    if image_shape is None:
        if height is None or width is None:
            raise ValueError(
                f"Dataset {info.name!r} has images of varying size: pass `image_shape` "
                f"(`--image-size`) to choose the size the pipeline crops them to. "
                f"Received: image_shape=None.")
        return info.image_shape
    image_shape = tuple(image_shape)
    if (len(image_shape) != 3 or any(not isinstance(d, (int, np.integer)) or d <= 0
                                     for d in image_shape)):
        raise ValueError(
            f"`image_shape` must be (height, width, channels) of positive integers. "
            f"Received: image_shape={image_shape}.")
    if image_shape[2] != channels and {image_shape[2], channels} != {1, 3}:
        raise ValueError(
            f"Dataset {info.name!r} has {channels}-channel images, which cannot be "
            f"turned into {image_shape[2]}-channel ones (only grayscale and RGB "
            f"convert into each other). Received: image_shape={image_shape}.")
    return image_shape


def _is_small(info):
    height, width, _ = info.image_shape
    return height is not None and width is not None and max(height, width) <= _SMALL_IMAGE


def _convert_channels(image, channels):
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


def _random_resized_crop(image, size, seed):
    """Inception-style crop: 8-100% of the area, aspect ratio 3/4 to 4/3, flipped later."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros((1, 0, 4)), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.image.resize(tf.slice(image, begin, crop_size), size)


def _center_crop(image, size):
    height, width = size
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = max(height, width) / _CENTER_CROP_FRACTION / tf.reduce_min(shape)
    resized = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    return tf.image.resize_with_crop_or_pad(resized, height, width)


def _preprocess_function(info, image_shape, augment):
    height, width, channels = image_shape
    size = (height, width)
    small = _is_small(info)
    padding = max(1, round(max(size) / 8))
    flip = augment and info.flippable

    def preprocess(seed, example):
        # Stateless random ops: the same `seed` gives the same augmentations in
        # every process, whatever else has drawn random numbers.
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image, label = example
        image = _convert_channels(tf.cast(image, tf.float32), channels)
        if small:
            if tuple(image.shape[:2]) != size:
                image = tf.image.resize(image, size)
            if augment:
                image = tf.image.resize_with_crop_or_pad(
                    image, height + 2 * padding, width + 2 * padding)
                image = tf.image.stateless_random_crop(image, image_shape, crop_seed)
        elif augment:
            image = _random_resized_crop(image, size, crop_seed)
        else:
            image = _center_crop(image, size)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return tf.ensure_shape(image, image_shape), label

    return preprocess


def image_pipeline(name, split, batch_size, training=False, image_shape=None,
                   augment=None, data_dir=None, manual_dir=None, cache=None,
                   shuffle_buffer=None, seed=None, drop_remainder=False, epochs=None):
    """A batched, prefetched `tf.data.Dataset` of (image, label) from TFDS.

    Args:
        name: TFDS dataset name.
        split: TFDS split, e.g. "train", "test", "train[:90%]".
        batch_size: examples per batch (the global batch under tf.distribute).
        training: shuffle (reshuffled every epoch) and augment.
        image_shape: (height, width, channels) to bring the images to; None
            keeps the dataset's own (fixed-size datasets only). Grayscale and
            RGB images are converted into each other where the channels differ.
        augment: whether to augment; default `training`.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files (imagenet2012).
        cache: keep the decoded images in memory; default: where the split
            has fixed-size images that fit in 2 GiB.
        shuffle_buffer: examples in the shuffle buffer; default the whole
            split, at most 10,000.
        seed: seed for shuffling and augmentation, for reproducible order.
        drop_remainder: drop each epoch's last partial batch (needed for TPUs).
        epochs: for training, the epochs to hold back to back, e.g.
            `range(3, 15)`: each is shuffled and augmented as `seed` and its
            number alone determine, and holds only full batches. `train` uses
            it so that a resumed run, and any number of replicas, see the
            batches of an uninterrupted run on one device. None (the default)
            gives one epoch, shuffled anew each time it is iterated.

    Returns:
        A `tf.data.Dataset` of (float32 images of `image_shape` with pixel values
        0-255, int64 labels) batches.

    Raises:
        ValueError: for an unknown or unavailable dataset, a non-positive batch
            size, or an `image_shape` the images cannot be brought to.

    Example:

    >>> from keras_mgconv import data
    >>> test = data.image_pipeline("digits", "test", batch_size=32)
    >>> images, labels = next(iter(test))
    >>> tuple(images.shape), images.dtype.name
    ((32, 8, 8, 1), 'float32')
    """
    batch_size = _arguments.positive_int("batch_size", batch_size)
    info = image_dataset_info(name, data_dir, manual_dir)
    image_shape = _target_shape(info, image_shape)
    augment = training if augment is None else augment
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False)
    examples = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True,
                         shuffle_files=training, read_config=read_config)
    count = int(examples.cardinality())
    if cache is None:
        cache = _is_small(info) and count * int(np.prod(info.image_shape)) <= _CACHE_BYTES
    if cache:
        examples = examples.cache()
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    if training and epochs is not None:
        # Concatenated epochs with seeds of their own, not a reshuffling repeat():
        # tf.data's reshuffling state lives in the dataset, so the order would
        # depend on how many iterators anything has opened on it before.
        if not isinstance(epochs, range) or epochs.step != 1 or epochs.start < 0:
            raise ValueError(f"`epochs` must be a range of epoch numbers, e.g. range(3, 15). "
                             f"Received: epochs={epochs!r}.")
        full_batches = count // batch_size * batch_size
        examples = functools.reduce(tf.data.Dataset.concatenate, [
            examples.shuffle(_shuffle_buffer(shuffle_buffer, count), seed=seed + number,
                             reshuffle_each_iteration=False).take(full_batches)
            for number in epochs])
        first_index = epochs.start * full_batches
    elif training:
        examples = examples.shuffle(_shuffle_buffer(shuffle_buffer, count), seed=seed,
                                    reshuffle_each_iteration=True)
        first_index = 0
    else:
        first_index = 0
    preprocess = _preprocess_function(info, image_shape, augment)
    # Stateless augmentation seeded by (seed, position in the stream).
    dataset = examples.enumerate(first_index).map(
        lambda index, example: preprocess(tf.stack([tf.constant(seed, tf.int64), index]),
                                          example),
        num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    # The TFDS files are few; split the examples, not the files, across workers.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _shuffle_buffer(shuffle_buffer, count):
    return shuffle_buffer or min(max(count, 1), 10_000)


def normalization_layer(name, image_shape=None, data_dir=None, manual_dir=None,
                        max_images=10_000):
    """A `keras.layers.Normalization` with the training split's per-channel statistics.

    Mean and variance are computed over the first `max_images` training images
    (rounded up to a batch of 256), brought to `image_shape` as for evaluation.
    The layer holds them as constants, so it can join a model built under any
    `tf.distribute` strategy.

    Args:
        name: TFDS dataset name.
        image_shape: as in `image_pipeline`.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files.
        max_images: how many training images to average over.

    Returns:
        A `keras.layers.Normalization` layer named "normalization".

    Example:

    >>> from keras_mgconv import data
    >>> layer = data.normalization_layer("digits")
    >>> images, _ = next(iter(data.image_pipeline("digits", "train", batch_size=1442)))
    >>> normalized = layer(images)
    >>> abs(float(np.mean(normalized))) < 1e-3, round(float(np.std(normalized)), 3)
    (True, 1.0)
    """
    batches = image_pipeline(name, "train", batch_size=256, image_shape=image_shape,
                             data_dir=data_dir, manual_dir=manual_dir, cache=False)
    statistics = keras.layers.Normalization(axis=-1)
    statistics.adapt(batches.take(-(-max_images // 256)).map(lambda image, label: image))
    return keras.layers.Normalization(
        axis=-1, mean=np.ravel(statistics.mean), variance=np.ravel(statistics.variance),
        name="normalization")
