"""tf.data input pipelines for image classification from tensorflow-datasets.

    info = data.image_dataset_info("cifar10")
    train = data.image_pipeline("cifar10", "train", batch_size=128, training=True)
    test = data.image_pipeline("cifar10", info.test_split, batch_size=256)

To choose checkpoints without looking at the test split, `validation_splits`
takes a validation split from the training data: the dataset's own where it has
one, else a fixed, stratified fraction of its train split.

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
import contextlib
import fcntl
import functools
import io
import logging
import math
import numbers
import os
import sys
import textwrap
from unittest import mock

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader
from tensorflow_datasets.core.utils import tqdm_utils

import keras_mgconv.digits  # noqa: F401 (registers the embedded `digits` dataset with TFDS)
from keras_mgconv._keras import keras
from keras_mgconv.layers import _arguments

DEFAULT_DATASET = "digits"

# Mirroring changes what these images show.
_NOT_FLIPPABLE = frozenset(
    {
        "digits",
        "mnist",
        "emnist",
        "kmnist",
        "svhn_cropped",
        "binary_alpha_digits",
        "mnist_corrupted",
        "omniglot",
    }
)

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

# TFDS' progress bars appear once a download or preparation has run this many
# seconds: a long one shows its progress, and one that fails at once (offline)
# says why in one line, not under a dozen empty bars.
_PROGRESS_DELAY = 3.0

# The most characters of a cause that an error quotes: requests' say which host
# could not be reached, and why, in about 300.
_CAUSE_LENGTH = 400


ImageDatasetInfo = collections.namedtuple(
    "ImageDatasetInfo",
    [
        "name",
        "image_shape",
        "num_classes",
        "train_split",
        "test_split",
        "num_examples",
        "flippable",
    ],
)
ImageDatasetInfo.__doc__ = """What a pipeline needs to know about a TFDS image dataset.

Attributes:
    name: the TFDS name.
    image_shape: (height, width, channels); height and width are None where
        the images vary in size.
    num_classes: number of labels.
    train_split: "train".
    test_split: the held-out split used for evaluation: "test" where the
        dataset has one with labels, else "validation" (imagenet2012's test
        images have no labels).
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
    except (AssertionError, ValueError) as error:
        # An unknown version, config or name syntax. TFDS' message starts with
        # its own call ("Failed to construct dataset ...: ") and may list
        # near matches on further lines; the clause in between says what is wrong.
        reason = str(error).split('": ', 1)[-1].splitlines()[0].split(". ")[0].rstrip(". :")
        raise ValueError(
            f"Invalid value for argument `dataset`: {reason}. TFDS names datasets "
            f"`name[/config][:version]`, e.g. 'cifar10:3.0.2'. Received: dataset={name!r}."
        ) from None


def _image_and_label(builder):
    features = builder.info.features
    supervised = builder.info.supervised_keys
    if (
        not supervised
        or len(supervised) != 2
        or not isinstance(features[supervised[0]], tfds.features.Image)
        or not isinstance(features[supervised[1]], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"Dataset {builder.name!r} is not an image classification dataset: it "
            f"needs an image feature and a class label as its supervised keys. "
            f"Received: dataset={builder.name!r} with features {features}."
        )
    return features[supervised[0]], features[supervised[1]]


def _is_prepared(builder):
    # TFDS warns when a dataset's folder has no dataset_info.json: news where
    # the folder is there, not where the dataset has never been prepared.
    return builder.data_path.exists() and builder.is_prepared()


@contextlib.contextmanager
def _preparation_lock(root, name):
    """Holds the lock on preparing dataset `name` in `root`, across processes and threads.

    TFDS prepares into a temporary folder and renames it: a second preparation
    at once fails on the rename. The lock file is removed on release; a waiter
    that then holds a lock on the removed file tries again.
    """
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f".{name}.lock")
    while True:
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(
                    f"Waiting for another process to finish preparing dataset {name!r} in {root}.",
                    file=sys.stderr,
                )
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    os.remove(path)
                return


def _folders(top):
    return {os.path.join(parent, name) for parent, names, _ in os.walk(top) for name in names}


