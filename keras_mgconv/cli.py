"""The `keras-mgconv` command.

    keras-mgconv train                       # multigrid ResNet20 on the embedded digits
    keras-mgconv train --model ResNet56 --dataset cifar10 --epochs 200 --width 2
    keras-mgconv train --design block        # the authors' block-level V-cycle
    keras-mgconv evaluate runs/ResNet20-multigrid-digits/best.keras --dataset digits
    keras-mgconv summary --filters 256 --group-size 16
    keras-mgconv export runs/ResNet20-multigrid-digits/best.keras --quantization int8 \
        --dataset digits
    keras-mgconv benchmark runs/ResNet20-multigrid-digits/best.int8.tflite
    keras-mgconv quantize runs/ResNet20-multigrid-digits/best.keras --dataset digits

`summary` prints a MultigridConv2D's level widths and its weights against a
Conv2D's; `export` writes a `.tflite` file and prints its report (size, ops,
agreement with the Keras model); `benchmark` prints its LiteRT latency;
`quantize` fine-tunes a quantization-aware copy under tf_keras and writes an
int8 `.tflite` file.
Bad arguments print one line and exit with status 2; an interrupted `train`
(Ctrl-C, or SIGTERM, which exits with status 143) says whether it can resume,
and resumes when it is run again with the same arguments. TensorFlow's info
and warning lines are left out unless TF_CPP_MIN_LOG_LEVEL is set.
"""

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading

from keras_mgconv import _environment, _tensorflow_logs


def _summary(args):
    # Imported here so that `keras-mgconv --help` answers without loading TensorFlow.
    import tensorflow as tf

    from keras_mgconv._keras import keras
    from keras_mgconv.layers import MultigridConv2D, _arguments

    layer = MultigridConv2D(
        args.filters,
        args.kernel_size,
        strides=args.strides,
        padding="same",
        group_size=args.group_size,
        coarsest_channels=args.coarsest_channels,
    )
    input_channels = args.filters if args.input_channels is None else args.input_channels
    _arguments.positive_int("input_channels", input_channels)
    input_shape = (None, None, None, input_channels)
    conv = keras.layers.Conv2D(args.filters, args.kernel_size, strides=args.strides)
    # Built in a graph of their own, whose variables are never initialized: the
    # weights are counted from their shapes, none allocated (a Conv2D of 2**20
    # filters would need 40 TB).
    with tf.Graph().as_default():
        layer.build(input_shape)
        conv.build(input_shape)
    print(
        f"MultigridConv2D({args.filters}, {args.kernel_size}, "
        f"group_size={args.group_size}) on {input_channels} input channels"
    )
    print(f"  levels (channels, finest first): {', '.join(map(str, layer.levels))}")
    connector = "none" if layer.connector is None else f"{layer.connector.groups} group(s)"
    print(f"  connector: {connector}")
    print(
        f"  parameters: {layer.count_params():,} "
        f"(Conv2D: {conv.count_params():,}, ratio {layer.count_params() / conv.count_params():.3f})"
    )


# What `--multigrid`/`--no-multigrid` and `--design` build, and the name of its output directory.
_RUN_NAMES = {False: "baseline", "layer": "multigrid", "block": "multigrid-block"}
_DESIGN_NAMES = {
    False: "baseline",
    "layer": "multigrid, layer design",
    "block": "multigrid, block design",
}


def _multigrid(args):
    """train's `multigrid` argument from --multigrid/--no-multigrid and --design."""
    if args.multigrid:
        return args.design or "layer"
    if args.design is not None:
        raise ValueError(
            f"`--design` chooses between multigrid designs: it cannot be combined with "
            f"--no-multigrid. Received: design={args.design!r}."
        )
    return False


def _train_output_dir(args):
    """train's --output-dir, or its default for the model, design and dataset."""
    if args.output_dir is not None:
        return args.output_dir
    return os.path.join("runs", f"{args.model}-{_RUN_NAMES[_multigrid(args)]}-{args.dataset}")


