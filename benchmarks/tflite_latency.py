"""LiteRT latency of multigrid networks against their baselines, float32 and int8.

For each network, the baseline (`multigrid=False`) and the multigrid network
at width 1x and 2x (one per group size) are exported with
`keras_mgconv.export.export_tflite` (int8 calibrated on random inputs, which
is enough for timing) and timed with `ai_edge_litert` at batch 1 with XNNPACK,
LiteRT's default CPU delegate, on 1 and 2 threads. Every ratio is the median
latency over that of the 1x baseline of the same network, quantization and
thread count, measured in the same run. A network's variants are timed in
turn, in rounds, so that background load falls on all of them alike, and in a
process of their own: a process that has just run TensorFlow's converter can
slow LiteRT's invokes three- to fourfold. Each figure is the median wall time
of an invoke; beside it stands the invoking thread's CPU time (on one thread,
the work itself, less of the machine's other load), the file's op count and
the multiply-add ratio, the speed-up that equally efficient kernels would give
(the model's multiply-adds: a 1 x 1 layer exported as its matrix computes more).
Networks with 1 x 1 multigrid layers are also timed with those exported as
their cycles (`pointwise="cycle"`), where the default exports the ones that
run faster as their matrix (see benchmarks/pointwise_export.py). The ResNets
are also timed with their groups as trained (`min_group_filters=1`), where
the default int8 export merges groups of fewer than 16 filters (see
benchmarks/grouped_kernels.py), and with them merged in float32 as well
(`min_group_filters=16`), which the default leaves as trained.

`--profile` shows where the time goes: it also exports every variant's float32
model cut after each stage (the layers before each change of the image size,
and the whole model), times those prefixes the same way, and prints each
stage's share of the time, its ops and its multiply-adds against the
baseline's. (LiteRT's Python API has no per-op profiler; stages are the
finest cut whose differences stand out of the timing noise.)

    python benchmarks/tflite_latency.py            # everything (tens of minutes)
    python benchmarks/tflite_latency.py --quick    # ResNet20 and MobileNetV2 0.5, s=8, few repeats
    python benchmarks/tflite_latency.py --networks ResNet20 --profile

Writes a JSON file (default benchmarks/results/tflite_latency.json) and a
markdown table next to it (.md).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import ai_edge_litert
import numpy as np
import tensorflow as tf

from keras_mgconv import count_multiply_adds, models
from keras_mgconv.export import export_tflite
from machine import cpu_description

# name: (factory, input shape, classes, factory arguments, has 1 x 1 multigrid layers)
NETWORKS = {
    "ResNet20": (models.ResNet20, (32, 32, 3), 10, {}, False),
    "ResNet56": (models.ResNet56, (32, 32, 3), 10, {}, False),
    "MobileNetV2-1.0": (models.MobileNetV2, (224, 224, 3), 1000, {"alpha": 1.0}, True),
    "MobileNetV2-0.5": (models.MobileNetV2, (224, 224, 3), 1000, {"alpha": 0.5}, True),
    "MobileNetV3Large-1.0": (models.MobileNetV3Large, (224, 224, 3), 1000, {"alpha": 1.0}, True),
    "MobileNetV3Small-1.0": (models.MobileNetV3Small, (224, 224, 3), 1000, {"alpha": 1.0}, True),
}
QUANTIZATIONS = {"float32": None, "int8": "int8"}
THREADS = (1, 2)
CALIBRATION_IMAGES = 16


def variants(group_sizes, pointwise_layers):
    """(label, factory arguments, export_tflite options) of every network timed.

    Beside the factories' defaults (block convolutions of 32 channels or fewer
    dense, as in the authors' code), every network is timed at the first group
    size with its coarsest level at the group size (`c=` the group size: the
    smaller network, the factories' default before). Networks with 1 x 1
    multigrid layers (`pointwise_layers`) are also timed at the first group
    size, 1x, with every 1 x 1 layer exported as its cycle (`pointwise="cycle"`,
    the smallest file) instead of where it runs faster as its matrix (the
    default). The others (the ResNets) are also timed at the first group size,
    1x, with the groups as trained (`min_group_filters=1`) instead of merged in
    int8 (the default), and with them merged in float32 too
    (`min_group_filters=16`; its int8 file is the default's).
    """
    yield "baseline", {"multigrid": False}, {}
    for width in (1, 2):
        for group_size in group_sizes:
            arguments = {"group_size": group_size, "width": width}
            yield f"multigrid s={group_size} {width}x", arguments, {}
            if group_size != group_sizes[0]:
                continue
            if pointwise_layers and width == 1:
                yield (
                    f"multigrid s={group_size} {width}x, 1x1 cycles",
                    arguments,
                    {"pointwise": "cycle"},
                )
            if not pointwise_layers and width == 1:
                yield (
                    f"multigrid s={group_size} {width}x, groups as trained",
                    arguments,
                    {"min_group_filters": 1},
                )
                yield (
                    f"multigrid s={group_size} {width}x, groups merged to 16",
                    arguments,
                    {"min_group_filters": 16},
                )
            yield (
                f"multigrid s={group_size} c={group_size} {width}x",
                {**arguments, "coarsest_channels": group_size},
                {},
            )


def export(model, images, directory, label, options):
    """Parameters, multiply-adds, and per quantization the exported file and its size."""
    result = {"params": model.count_params(), "multiply_adds": count_multiply_adds(model)}
    for name, quantization in QUANTIZATIONS.items():
        report = export_tflite(
            model,
            os.path.join(directory, f"{label}.{name}.tflite"),
            quantization,
            representative_data=images,
            **options,
        )
        result[name] = {
            "path": report.path,
            "size_bytes": report.size_bytes,
            "ops": sum(report.op_counts.values()),
            "dense_pointwise_layers": report.dense_pointwise_layers,
        }
    return result


def time_in_child(paths, threads, repeats, warmup, rounds):
    """`litert_timing.time_files` in a fresh Python process, apart from the exports."""
    request = json.dumps(
        {
            "paths": paths,
            "threads": list(threads),
            "repeats": repeats,
            "warmup": warmup,
            "rounds": rounds,
        }
    )
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "litert_timing.py")
    done = subprocess.run(
        [sys.executable, script, request], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"The timing process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_interleaved(rows, repeats, warmup, rounds):
    """Adds "latency" to every row's quantizations, timed in a process of their own."""
    paths = [row[name]["path"] for row in rows for name in QUANTIZATIONS]
    timings = time_in_child(paths, THREADS, repeats, warmup, rounds)
    for row in rows:
        for name in QUANTIZATIONS:
            row[name]["latency"] = timings[row[name]["path"]]


def stage_ends(model):
    """The layers after which the image size changes, and the model's last layer.

    Their outputs cut a network into its stem, stages and head.
    """
    from keras_mgconv._keras import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]

    def size(layer):
        shape = layer.output.shape
        return tuple(shape[1:3]) if len(shape) == 4 else None

    return [
        layer
        for layer, following in zip(layers, layers[1:] + [None])
        if following is None or size(following) != size(layer)
    ]


def profile(model, directory, label, options):
    """Exports `model` cut after each stage: (stage names, paths, ops, multiply-adds)."""
    from keras_mgconv._keras import keras

    names, paths, ops, macs = [], [], [], []
    for index, layer in enumerate(stage_ends(model)):
        prefix = keras.Model(model.inputs, layer.output)
        path = os.path.join(directory, f"{label}.stage{index}.tflite")
        report = export_tflite(prefix, path, **options)
        names.append(layer.name)
        paths.append(path)
        ops.append(sum(report.op_counts.values()))
        macs.append(count_multiply_adds(prefix))
    return names, paths, ops, macs


def profile_table(network, rows, threads):
    """Each stage's time (differences of prefix times), ops and MACs against the baseline's."""
    baseline = rows[0]
    lines = [
        f"#### {network}: where the float32 time goes ({threads} thread, "
        "stage by stage, ms and ratio to the baseline's stage)",
        "",
        "| variant | " + " | ".join(f"stage {i}" for i in range(len(baseline["stages"]))) + " |",
        "|---|" + "---:|" * len(baseline["stages"]),
    ]

    def stage_figures(row):
        times = [timing[0]["cpu_ms"] for timing in row["stage_latency"]]
        return (
            [b - a for a, b in zip([0.0] + times, times)],
            [b - a for a, b in zip([0] + row["stage_ops"], row["stage_ops"])],
            [b - a for a, b in zip([0] + row["stage_macs"], row["stage_macs"])],
        )

    reference = stage_figures(baseline)
    for row in rows:
        if len(row["stages"]) != len(baseline["stages"]):
            continue
        figures = stage_figures(row)
        cells = [
            f"{t:.3f} ms ({t / bt:.2f}), {o} ops, MACs {m / bm:.2f}"
            for t, o, m, bt, bm in zip(*figures, reference[0], reference[2])
        ]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows):
    header = ["network", "variant", "params", "MACs (ratio)", "ops", "1x1 as matrix"]
    for name in QUANTIZATIONS:
        header.append(f"{name} MB")
        header += [
            f"{name} {threads} thread{'s' * (threads > 1)} ms (ratio; CPU-time ratio)"
            for threads in THREADS
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [
            row["network"],
            row["variant"],
            f"{row['params'] / 1e6:.2f}M",
            f"{row['multiply_adds'] / 1e6:.1f}M ({row['multiply_add_ratio']:.2f})",
            str(row["float32"]["ops"]),
            str(row["float32"]["dense_pointwise_layers"]),
        ]
        for name in QUANTIZATIONS:
            cells.append(f"{row[name]['size_bytes'] / 2**20:.2f}")
            cells += [
                f"{timing['median_ms']:.2f} ({ratio:.2f}; {cpu_ratio:.2f})"
                for timing, ratio, cpu_ratio in zip(
                    row[name]["latency"], row[name]["ratios"], row[name]["cpu_ratios"]
                )
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--networks", nargs="+", choices=list(NETWORKS), default=None, help="default: all"
    )
    parser.add_argument(
        "--group-sizes",
        type=int,
        nargs="+",
        default=None,
        help="multigrid group sizes (default 8 16)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed invokes per measurement (default 100)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed invokes before each timing (default 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds the repeats are spread over, variants in turn (default 5)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults for a check that the script works: ResNet20 and "
        "MobileNetV2 0.5, group size 8, 5 repeats after 1 warm-up",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time every variant stage by stage (float32, 1 thread)",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "tflite_latency.json"),
    )
    args = parser.parse_args(argv)
    defaults = (
        {
            "networks": ["ResNet20", "MobileNetV2-0.5"],
            "group_sizes": [8],
            "repeats": 5,
            "warmup": 1,
            "rounds": 1,
        }
        if args.quick
        else {
            "networks": list(NETWORKS),
            "group_sizes": [8, 16],
            "repeats": 100,
            "warmup": 10,
            "rounds": 5,
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    rng = np.random.default_rng(0)
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as directory:
        for network in args.networks:
            factory, input_shape, classes, arguments, pointwise_layers = NETWORKS[network]
            images = rng.random((CALIBRATION_IMAGES, *input_shape), np.float32)
            network_rows = []
            for variant, variant_arguments, options in variants(args.group_sizes, pointwise_layers):
                model = factory(
                    input_shape=input_shape, classes=classes, **arguments, **variant_arguments
                )
                network_rows.append(
                    {
                        "network": network,
                        "variant": variant,
                        **variant_arguments,
                        "export_options": options,
                        **export(
                            model, images, directory, f"{network}-{len(network_rows)}", options
                        ),
                    }
                )
                if args.profile:
                    row = network_rows[-1]
                    row["stages"], row["stage_paths"], row["stage_ops"], row["stage_macs"] = (
                        profile(model, directory, f"{network}-{len(network_rows)}", options)
                    )
            time_interleaved(network_rows, args.repeats, args.warmup, args.rounds)
            baseline = network_rows[0]
            for row in network_rows:
                row["multiply_add_ratio"] = row["multiply_adds"] / baseline["multiply_adds"]
                for name in QUANTIZATIONS:
                    del row[name]["path"]
                    row[name]["ratios"], row[name]["cpu_ratios"] = (
                        [
                            timing[key] / reference[key]
                            for timing, reference in zip(
                                row[name]["latency"], baseline[name]["latency"]
                            )
                        ]
                        for key in ("median_ms", "cpu_ms")
                    )
            rows += network_rows
            print("\n".join(markdown(network_rows).splitlines()[2:]), flush=True)
            if args.profile:
                timings = time_in_child(
                    [path for row in network_rows for path in row["stage_paths"]],
                    (1,),
                    args.repeats,
                    args.warmup,
                    args.rounds,
                )
                for row in network_rows:
                    row["stage_latency"] = [timings[path] for path in row.pop("stage_paths")]
                profiles.append(profile_table(network, network_rows, 1))
                print(profiles[-1], flush=True)

    results = {
        "settings": {
            "batch_size": 1,
            "xnnpack": True,
            "threads": list(THREADS),
            "timed": "in a process of its own, wall and invoking-thread CPU time",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "group_sizes": args.group_sizes,
        },
        "environment": {
            "cpu": cpu_description(),
            "tensorflow": tf.__version__,
            "ai_edge_litert": ai_edge_litert.__version__,
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    table = "\n".join([markdown(rows), *profiles])
    with open(os.path.splitext(args.output)[0] + ".md", "w") as file:
        file.write(table)
    print(table)


if __name__ == "__main__":
    main()