@contextlib.contextmanager
def _removing_new_empty_folders(tops):
    """Removes the folders under `tops` (and `tops`) that the block made and left empty.

    Each failed TFDS download leaves empty folders behind: its temporary
    one, and the shared `downloads/extracted` where it had to create it.
    """
    before = set().union(*(_folders(top) | {top} for top in tops if os.path.isdir(top)))
    try:
        yield
    finally:
        for top in tops:
            for parent, _, _ in os.walk(top, topdown=False):
                if parent not in before and not os.listdir(parent):
                    os.rmdir(parent)


def _missing_folders(path):
    """`path` and those of its parents that do not exist, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


@contextlib.contextmanager
def _removing_additions_on_failure(folder):
    """If the block fails, removes every file and folder it added under `folder`.

    A failed preparation leaves files, not only folders: a dataset with configs
    writes `.config/metadata.json` before it downloads. Only the dataset's own
    folder is cleared so, under the preparation lock, which keeps any other
    preparation from writing there (other datasets share `downloads`).
    """
    before = _entries(folder)
    try:
        yield
    except BaseException:
        # Deepest first, so that each folder is empty when its turn comes.
        for path in sorted(_entries(folder) - before, key=len, reverse=True):
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.remove(path)
        raise


@contextlib.contextmanager
def _removing_created_folders_on_failure(created):
    """If the block fails, removes the `created` folders, deepest first, while they are empty."""
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise


def _entries(top):
    """Every file and folder under `top`, and `top`, as paths; empty if it does not exist."""
    if not os.path.lexists(top):
        return set()
    return {top} | {
        os.path.join(parent, name)
        for parent, folders, files in os.walk(top)
        for name in folders + files
    }


class _DelayedProgressBar(tqdm_utils.tqdm_lib.tqdm):
    """tqdm's bar, drawn only once its work has taken `_PROGRESS_DELAY` seconds.

    tqdm's own `delay` holds back only the draws of `update`: TFDS' bars are
    also refreshed explicitly, and closing one never drawn must print nothing.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("delay", _PROGRESS_DELAY)
        super().__init__(*args, **kwargs)

    def display(self, *args, **kwargs):
        start = getattr(self, "start_t", None)  # None while tqdm's __init__ draws.
        if start is None or self._time() - start < self.delay:
            return True
        # Drawn: `close` then ends the bar's line.
        self.last_print_t = max(self.last_print_t, start + self.delay)
        return super().display(*args, **kwargs)