def _resume_hint(args):
    """What a `train` stopped midway leaves to resume, as the end of its last line."""
    if args.command != "train":
        return ""
    try:
        output_dir = _train_output_dir(args)
    except ValueError:
        return ""
    if os.path.exists(os.path.join(output_dir, "summary.json")):
        return ""  # A finished run, which --overwrite had not cleared yet.
    if not os.path.exists(os.path.join(output_dir, "last.keras")):
        return " No epoch had completed: there is nothing to resume."
    if args.overwrite:
        return " Run it again without --overwrite to resume from the last completed epoch."
    return " Run the same command again to resume from the last completed epoch."


def _require_tensorflow_backend(command):
    """`train`, `evaluate` and `export` read TFDS datasets through tf.data, distribute
    through tf.distribute and write TFLite: TensorFlow's."""
    from keras_mgconv._keras import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"`{command}` runs on Keras' TensorFlow backend (its TFDS pipelines, tf.distribute "
            f"strategies and TFLite export are TensorFlow's): unset KERAS_BACKEND, or fit the "
            f"models of keras_mgconv.models in your own script on {backend} (README: "
            f"Backends). Received: KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}."
        )


def _train(args):
    _require_tensorflow_backend("train")
    from keras_mgconv import training

    multigrid = _multigrid(args)
    output_dir = _train_output_dir(args)
    summary = training.train(
        model=args.model,
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        schedule=args.schedule,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        multigrid=multigrid,
        group_size=args.group_size,
        coarsest_channels=args.coarsest_channels,
        width=args.width,
        image_size=args.image_size,
        output_dir=output_dir,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        strategy=args.strategy,
        batch_norm_momentum=args.batch_norm_momentum,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        warmup_epochs=args.warmup_epochs,
        overwrite=args.overwrite,
    )
    print(
        f"{summary['model']} ({_DESIGN_NAMES[summary['multigrid']]}) on {summary['dataset']}: "
        f"{summary['parameters']:,} parameters, {summary['multiply_adds']:,} multiply-adds "
        f"per image. Test accuracy {summary['final_test_accuracy']:.4f} after the last epoch "
        f"({summary['final_test_accuracy_batch_statistics']:.4f} with batch statistics), "
        f"{summary['selected_test_accuracy']:.4f} after epoch {summary['selected_epoch']}, "
        f"the best.keras selected on the validation split ({summary['selected_by']}: "
        f"accuracy {summary['best_validation_accuracy']:.4f}). "
        f"{summary['train_time']:.1f} s of training. Written to {output_dir}"
    )
    if not summary["learned"]:
        print(
            f"keras-mgconv train: warning: the training accuracy ended at "
            f"{summary['final_train_accuracy']:.3f}, near chance "
            f"({1 / summary['num_classes']:.3f}): "
            f"the network did not learn. Try a lower --learning-rate or more "
            f"--warmup-epochs.",
            file=sys.stderr,
        )


def _evaluate(args):
    _require_tensorflow_backend("evaluate")
    from keras_mgconv import training

    result = training.evaluate(
        args.model_path,
        dataset=args.dataset,
        split=args.split,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
    )
    print(
        f"{args.model_path} on {args.dataset} ({result['split']}): "
        f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}"
    )


def _add_data_arguments(
    parser,
    dataset_default="digits",
    dataset_help="TFDS dataset name (default: the embedded offline 'digits')",
):
    """--dataset, --data-dir and --manual-dir."""
    parser.add_argument("--dataset", default=dataset_default, help=dataset_help)
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="folder of manually downloaded dataset files (imagenet2012)",
    )


