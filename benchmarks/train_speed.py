"""Training-step time of multigrid networks against the networks they replace.

Each row compares a multigrid model with its baseline (standard convolutions,
same code otherwise) on the same batch, loss and optimizer: the package's
training defaults (SGD with Nesterov momentum 0.9 and weight decay 5e-4, sparse
categorical cross-entropy, `jit_compile=False`), batch 64, on whatever device
the backend picks (the CPU here). Times are medians of repeated `train_on_batch`
calls after warm-up. The models of a group (a baseline and the multigrid models
compared with it) are timed in turns, one step each, so that background load
falls on both sides alike; the ratios are the figures to trust, the absolute
times depend on the machine and its load. The process CPU time of the same steps
is recorded beside the wall time: on a machine shared with other work it
varies less, since time spent waiting for a core is not counted.

Rows: MultigridConv2D against Conv2D (k=3, same width in and out, 32x32 inputs,
mean squared error on random targets); CIFAR ResNet20 and ResNet56 at widths
1x, 2x and 4x; ResNet18 on 32x32 inputs; MobileNetV2 alpha 1.0 on 96x96 inputs.
Beside each time ratio stands the multiply-add ratio, the speed-up that
perfectly efficient kernels would give.

    python benchmarks/train_speed.py                  # every row
    python benchmarks/train_speed.py --quick          # fewer steps, for iterating
    python benchmarks/train_speed.py --only 'Conv2D 256' ResNet20
    python benchmarks/train_speed.py --intra-op-threads 1   # one thread per op
    python benchmarks/train_speed.py --backend jax    # Keras 3 on JAX (or torch)
    python benchmarks/train_speed.py --keras-first    # `import keras` before keras_mgconv
    python benchmarks/train_speed.py --only ResNet20 --profile   # where the time goes

Beside the ratios stand the ops of each forward pass (TensorFlow: the traced
graph's computing ops, without variable reads, constants and identities).
`--profile` (TensorFlow) runs a few more steps of every row under
TensorFlow's profiler and prints the ops that take the most time, summed over
the threads that ran them, by kind: the role of the layer they belong to (a
V-cycle's restriction, prolongation, smoother, coarsest level or connector, or
anything else) and the TensorFlow op, forward and gradient apart.

`--backend` chooses Keras 3's backend (KERAS_BACKEND) for the whole run, before
Keras is imported; results then go to train_speed_<backend>.json unless
`--output` says otherwise. The TensorFlow run is the default. `--keras-first`
imports Keras, and with it TensorFlow, before keras_mgconv, as most scripts do:
then TensorFlow has chosen oneDNN before the package could turn it on (on a CPU
where it would stay off: `TF_ENABLE_ONEDNN_OPTS=0` shows that case anywhere).

Writes benchmarks/results/train_speed.json and .md (or `--output`) and prints
the markdown table.
"""

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")


def _backend_from_command_line(argv):
    """The `--backend` value, read before Keras is imported (argparse validates it later)."""
    for index, argument in enumerate(argv):
        if argument.startswith("--backend="):
            return argument.split("=", 1)[1]
        if argument == "--backend" and index + 1 < len(argv):
            return argv[index + 1]
    return None


if _backend_from_command_line(sys.argv[1:]) in BACKENDS:
    os.environ["KERAS_BACKEND"] = _backend_from_command_line(sys.argv[1:])
if "--keras-first" in sys.argv[1:]:
    import keras  # noqa: F401 (the order most scripts use: TensorFlow loads first)

import keras_mgconv  # noqa: E402 (after the backend is chosen)
from keras_mgconv import models, training  # noqa: E402
from keras_mgconv._keras import keras  # noqa: E402
from machine import cpu_description  # noqa: E402

LAYER_WIDTHS = (128, 256, 512)
LAYER_GROUP_SIZES = (8, 16, 32)
CLASSES = 10
# Beside the factories' defaults (group size 8, layers of 32 channels or fewer
# dense), the ResNets at 1x are also timed with their coarsest level at the
# group size, at group sizes 8 and 16: smaller networks, the factories'
# defaults before (benchmarks/accuracy.py measures the accuracy of all three).
COARSEST_AT_GROUP_SIZE = (
    (" s=8 c=8", {"group_size": 8, "coarsest_channels": 8}),
    (" s=16 c=16", {"group_size": 16, "coarsest_channels": 16}),
)