@contextlib.contextmanager
def _quietly():
    """Delays TFDS' progress bars; hides its size lines and urllib3's warnings of retries.

    A download that fails says why in one line (`_prepare`); drawn before it,
    a dozen lines of empty progress bars and retries hid that line.
    """
    urllib3 = logging.getLogger("urllib3")
    level = urllib3.level
    urllib3.setLevel(logging.ERROR)
    try:
        with (
            mock.patch.object(tqdm_utils.tqdm_lib, "tqdm", _DelayedProgressBar),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            yield
    finally:
        urllib3.setLevel(level)


def _prepare(builder, name, manual_dir, announce_new_folder):
    """Downloads and prepares `builder`'s data (dataset `name`), quietly, or says why it cannot.

    One process or thread at a time prepares a dataset in a `data_dir`; the
    others wait and find it prepared. A failed preparation leaves nothing
    behind, the folders it created included; a successful one into a data
    directory that did not exist says so on stderr if `announce_new_folder`.
    """
    root = os.fspath(builder.data_dir_root)
    where = builder.data_dir
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    # A lock file needs a local folder; in a bucket (gs://...) there is none.
    local = "://" not in root
    lock = _preparation_lock(root, builder.name) if local else contextlib.nullcontext()
    created = _missing_folders(root) if local else []
    dataset_folder = os.path.join(root, builder.name)
    try:
        with (
            _removing_created_folders_on_failure(created),
            lock,
            _removing_additions_on_failure(dataset_folder),
            _removing_new_empty_folders([dataset_folder, os.path.join(root, "downloads")]),
        ):
            if _is_prepared(builder):
                return
            with mock.patch.object(downloader, "MAX_RETRIES", _DOWNLOAD_RETRIES), _quietly():
                builder.download_and_prepare(download_config=config)
        if created and announce_new_folder:
            # As TFDS does for a first download, a `data_dir` that does not
            # exist is created; but a mistyped one should not go unnoticed.
            print(
                f"Created {root}, the data directory (`data_dir`), which did not exist, "
                f"and prepared dataset {builder.name!r} in it.",
                file=sys.stderr,
            )
    except AssertionError as error:
        if "manual" not in str(error).lower():
            raise
        raise ValueError(
            f"Dataset {name!r} must be downloaded by hand: TFDS cannot "
            f"fetch it. Put its files in a folder and pass that as `manual_dir` "
            f"(`--manual-dir`), or prepare it once into `data_dir` "
            f"(`--data-dir`). Instructions: "
            f"{' '.join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())} "
            f"Received: dataset={name!r}, manual_dir={manual_dir!r}."
        ) from None
    except (requests.RequestException, tfds.download.DownloadError) as error:
        raise ValueError(
            f"Dataset {name!r} is not prepared in {where} and cannot be "
            f"downloaded ({_first_line(error)}). Prepare it on a machine with "
            f"network access (`tfds.load({name!r}, data_dir=...)`) and "
            f"pass that directory as `data_dir` (`--data-dir`), or put manually "
            f"downloaded files in `manual_dir` (`--manual-dir`). "
            f"Received: dataset={name!r}."
        ) from None
    except OSError as error:
        raise ValueError(
            f"Dataset {name!r} could not be prepared in {where}: "
            f"{_first_line(error)}. Received: dataset={name!r}, data_dir={root!r}."
        ) from None


def _first_line(error):
    """`error`'s type and the first line of its message, shortened at a word if long."""
    return ": ".join(
        [
            type(error).__name__,
            *(
                textwrap.shorten(line, _CAUSE_LENGTH, placeholder=" ...")
                for line in str(error).splitlines()[:1]
            ),
        ]
    )


def image_dataset_info(name, data_dir=None, manual_dir=None):
    """Prepares a TFDS image-classification dataset and describes it.

    The first call for a dataset downloads and prepares it into `data_dir`
    (TFDS' default `~/tensorflow_datasets` when None); `digits` needs no
    download. A `data_dir` that does not exist is created, as TFDS does, with
    a line on stderr that says so. A preparation that fails leaves nothing
    behind, neither files nor the folders it created.

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
    _image_and_label(builder)
    if not _is_prepared(builder):
        _prepare(builder, name, manual_dir, announce_new_folder=data_dir is not None)
        # Read afresh: another process may have prepared it while this one waited.
        builder = _builder(name, data_dir)
    image, label = _image_and_label(builder)
    splits = builder.info.splits
    if "train" not in splits:
        raise ValueError(
            f"Dataset {name!r} has no 'train' split. Received: dataset={name!r} "
            f"with splits {sorted(splits)}."
        )
    if "test" in splits and ("validation" not in splits or _has_labels(name, "test", data_dir)):
        test_split = "test"
    elif "validation" in splits:
        test_split = "validation"
    else:
        raise ValueError(
            f"Dataset {name!r} has neither a 'test' nor a 'validation' split to "
            f"evaluate on. Received: dataset={name!r} with splits {sorted(splits)}."
        )
    return ImageDatasetInfo(
        name=name,
        image_shape=tuple(image.shape),
        num_classes=label.num_classes,
        train_split="train",
        test_split=test_split,
        num_examples={split: splits[split].num_examples for split in splits},
        flippable=name.split("/")[0] not in _NOT_FLIPPABLE,
    )


class HeldOutSplit(collections.namedtuple("HeldOutSplit", ["split", "part", "fraction"])):
    """One part of a split divided into a fit part and a stratified validation part.

    Of each class's examples in `split`, a fixed choice of `fraction` (rounded
    to whole examples) is the "validation" part and the rest the "fit" part.
    The choice depends on the labels alone, neither on a seed nor on the
    process: every run, epoch and replica sees the same parts. Made by
    `validation_splits`; accepted wherever a split name is.

    Attributes:
        split: the TFDS split divided, e.g. "train".
        part: "fit" or "validation".
        fraction: the validation part's share of every class, in (0, 1).

    Raises:
        ValueError: for a `part` or `fraction` out of range.

    Example:

    >>> from keras_mgconv import data
    >>> str(data.HeldOutSplit("train", "validation", 0.1))
    "10% of 'train', stratified"
    """

    __slots__ = ()

    def __new__(cls, split, part, fraction):
        _arguments.choice("part", part, ("fit", "validation"))
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, numbers.Real)
            or not 0 < fraction < 1
        ):
            raise ValueError(
                f"Invalid value for argument `fraction`. Expected the validation "
                f"part's share of the split, a number strictly between 0 and 1. "
                f"Received: fraction={fraction!r}."
            )
        return super().__new__(cls, split, part, float(fraction))

    def __str__(self):
        percent = f"{self.fraction * 100:g}%"
        if self.part == "validation":
            return f"{percent} of {self.split!r}, stratified"
        return f"{self.split!r} less a stratified {percent} for validation"


def _read_config(seed):
    # Shared by every read of a split, so that unshuffled reads agree on the
    # order of its examples.
    return tfds.ReadConfig(
        shuffle_seed=seed, shuffle_reshuffle_each_iteration=False, try_autocache=False
    )


def _labels(name, split, data_dir):
    """A dataset of `split`'s labels in file order, read without decoding the images."""
    image_key = tfds.builder(name, data_dir=data_dir).info.supervised_keys[0]
    return tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        as_supervised=True,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=_read_config(None),
    ).map(lambda image, label: label)