def _export(args):
    _require_tensorflow_backend("export")
    from keras_mgconv import data, training
    from keras_mgconv.export import _min_group_filters, export_tflite
    from keras_mgconv.layers import _arguments

    # Checked before the model loads, which takes seconds to minutes.
    _arguments.positive_int("samples", args.samples)
    if args.image_size is not None:
        _arguments.positive_int("image_size", args.image_size)
    _min_group_filters(args.min_group_filters, args.quantization, args.lowering)
    model = training.load_model(args.model, "model")
    image_shape = model.input_shape[1:]
    if args.image_size is not None:
        image_shape = (args.image_size, args.image_size, image_shape[-1])
    representative = verification = None
    if args.dataset is not None:
        info = data.image_dataset_info(args.dataset, args.data_dir, args.manual_dir)

        def first_images(split):
            # Not cached: one batch is read, and a partly read cache warns.
            return data.image_pipeline(
                args.dataset,
                split,
                args.samples,
                image_shape=None if None in image_shape else image_shape,
                data_dir=args.data_dir,
                manual_dir=args.manual_dir,
                cache=False,
            ).take(1)

        representative = first_images(info.train_split)
        verification = first_images(info.test_split)
    suffix = args.quantization + "".join(
        f".{part}"
        for part, default in [
            (args.lowering, "grouped"),
            (args.pointwise, "auto"),
            (f"g{args.min_group_filters}", "gauto"),
        ]
        if part != default
    )
    output = args.output or f"{os.path.splitext(args.model)[0]}.{suffix}.tflite"
    report = export_tflite(
        model,
        output,
        None if args.quantization == "float32" else args.quantization,
        representative_data=representative,
        verification_data=verification,
        integer_io=args.integer_io,
        lowering=args.lowering,
        pointwise=args.pointwise,
        min_group_filters=args.min_group_filters,
        allow_flex_ops=args.allow_flex_ops,
        input_shape=None if args.image_size is None else image_shape,
    )
    print(report)


def _benchmark(args):
    from keras_mgconv.export import format_latency, measure_latency

    rows = measure_latency(
        args.model, threads=args.threads, repeats=args.repeats, warmup=args.warmup
    )
    print(
        f"{args.model}: LiteRT latency, batch 1, {args.repeats} invokes after {args.warmup} warm-up"
    )
    print(format_latency(rows))


def _check_quantize_arguments(args):
    """quantize's arguments, checked before TensorFlow works (in both processes)."""
    from keras_mgconv.layers import _arguments

    if not os.path.isfile(args.model) or not args.model.endswith(".keras"):
        raise ValueError(
            f"`model` must be an existing .keras file. Received: model={args.model!r}."
        )
    for name in ("epochs", "batch_size", "calibration_batches"):
        _arguments.positive_int(name, getattr(args, name))
    if args.steps_per_epoch is not None:
        _arguments.positive_int("steps_per_epoch", args.steps_per_epoch)
    if not args.learning_rate > 0:
        raise ValueError(
            f"`learning_rate` must be positive. Received: learning_rate={args.learning_rate!r}."
        )


# What `quantize` needs of keras-mgconv[optimization]: tfmot, and the Keras 2 it runs on.
_OPTIMIZATION_PACKAGES = ("tf_keras", "tensorflow_model_optimization")


def _quantize_argv(args):
    """The command line of `args`, for the tf_keras process."""
    argv = [
        "quantize",
        args.model,
        "--dataset",
        args.dataset,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--learning-rate",
        repr(args.learning_rate),
        "--calibration-batches",
        str(args.calibration_batches),
    ]
    for option, value in (
        ("--steps-per-epoch", args.steps_per_epoch),
        ("--output", args.output),
        ("--data-dir", args.data_dir),
        ("--manual-dir", args.manual_dir),
    ):
        if value is not None:
            argv += [option, str(value)]
    return argv


