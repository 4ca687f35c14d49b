"""LiteRT latency of multigrid networks against their baselines, float32 and int8.

For each network, the baseline (`multigrid=False`) and the multigrid network
at width 1x and 2x (one per group size) are exported with
`keras_mgconv.export.export_tflite` (int8 calibrated on random inputs, which
is enough for timing) and timed with `ai_edge_litert` at batch 1 with XNNPACK,
LiteRT's default CPU delegate, on 1 and 2 threads. Every ratio is the median
latency over that of the 1x baseline of the same network, quantization and
thread count, measured in the same run. A network's variants are timed in
turn, in rounds, so that background load falls on all of them alike.

    python benchmarks/tflite_latency.py            # everything (tens of minutes)
    python benchmarks/tflite_latency.py --quick    # ResNet20 and MobileNetV2 0.5, s=8, few repeats

Writes a JSON file (default benchmarks/results/tflite_latency.json) and a
markdown table next to it (.md).
"""

import argparse
import collections
import json
import os
import platform
import tempfile

import ai_edge_litert
import numpy as np
import tensorflow as tf

from keras_mgconv import count_multiply_adds, models
from keras_mgconv.export import export_tflite, measure_latency

# name: (factory, input shape, classes, factory arguments)
NETWORKS = {
    "ResNet20": (models.ResNet20, (32, 32, 3), 10, {}),
    "ResNet56": (models.ResNet56, (32, 32, 3), 10, {}),
    "MobileNetV2-1.0": (models.MobileNetV2, (224, 224, 3), 1000, {"alpha": 1.0}),
    "MobileNetV2-0.5": (models.MobileNetV2, (224, 224, 3), 1000, {"alpha": 0.5}),
}
QUANTIZATIONS = {"float32": None, "int8": "int8"}
THREADS = (1, 2)
CALIBRATION_IMAGES = 16


def variants(group_sizes):
    """(label, factory arguments) of the baseline and every multigrid network timed."""
    yield "baseline", {"multigrid": False}
    for width in (1, 2):
        for group_size in group_sizes:
            yield f"multigrid s={group_size} {width}x", {"group_size": group_size,
                                                         "width": width}


def export(model, images, directory, label):
    """Parameters, multiply-adds, and per quantization the exported file and its size."""
    result = {"params": model.count_params(), "multiply_adds": count_multiply_adds(model)}
    for name, quantization in QUANTIZATIONS.items():
        report = export_tflite(model, os.path.join(directory, f"{label}.{name}.tflite"),
                               quantization, representative_data=images)
        result[name] = {"path": report.path, "size_bytes": report.size_bytes}
    return result


def time_interleaved(rows, repeats, warmup, rounds):
    """Adds "latency" to every row's quantizations, the variants timed in turn.

    Each round times every file for `repeats // rounds` invokes, so that a
    change of background load over the run affects all variants alike; a
    figure is the median over rounds of the rounds' medians (and p90s).
    """
    samples = collections.defaultdict(list)
    for _ in range(rounds):
        for index, row in enumerate(rows):
            for name in QUANTIZATIONS:
                samples[index, name].append(measure_latency(
                    row[name]["path"], threads=THREADS, xnnpack=(True,),
                    repeats=max(1, repeats // rounds), warmup=warmup))
    for index, row in enumerate(rows):
        for name in QUANTIZATIONS:
            per_round = samples[index, name]
            row[name]["latency"] = [
                {"threads": threads,
                 "median_ms": float(np.median([r[i]["median_ms"] for r in per_round])),
                 "p90_ms": float(np.median([r[i]["p90_ms"] for r in per_round]))}
                for i, threads in enumerate(THREADS)]


def markdown(rows):
    header = ["network", "variant", "params", "MACs"]
    for name in QUANTIZATIONS:
        header.append(f"{name} MB")
        header += [f"{name} {threads} thread{'s' * (threads > 1)} ms (ratio)"
                   for threads in THREADS]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["network"], row["variant"], f"{row['params'] / 1e6:.2f}M",
                 f"{row['multiply_adds'] / 1e6:.1f}M"]
        for name in QUANTIZATIONS:
            cells.append(f"{row[name]['size_bytes'] / 2**20:.2f}")
            cells += [f"{timing['median_ms']:.2f} ({ratio:.2f})"
                      for timing, ratio in zip(row[name]["latency"], row[name]["ratios"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=None,
                        help="default: all")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=None,
                        help="multigrid group sizes (default 8 16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed invokes per measurement (default 100)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed invokes before each timing (default 10)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds the repeats are spread over, variants in turn "
                             "(default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults for a check that the script works: ResNet20 and "
                             "MobileNetV2 0.5, group size 8, 5 repeats after 1 warm-up")
    parser.add_argument("--output", default=os.path.join(
        os.path.dirname(__file__), "results", "tflite_latency.json"))
    args = parser.parse_args(argv)
    defaults = ({"networks": ["ResNet20", "MobileNetV2-0.5"], "group_sizes": [8],
                 "repeats": 5, "warmup": 1, "rounds": 1} if args.quick else
                {"networks": list(NETWORKS), "group_sizes": [8, 16],
                 "repeats": 100, "warmup": 10, "rounds": 5})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for network in args.networks:
            factory, input_shape, classes, arguments = NETWORKS[network]
            images = rng.random((CALIBRATION_IMAGES, *input_shape), np.float32)
            network_rows = []
            for variant, variant_arguments in variants(args.group_sizes):
                model = factory(input_shape=input_shape, classes=classes, **arguments,
                                **variant_arguments)
                network_rows.append({
                    "network": network, "variant": variant, **variant_arguments,
                    **export(model, images, directory, f"{network}-{len(network_rows)}")})
            time_interleaved(network_rows, args.repeats, args.warmup, args.rounds)
            baseline = network_rows[0]
            for row in network_rows:
                for name in QUANTIZATIONS:
                    del row[name]["path"]
                    row[name]["ratios"] = [
                        timing["median_ms"] / reference["median_ms"]
                        for timing, reference in zip(row[name]["latency"],
                                                     baseline[name]["latency"])]
            rows += network_rows
            print("\n".join(markdown(network_rows).splitlines()[2:]), flush=True)

    results = {
        "settings": {"batch_size": 1, "xnnpack": True, "threads": list(THREADS),
                     "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
                     "group_sizes": args.group_sizes},
        "environment": {"machine": platform.machine(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                        "ai_edge_litert": ai_edge_litert.__version__},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    table = markdown(rows)
    with open(os.path.splitext(args.output)[0] + ".md", "w") as file:
        file.write(table)
    print(table)


if __name__ == "__main__":
    main()