@functools.lru_cache(maxsize=None)
def _has_labels(name, split, data_dir):
    # TFDS marks an unlabelled example, e.g. every imagenet2012 test image, with -1.
    return any(label >= 0 for label in tfds.as_numpy(_labels(name, split, data_dir).take(1)))


@functools.lru_cache(maxsize=None)
def _validation_mask(name, split, data_dir, fraction):
    """Whether each example of `split`, in file order, is in its validation part."""
    labels = np.concatenate(
        [np.zeros(0, np.int64), *tfds.as_numpy(_labels(name, split, data_dir).batch(1 << 16))]
    )
    validation = np.zeros(len(labels), bool)
    rng = np.random.default_rng(0)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        validation[rng.permutation(members)[: round(fraction * len(members))]] = True
    if validation.all() or not validation.any():
        raise ValueError(
            f"A stratified {fraction:g} of the {len(labels)} examples of {split!r} in "
            f"{len(np.unique(labels))} classes leaves the "
            f"{'fit' if validation.all() else 'validation'} part empty. "
            f"Received: fraction={fraction!r}."
        )
    validation.flags.writeable = False
    return validation


def _part_mask(name, split, data_dir):
    """Whether each example of `split.split`, in file order, is in the `HeldOutSplit` `split`."""
    validation = _validation_mask(name, split.split, data_dir, split.fraction)
    return validation if split.part == "validation" else ~validation


def validation_splits(name, data_dir=None, manual_dir=None, fraction=0.1):
    """A split to fit on and a split to validate on, both from the training data.

    The test split is then left to report on alone. The dataset's own
    "validation" split is the validation split where it has one that is not
    its test split; otherwise a fixed, stratified `fraction` of the train split
    is (see `HeldOutSplit`), and the rest of it is fitted on.

    Args:
        name: TFDS dataset name.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files (imagenet2012).
        fraction: the share of every class held out for validation where the
            dataset has no validation split of its own.

    Returns:
        `(fit_split, validation_split, description)`: two splits for
        `image_pipeline`, `normalization_layer` and `split_size`, and what the
        validation split is, in words.

    Raises:
        ValueError: for a `fraction` outside (0, 1) or one that leaves a part
            empty, or for an unknown or unavailable dataset.

    Example:

    >>> from keras_mgconv import data
    >>> fit, validation, description = data.validation_splits("digits")
    >>> description
    "10% of 'train', stratified"
    >>> data.split_size("digits", fit), data.split_size("digits", validation)
    (1299, 143)
    """
    validation = HeldOutSplit("train", "validation", fraction)
    info = image_dataset_info(name, data_dir, manual_dir)
    if "validation" in info.num_examples and info.test_split != "validation":
        return info.train_split, "validation", "validation"
    validation = validation._replace(split=info.train_split)
    # Reads the labels now, so that a fraction that leaves a part empty fails here.
    _validation_mask(name, validation.split, data_dir, validation.fraction)
    return validation._replace(part="fit"), validation, str(validation)


def split_size(name, split, data_dir=None, manual_dir=None):
    """The number of examples in a split.

    Args:
        name: TFDS dataset name.
        split: a TFDS split, e.g. "train" or "train[:90%]", or a `HeldOutSplit`.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files (imagenet2012).

    Returns:
        The number of examples, an int.

    Example:

    >>> from keras_mgconv import data
    >>> data.split_size("digits", "test"), data.split_size("digits", "train[:50%]")
    (355, 721)
    """
    image_dataset_info(name, data_dir, manual_dir)
    if isinstance(split, HeldOutSplit):
        return int(_part_mask(name, split, data_dir).sum())
    return tfds.builder(name, data_dir=data_dir).info.splits[split].num_examples