def _quantize(args):
    _check_quantize_arguments(args)
    if not _environment.uses_legacy_keras():
        from keras_mgconv import training

        # Read here, where Keras 3 reads it as `evaluate` and `export` do: a damaged
        # file is one line, before the other process starts.
        training.load_model(args.model, "model")
        for package in _OPTIMIZATION_PACKAGES:
            if importlib.util.find_spec(package) is None:
                raise ModuleNotFoundError(f"No module named {package!r}", name=package)
        # tfmot runs only on tf_keras, which TensorFlow selects when it is
        # imported: the work runs in a process of its own that selects it.
        environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
        if environment.get(_environment.LOG_LEVEL) == "2":
            # This command's own choice: the other process makes it again, and
            # then hides TensorFlow's start-up lines too.
            del environment[_environment.LOG_LEVEL]
        code = subprocess.call(
            [sys.executable, "-m", "keras_mgconv.cli", *_quantize_argv(args)], env=environment
        )
        if code:
            # It has said why, in one line, as this command would have.
            raise SystemExit(code)
        return
    _require_tensorflow_backend("quantize")
    import numpy as np

    from keras_mgconv import data, optimization
    from keras_mgconv._keras import keras
    from keras_mgconv.export import predict_tflite

    model = optimization.load_model(args.model)
    info = data.image_dataset_info(args.dataset, args.data_dir, args.manual_dir)
    image_shape = model.input_shape[1:]

    def pipeline(split, batch_size, **kwargs):
        return data.image_pipeline(
            args.dataset,
            split,
            batch_size,
            image_shape=None if None in image_shape else image_shape,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            **kwargs,
        )

    train = pipeline(info.train_split, args.batch_size, training=True, seed=0)
    steps = args.steps_per_epoch or int(train.cardinality())
    if args.steps_per_epoch is not None:
        train = train.repeat()
    images, labels = (
        np.concatenate(arrays)
        for arrays in zip(
            *((batch.numpy(), label.numpy()) for batch, label in pipeline(info.test_split, 256))
        )
    )

    def accuracy(keras_model):
        # Called eagerly: tracing evaluate's function costs more than the batches.
        outputs = np.concatenate(
            [
                keras_model(images[start : start + 256], training=False)
                for start in range(0, len(images), 256)
            ]
        )
        return float(np.mean(np.argmax(outputs, -1) == labels))

    float_accuracy = accuracy(model)
    # Not cached: a few batches are read, and a partly read cache warns.
    calibration = pipeline(info.train_split, args.batch_size, cache=False).take(
        args.calibration_batches
    )
    qat_model = optimization.quantize_model(model, calibration_data=calibration)
    output_activation = getattr(model.layers[-1], "activation", None)
    qat_model.compile(
        keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(args.learning_rate, args.epochs * steps)
        ),
        keras.losses.SparseCategoricalCrossentropy(
            from_logits=getattr(output_activation, "__name__", None) != "softmax"
        ),
        metrics=["accuracy"],
    )
    qat_model.fit(
        train, epochs=args.epochs, steps_per_epoch=steps, verbose=1 if sys.stdout.isatty() else 2
    )
    output = args.output or f"{os.path.splitext(args.model)[0]}.qat.int8.tflite"
    report = optimization.export_int8(qat_model, output, verification_data=images)
    int8_accuracy = float(np.mean(np.argmax(predict_tflite(output, images), -1) == labels))
    print(
        f"{args.model} on {args.dataset}: quantization-aware fine-tuning, {args.epochs} "
        f"epoch(s) of {steps} steps (Adam, learning rate {args.learning_rate:g}, batch "
        f"{args.batch_size}). Test accuracy on {len(images)} images: float "
        f"{float_accuracy:.4f}, QAT {accuracy(qat_model):.4f}, int8 LiteRT "
        f"{int8_accuracy:.4f}."
    )
    print(report)


def _add_quantize_command(commands):
    quantize = commands.add_parser(
        "quantize",
        help="quantization-aware fine-tuning (tfmot, under tf_keras), then an "
        "int8 .tflite file and its report",
        description="Load a .keras classifier (as `train` writes it) into tf_keras, "
        "fine-tune its quantization-aware copy on the dataset's train split, "
        "convert it to a .tflite file whose weights and activations are int8, "
        "and report the test accuracy of the float, QAT and int8 models. "
        "Runs under tf_keras in a process of its own.",
    )
    quantize.add_argument("model", metavar="MODEL", help="a .keras file")
    _add_data_arguments(quantize)
    quantize.add_argument("--epochs", type=int, default=3)
    quantize.add_argument(
        "--steps-per-epoch", type=int, default=None, help="default: the whole train split"
    )
    quantize.add_argument("--batch-size", type=int, default=64)
    quantize.add_argument(
        "--learning-rate",
        type=float,
        default=1e-4,
        help="Adam's, decaying to 0 over the run (default 1e-4)",
    )
    quantize.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="train batches that start the activation ranges (default 8)",
    )
    quantize.add_argument(
        "--output",
        default=None,
        help="the .tflite file (default: MODEL's name with .qat.int8.tflite)",
    )
    quantize.set_defaults(run=_quantize)