def _layer_group(width, group_sizes):
    """Conv2D of `width` and one MultigridConv2D per group size, on 32x32 inputs."""

    def layer_model(layer):
        return keras.Sequential([keras.Input((32, 32, width)), layer])

    return {
        "baseline": ("Conv2D", lambda: layer_model(keras.layers.Conv2D(width, 3, padding="same"))),
        "rows": [
            (
                f"MultigridConv2D {width}, group size {s}",
                lambda s=s: layer_model(
                    keras_mgconv.MultigridConv2D(width, 3, padding="same", group_size=s)
                ),
            )
            for s in group_sizes
            if width % s == 0 and width > s
        ],
        "input_shape": (32, 32, width),
        "loss": "mse",
    }


def _model_group(name, factory, input_shape, variants=(("", {}),), steps_per_execution=1, **kwargs):
    """The baseline and one multigrid row per `(name suffix, factory arguments)` of `variants`.

    With `steps_per_execution` > 1 each timing is one `fit` epoch of that many
    steps in one call of the compiled function, as `keras_mgconv.training.train`
    runs them, divided by the steps.
    """

    def build(multigrid, **variant):
        return factory(
            input_shape=input_shape, classes=CLASSES, multigrid=multigrid, **kwargs, **variant
        )

    return {
        "baseline": ("baseline", lambda: build(False)),
        "rows": [
            (name + suffix, lambda variant=variant: build(True, **variant))
            for suffix, variant in variants
        ],
        "input_shape": input_shape,
        "loss": "sparse_categorical_crossentropy",
        "steps_per_execution": steps_per_execution,
    }


def benchmark_groups():
    """Every group of the benchmark, in table order."""
    groups = [_layer_group(width, LAYER_GROUP_SIZES) for width in LAYER_WIDTHS]
    for depth, factory in ((20, models.ResNet20), (56, models.ResNet56)):
        for width in (1, 2, 4):
            variants = (("", {}),) + COARSEST_AT_GROUP_SIZE * (width == 1)
            groups.append(
                _model_group(f"ResNet{depth} {width}x", factory, (32, 32, 3), variants, width=width)
            )
    # The 8x8 digits' shape, where per-step overhead rather than arithmetic dominates.
    groups.append(
        _model_group(
            "ResNet20 1x 8x8",
            models.ResNet20,
            (8, 8, 1),
            (("", {}),) + COARSEST_AT_GROUP_SIZE,
            steps_per_execution=20,
        )
    )
    groups.append(_model_group("ResNet18 32x32", models.ResNet18, (32, 32, 3)))
    groups.append(_model_group("MobileNetV2 1.0 96x96", models.MobileNetV2, (96, 96, 3), alpha=1.0))
    return groups


def _compiled(build, loss, steps_per_execution=1):
    model = build()
    # Only the training steps are timed: no statistics recomputed after `fit`.
    model.batch_norm_statistics_batches = 0
    model.compile(
        optimizer=training._optimizer("sgd", 0.1, momentum=0.9, weight_decay=5e-4),
        loss=loss,
        jit_compile=False,
        steps_per_execution=steps_per_execution,
    )
    return model


def _step(model, inputs, targets, batch_size):
    """One timed unit: a `train_on_batch`, or a `fit` epoch over `inputs` (`batch_size`)."""
    if len(inputs) == batch_size:
        model.train_on_batch(inputs, targets)
    else:
        model.fit(inputs, targets, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)


def _batch(group, batch_size, model):
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((batch_size, *group["input_shape"]), dtype=np.float32)
    if group["loss"] == "mse":
        targets = rng.standard_normal((batch_size, *model.output_shape[1:]), dtype=np.float32)
    else:
        targets = rng.integers(0, CLASSES, batch_size)
    return inputs, targets