def _examples(name, split, data_dir, training, seed):
    """The (image, label) examples of a split or a `HeldOutSplit`, of known cardinality."""
    if not isinstance(split, HeldOutSplit):
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            shuffle_files=training,
            read_config=_read_config(seed),
        )
    # The parts are found by position, so the files are read in their order;
    # the shuffle buffer still shuffles the examples.
    examples = tfds.load(
        name,
        split=split.split,
        data_dir=data_dir,
        as_supervised=True,
        read_config=_read_config(seed),
    )
    keep = _part_mask(name, split, data_dir)
    keep_tensor = tf.constant(keep)
    return (
        examples.enumerate()
        .filter(lambda index, example: tf.gather(keep_tensor, index))
        .map(lambda index, example: example)
        .apply(tf.data.experimental.assert_cardinality(int(keep.sum())))
    )


def _target_shape(info, image_shape):
    """The (height, width, channels) images are brought to, checked against the dataset."""
    height, width, channels = info.image_shape
    if image_shape is None:
        if height is None or width is None:
            raise ValueError(
                f"Dataset {info.name!r} has images of varying size: pass `image_shape` "
                f"(`--image-size`) to choose the size the pipeline crops them to. "
                f"Received: image_shape=None."
            )
        return info.image_shape
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or any(
        not isinstance(d, (int, np.integer)) or d <= 0 for d in image_shape
    ):
        raise ValueError(
            f"`image_shape` must be (height, width, channels) of positive integers. "
            f"Received: image_shape={image_shape}."
        )
    if image_shape[2] != channels and {image_shape[2], channels} != {1, 3}:
        raise ValueError(
            f"Dataset {info.name!r} has {channels}-channel images, which cannot be "
            f"turned into {image_shape[2]}-channel ones (only grayscale and RGB "
            f"convert into each other). Received: image_shape={image_shape}."
        )
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
        tf.shape(image),
        bounding_boxes=tf.zeros((1, 0, 4)),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
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
                    image, height + 2 * padding, width + 2 * padding
                )
                image = tf.image.stateless_random_crop(image, image_shape, crop_seed)
        elif augment:
            image = _random_resized_crop(image, size, crop_seed)
        else:
            image = _center_crop(image, size)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return tf.ensure_shape(image, image_shape), label

    return preprocess