def _auto_or_int(value):
    """An argparse type: "auto" or an int (export_tflite checks its range)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int, got {value!r}") from None


def _add_export_commands(commands):
    export = commands.add_parser(
        "export", help="convert a .keras model to TFLite, verify it against Keras, report"
    )
    export.add_argument("model", metavar="MODEL", help="a .keras file")
    export.add_argument(
        "--quantization", default="float32", choices=["float32", "float16", "dynamic_range", "int8"]
    )
    _add_data_arguments(
        export,
        dataset_default=None,
        dataset_help="TFDS dataset whose train split calibrates int8 and whose test split "
        "verifies (default: random verification inputs)",
    )
    export.add_argument(
        "--samples", type=int, default=500, help="images taken from each split (default 500)"
    )
    export.add_argument(
        "--output",
        default=None,
        help="the .tflite file (default: MODEL's name with "
        ".QUANTIZATION[.split][.POINTWISE][.gMIN_GROUP_FILTERS].tflite)",
    )
    export.add_argument(
        "--lowering",
        default="grouped",
        choices=["grouped", "split"],
        help="split: per-group CONV_2Ds, for runtimes without XNNPACK",
    )
    export.add_argument(
        "--pointwise",
        default="auto",
        choices=["auto", "dense", "cycle"],
        help="1x1 multigrid layers as their cycle's matrix where it runs faster "
        "(auto), always (dense), or never (cycle: the smallest file)",
    )
    export.add_argument(
        "--min-group-filters",
        type=_auto_or_int,
        default="auto",
        help="merge neighbouring groups of grouped convolutions until each has "
        "this many filters: the same function, faster in int8 on x86 "
        "(default auto: 16 in int8, else 1, the groups as trained)",
    )
    export.add_argument(
        "--integer-io",
        action="store_true",
        help="with int8: int8 inputs and outputs instead of float32",
    )
    export.add_argument(
        "--allow-flex-ops",
        action="store_true",
        help="allow TensorFlow (Flex) ops where TFLite has no builtin",
    )
    export.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="for a model that takes images of any size: the square size "
        "to convert it for (default: the dataset's)",
    )
    export.set_defaults(run=_export)
    benchmark = commands.add_parser(
        "benchmark", help="LiteRT latency of a .tflite model, XNNPACK on and off"
    )
    benchmark.add_argument("model", metavar="MODEL", help="a .tflite file")
    benchmark.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    benchmark.add_argument("--repeats", type=int, default=100)
    benchmark.add_argument("--warmup", type=int, default=10)
    benchmark.set_defaults(run=_benchmark)


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-mgconv", description="Multigrid-in-channels convolutional networks for Keras."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser(
        "summary", help="show a MultigridConv2D's hierarchy and parameters against Conv2D"
    )
    summary.add_argument("--filters", type=int, default=256)
    summary.add_argument("--kernel-size", type=int, default=3)
    summary.add_argument("--strides", type=int, default=1)
    summary.add_argument("--group-size", type=int, default=16)
    summary.add_argument("--coarsest-channels", type=int, default=None)
    summary.add_argument(
        "--input-channels", type=int, default=None, help="input width (default: --filters)"
    )
    summary.set_defaults(run=_summary)

    train = commands.add_parser(
        "train",
        help="train a multigrid or baseline network on a TFDS dataset",
        description="Train a model with model.fit on the training data less a validation "
        "split, whose accuracy selects best.keras; the test split is evaluated "
        "after training, only to report. Writes best.keras, last.keras, "
        "history.csv, TensorBoard logs and summary.json to --output-dir; "
        "rerun the same command to resume an interrupted run.",
    )
    train.add_argument(
        "--model",
        default="ResNet20",
        help="factory name (default ResNet20): "
        "ResNet20/32/44/56/110, ResNet18/34/50, MobileNetV2, "
        "MobileNetV3Small/Large",
    )
    _add_data_arguments(train)
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument("--batch-size", type=int, default=64, help="global batch size")
    train.add_argument("--learning-rate", type=float, default=0.1)
    train.add_argument("--schedule", default="cosine", help="cosine, step or constant")
    train.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="epochs of linear learning-rate warm-up first (default 2, at most "
        "a fifth of --epochs; 0: none)",
    )
    train.add_argument("--optimizer", default="sgd", help="sgd (Nesterov), adam or adamw")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument(
        "--multigrid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-multigrid trains the baseline network",
    )
    train.add_argument(
        "--design",
        choices=["layer", "block"],
        default=None,
        help="the multigrid design: layer (default), a MultigridConv2D in place "
        "of every block convolution; block, the authors' V-cycle over each "
        "residual block (ResNets)",
    )
    train.add_argument(
        "--group-size", type=int, default=None, help="multigrid group size (default: the factory's)"
    )
    train.add_argument(
        "--coarsest-channels",
        type=int,
        default=None,
        help="widest coarsest level of the multigrid layers, and widest "
        "block convolution that stays dense (default: the factory's, 32)",
    )
    train.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    train.add_argument(
        "--image-size", type=int, default=None, help="resize images to this square size"
    )
    train.add_argument(
        "--batch-norm-momentum",
        type=float,
        default=None,
        help="default: chosen from the steps per epoch",
    )
    train.add_argument(
        "--strategy",
        default="default",
        help="default, mirrored, multi_worker (from TF_CONFIG) or tpu",
    )
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="stratified share of the train split that selects best.keras, "
        "where the dataset has no validation split (default 0.1); the "
        "test split is only reported on",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--output-dir",
        default=None,
        help="default: runs/MODEL-multigrid|multigrid-block|baseline-DATASET",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a finished or unfinished run in --output-dir: its "
        "files and the .tflite files exported from its models (other "
        "files stay)",
    )
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved .keras classifier")
    evaluate.add_argument("model_path", help="a .keras file, e.g. runs/.../best.keras")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--split", default=None, help="default: the test split")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.set_defaults(run=_evaluate)

    _add_export_commands(commands)
    _add_quantize_command(commands)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM (`kill`, a scheduler's stop) unwinds as Ctrl-C does.

    Its locks are released and its temporary files removed on the way out,
    and it says so. Left alone where a handler is installed already, or off
    the main thread, where none can be.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _import_keras():
    """Imports the package's Keras (and with it TensorFlow), without TensorFlow's start-up lines.

    Those come from its libraries as they load, before they read
    TF_CPP_MIN_LOG_LEVEL; they are left out only where the command chose the
    level, not where the user did.
    """
    if _environment.quiet_command_line_logs():
        with _tensorflow_logs.hidden(_tensorflow_logs.startup_line):
            importlib.import_module("keras_mgconv._keras")


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_unwinds():
            _import_keras()
            args.run(args)
    except ValueError as error:
        parser.exit(2, f"keras-mgconv {args.command}: error: {_one_line(error)}\n")
    except ModuleNotFoundError as error:
        # Keras imports the package of the backend KERAS_BACKEND names, e.g. jax.
        backend = os.environ.get("KERAS_BACKEND")
        package = (error.name or "").split(".")[0]
        cause = ""
        if package == backend:
            cause = (
                f" KERAS_BACKEND={backend!r} selects Keras' backend of that name: "
                f"install it, or unset KERAS_BACKEND to use TensorFlow."
            )
        elif package in _OPTIMIZATION_PACKAGES:
            cause = (
                " `quantize` runs tensorflow-model-optimization under tf_keras: "
                "install keras-mgconv[optimization] "
                '(pip install "keras-mgconv[optimization]").'
            )
        parser.exit(
            1,
            f"keras-mgconv {args.command}: error: the Python package "
            f"{error.name!r} is not installed.{cause}\n",
        )
    except OSError as error:
        # A file or folder that cannot be written or read midway, e.g. a full disk
        # or an output directory made read-only.
        parser.exit(
            1, f"keras-mgconv {args.command}: error: {_one_line(error)}.{_resume_hint(args)}\n"
        )
    except KeyboardInterrupt:
        parser.exit(130, f"keras-mgconv {args.command}: interrupted.{_resume_hint(args)}\n")
    except _Terminated:
        # 128 + 15, the status of a process that SIGTERM ended.
        parser.exit(
            143, f"keras-mgconv {args.command}: terminated (SIGTERM).{_resume_hint(args)}\n"
        )
    return 0


def _one_line(error):
    return " ".join(line.strip() for line in str(error).splitlines())


if __name__ == "__main__":
    sys.exit(main())