def time_group(group, names, batch_size, repeats, warmup, profile=False):
    """Median step times of the group's baseline and of its rows named in `names`."""
    entries = [group["baseline"], *[row for row in group["rows"] if row[0] in names]]
    steps = group.get("steps_per_execution", 1)
    compiled = [_compiled(build, group["loss"], steps) for _, build in entries]
    inputs, targets = _batch(group, batch_size, compiled[0])
    # A fit epoch of `steps` batches, built once, outside the timings.
    epoch = (np.concatenate([inputs] * steps), np.concatenate([targets] * steps))
    for model in compiled:
        for _ in range(warmup):
            _step(model, *epoch, batch_size)
    times = [[] for _ in compiled]
    cpu_times = [[] for _ in compiled]
    for _ in range(repeats):
        for model, model_times, model_cpu_times in zip(compiled, times, cpu_times):
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(model, *epoch, batch_size)
            model_cpu_times.append((time.process_time() - cpu_start) / steps)
            model_times.append((time.perf_counter() - start) / steps)
    figures = [
        {
            "params": model.count_params(),
            "multiply_adds": keras_mgconv.count_multiply_adds(model),
            "train_step_s": statistics.median(model_times),
            "train_step_cpu_s": statistics.median(model_cpu_times),
            "train_step_times_s": model_times,
            "forward_ops": forward_ops(model, group["input_shape"]),
            **({"profile": op_profile(model, inputs, targets)} if profile else {}),
        }
        for model, model_times, model_cpu_times in zip(compiled, times, cpu_times)
    ]
    baseline = figures[0]
    rows = []
    for (name, _), multigrid in zip(entries[1:], figures[1:]):
        row = {
            "name": name,
            "baseline_name": entries[0][0],
            "baseline": baseline,
            "multigrid": multigrid,
        }
        for key in ("params", "multiply_adds", "train_step_s", "train_step_cpu_s"):
            row[f"{key}_ratio"] = multigrid[key] / baseline[key]
        rows.append(row)
    return rows


# Ops that compute nothing: variable reads, constants, identities, placeholders.
_BOOKKEEPING_OPS = {
    "Const",
    "Identity",
    "ReadVariableOp",
    "NoOp",
    "Placeholder",
    "VarHandleOp",
    "IdentityN",
    "StopGradient",
}
_ROLES = ("restriction", "prolongation", "smoother", "coarsest", "connector")