def image_pipeline(
    name,
    split,
    batch_size,
    training=False,
    image_shape=None,
    augment=None,
    data_dir=None,
    manual_dir=None,
    cache=None,
    shuffle_buffer=None,
    seed=None,
    drop_remainder=False,
    epochs=None,
):
    """A batched, prefetched `tf.data.Dataset` of (image, label) from TFDS.

    Args:
        name: TFDS dataset name.
        split: TFDS split, e.g. "train", "test", "train[:90%]", or a
            `HeldOutSplit` from `validation_splits`.
        batch_size: examples per batch (the global batch under tf.distribute);
            a larger batch than the split holds is the whole split, unless
            `drop_remainder`.
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
        ValueError: for an unknown or unavailable dataset, a split without
            examples, a non-positive batch size, an `image_shape` the images
            cannot be brought to, or a batch of images larger than this
            machine's memory.

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
    count = split_size(name, split, data_dir, manual_dir)
    if count == 0:
        raise ValueError(
            f"Split {split!r} of dataset {name!r} holds no examples. Received: split={split!r}."
        )
    if not drop_remainder:
        # A batch as large as the split is the whole split: tf.data would
        # allocate all of `batch_size` for it nonetheless.
        batch_size = min(batch_size, count)
    _check_batch_memory(batch_size, image_shape)
    examples = _examples(name, split, data_dir, training, seed)
    if cache is None:
        cache = _is_small(info) and count * int(np.prod(info.image_shape)) <= _CACHE_BYTES
    if cache:
        examples = examples.cache()
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    if training and epochs is not None:
        # Epochs with seeds of their own, not a reshuffling repeat():
        # tf.data's reshuffling state lives in the dataset, so the order would
        # depend on how many iterators anything has opened on it before.
        if not isinstance(epochs, range) or epochs.step != 1 or epochs.start < 0:
            raise ValueError(
                f"`epochs` must be a range of epoch numbers, e.g. range(3, 15). "
                f"Received: epochs={epochs!r}."
            )
        full_batches = count // batch_size * batch_size
        examples = _epochs(
            examples, epochs, _shuffle_buffer(shuffle_buffer, count), seed, full_batches
        )
        first_index = epochs.start * full_batches
    elif training:
        examples = examples.shuffle(
            _shuffle_buffer(shuffle_buffer, count), seed=seed, reshuffle_each_iteration=True
        )
        first_index = 0
    else:
        first_index = 0
    preprocess = _preprocess_function(info, image_shape, augment)
    # Stateless augmentation seeded by (seed, position in the stream).
    dataset = examples.enumerate(first_index).map(
        lambda index, example: preprocess(tf.stack([tf.constant(seed, tf.int64), index]), example),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    # The TFDS files are few; split the examples, not the files, across workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _check_batch_memory(batch_size, image_shape):
    """Refuses batches of images larger than this machine's memory.

    tf.data allocates a batch whole before it fills it: a batch that does not
    fit fails only after the allocator has retried for a while, and the
    model's activations take many times the images' memory anyway.
    """
    needed = batch_size * math.prod(image_shape) * np.dtype(np.float32).itemsize
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > memory:
        raise ValueError(
            f"A batch of {batch_size} images of {'x'.join(map(str, image_shape))} takes "
            f"{needed / 2**30:,.1f} GiB as float32, more than this machine's "
            f"{memory / 2**30:,.1f} GiB of memory: choose a smaller batch size or image "
            f"size. Received: batch_size={batch_size}, image_shape={tuple(image_shape)}."
        )


def _epochs(examples, epochs, shuffle_buffer, seed, full_batches):
    """`examples` epoch after epoch, each shuffled as `seed` and its number alone determine.

    One dataset, however many the epochs: the epochs are made as they are
    reached, each the first `full_batches` examples of a shuffle seeded from
    (`seed`, its number).
    """

    def epoch(number):
        # Dataset.shuffle pairs its seed with the graph-level one, and compares
        # the pair with (0, 0) in Python, which a tensor seed cannot take part in
        # unless the graph seed is not 0. This function's graph seed is set to 1
        # (in this graph only): the order depends on the epoch's seed alone.
        tf.random.set_seed(1)
        epoch_seed = tf.random.stateless_uniform(
            [],
            seed=tf.stack([tf.constant(seed, tf.int64), number]),
            minval=1,
            maxval=2**31 - 1,
            dtype=tf.int64,
        )
        return examples.shuffle(
            shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False
        ).take(full_batches)

    return (
        tf.data.Dataset.range(epochs.start, epochs.stop)
        .flat_map(epoch)
        .apply(tf.data.experimental.assert_cardinality(len(epochs) * full_batches))
    )


def _shuffle_buffer(shuffle_buffer, count):
    return shuffle_buffer or min(max(count, 1), 10_000)


def normalization_layer(
    name, image_shape=None, data_dir=None, manual_dir=None, max_images=10_000, split="train"
):
    """A `keras.layers.Normalization` with a training split's per-channel statistics.

    Mean and variance are computed over the first `max_images` images of
    `split` (rounded up to a batch of 256), brought to `image_shape` as for
    evaluation.
    The layer holds them as constants, so it can join a model built under any
    `tf.distribute` strategy.

    Args:
        name: TFDS dataset name.
        image_shape: as in `image_pipeline`.
        data_dir: TFDS data directory.
        manual_dir: folder of manually downloaded files.
        max_images: how many training images to average over.
        split: the split the images come from: "train", or the fit part
            from `validation_splits`.

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
    batches = image_pipeline(
        name,
        split,
        batch_size=256,
        image_shape=image_shape,
        data_dir=data_dir,
        manual_dir=manual_dir,
        cache=False,
    )
    statistics = keras.layers.Normalization(axis=-1)
    statistics.adapt(batches.take(-(-max_images // 256)).map(lambda image, label: image))
    return keras.layers.Normalization(
        axis=-1,
        mean=np.ravel(statistics.mean),
        variance=np.ravel(statistics.variance),
        name="normalization",
    )