def forward_ops(model, input_shape):
    """The computing ops of one forward pass in training mode (TensorFlow), or None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    graph = (
        tf.function(lambda x: model(x, training=True))
        .get_concrete_function(tf.TensorSpec((None, *input_shape), tf.float32))
        .graph
    )
    return sum(op.type not in _BOOKKEEPING_OPS for op in graph.get_operations())


def op_profile(model, inputs, targets, steps=3, top=8):
    """The kinds of op that take the most time in `steps` training steps (TensorFlow).

    Returns:
        [(kind, ms per step, share of all op time)], longest first, `top` of them;
        a kind is "role op-type", with "gradient" before it for backward ops.
    """
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as directory:
        tf.profiler.experimental.start(directory)
        for _ in range(steps):
            model.train_on_batch(inputs, targets)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0], "rb") as file:
            space.ParseFromString(file.read())
    totals = {}
    for plane in space.planes:
        names = {key: value.name for key, value in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # "path:OpType" are ops; "ExecutorState::Process" and the
                # like are the executor's spans around them.
                if ":" not in name or "::" in name:
                    continue
                path, op_type = name.rsplit(":", 1)
                if op_type in _BOOKKEEPING_OPS:
                    continue
                role = next((role for role in _ROLES if role in path), "other")
                kind = f"{'gradient ' if 'gradient' in path else ''}{role} {op_type}"
                totals[kind] = totals.get(kind, 0) + event.duration_ps
    everything = sum(totals.values()) or 1
    return [
        (kind, duration / 1e9 / steps, duration / everything)
        for kind, duration in sorted(totals.items(), key=lambda item: -item[1])[:top]
    ]


def profile_lines(rows):
    lines = []
    for row in rows:
        for side in ("multigrid", "baseline"):
            if "profile" not in row[side]:
                continue
            name = row["name"] if side == "multigrid" else f"{row['name']} baseline"
            lines.append(
                f"- {name}: "
                + "; ".join(
                    f"{kind} {ms:.1f} ms ({100 * share:.0f}%)"
                    for kind, ms, share in row[side]["profile"]
                )
            )
    return "\n".join(lines)


def markdown_table(rows):
    lines = [
        "| row | multigrid ms | baseline ms | time ratio | CPU-time ratio "
        "| multiply-add ratio | params ratio | forward ops (baseline) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['multigrid']['train_step_s'] * 1e3:.1f} "
            f"| {row['baseline']['train_step_s'] * 1e3:.1f} ({row['baseline_name']}) "
            f"| {row['train_step_s_ratio']:.2f} | {row['train_step_cpu_s_ratio']:.2f} "
            f"| {row['multiply_adds_ratio']:.3f} "
            f"| {row['params_ratio']:.3f} "
            f"| {row['multigrid']['forward_ops']} ({row['baseline']['forward_ops']}) |"
        )
    return "\n".join(lines)


def machine_description():
    backend = keras.backend.backend()
    version = importlib.import_module(backend).__version__
    return f"{cpu_description()}, Keras {keras.__version__} on {backend} {version}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PATTERN",
        help="run only the rows whose name matches one of these "
        "regular expressions (case-insensitive)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 timed steps after 1 warm-up step, for iterating"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="threads inside one operation (0: TensorFlow's choice; TensorFlow only)",
    )
    parser.add_argument(
        "--inter-op-threads",
        type=int,
        default=0,
        help="operations run at once (0: TensorFlow's choice; TensorFlow only)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="tensorflow",
        help="Keras 3's backend for the whole run (default: tensorflow)",
    )
    parser.add_argument(
        "--keras-first",
        action="store_true",
        help="import Keras before keras_mgconv (read before any import)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the kinds of op that take the most time (TensorFlow)",
    )
    parser.add_argument(
        "--output",
        help=(
            "JSON file, the markdown table beside it with the suffix .md (default: "
            "results/train_speed.json, or train_speed_<backend>.json for another backend)"
        ),
    )
    args = parser.parse_args(argv)
    if keras.backend.backend() != args.backend:
        parser.error(
            f"--backend {args.backend} must be chosen before Keras is imported, "
            f"on the command line of this script; Keras runs on "
            f"{keras.backend.backend()}"
        )
    if args.output is None:
        suffix = "" if args.backend == "tensorflow" else f"_{args.backend}"
        args.output = os.path.join(
            os.path.dirname(__file__), "results", f"train_speed{suffix}.json"
        )
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    if args.backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    elif args.profile:
        parser.error(f"--profile reads TensorFlow's profiler. Received: --backend {args.backend}.")
    elif args.intra_op_threads or args.inter_op_threads:
        parser.error(
            "--intra-op-threads and --inter-op-threads set TensorFlow's thread "
            f"pools; Received: --backend {args.backend}."
        )

    rows = []
    for group in benchmark_groups():
        names = [
            name
            for name, _ in group["rows"]
            if not args.only
            or any(re.search(pattern, name, re.IGNORECASE) for pattern in args.only)
        ]
        if not names:
            continue
        for row in time_group(group, names, args.batch_size, repeats, warmup, args.profile):
            rows.append(row)
            print(
                f"{row['name']}: {row['multigrid']['train_step_s'] * 1e3:.1f} ms vs "
                f"{row['baseline']['train_step_s'] * 1e3:.1f} ms "
                f"({row['train_step_s_ratio']:.2f}x, CPU time "
                f"{row['train_step_cpu_s_ratio']:.2f}x, multiply-adds "
                f"{row['multiply_adds_ratio']:.3f}x)",
                flush=True,
            )
        keras.backend.clear_session()

    result = {
        "machine": machine_description(),
        "backend": args.backend,
        "batch_size": args.batch_size,
        "intra_op_threads": args.intra_op_threads,
        "inter_op_threads": args.inter_op_threads,
        "repeats": repeats,
        "warmup": warmup,
        "keras_first": args.keras_first,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "rows": rows,
    }
    table = markdown_table(rows)
    threads = (
        ", ".join(
            f"{name}-op threads {count}"
            for name, count in (("intra", args.intra_op_threads), ("inter", args.inter_op_threads))
            if count
        )
        or "the backend's default threads"
    )
    settings = [threads]
    if args.backend == "tensorflow" and result["TF_ENABLE_ONEDNN_OPTS"] is not None:
        settings.append(f"TF_ENABLE_ONEDNN_OPTS={result['TF_ENABLE_ONEDNN_OPTS']}")
    if args.keras_first:
        settings.append("Keras imported before keras_mgconv")
    header = (
        f"{result['machine']}; {'; '.join(settings)}; batch {args.batch_size}, median of "
        f"{repeats} training steps; ratios are multigrid / baseline from the same run."
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    profiles = profile_lines(rows)
    if profiles:
        table += "\n\nWhere the time goes (op time summed over threads, per step):\n\n" + profiles
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(f"{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}\n\nwrote {args.output}")


if __name__ == "__main__":
    main()
