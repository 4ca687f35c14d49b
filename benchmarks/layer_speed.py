"""MultigridConv2D against Conv2D: parameters, multiply-adds, forward and training time.

For each width and group size, one MultigridConv2D and one Conv2D (same width in
and out, k=3, "same" padding) are timed in the same process, so every figure is
printed as a ratio to the Conv2D measured in this run. Times are medians of
repeated calls after warm-up, on whatever device TensorFlow picks (CPU here),
with Keras' default `jit_compile` (off on CPU-only machines).

    python benchmarks/layer_speed.py                       # full grid
    python benchmarks/layer_speed.py --widths 256 --group-sizes 16 --repeats 5

Writes a JSON file (default benchmarks/results/layer_speed.json) and prints a
markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import tensorflow as tf

import keras_mgconv
from keras_mgconv._keras import keras


def median_seconds(function, repeats, warmup=2):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(layer, inputs, targets, repeats):
    model = keras.Sequential([keras.Input(inputs.shape[1:]), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    forward = tf.function(lambda x: model(x, training=False))
    return {
        "params": model.count_params(),
        "multiply_adds": keras_mgconv.count_multiply_adds(model),
        "forward_s": median_seconds(lambda: forward(inputs).numpy(), repeats),
        "train_step_s": median_seconds(
            lambda: model.train_on_batch(inputs, targets), repeats),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=os.path.join(
        os.path.dirname(__file__), "results", "layer_speed.json"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows = []
    for width in args.widths:
        shape = (args.batch_size, args.image_size, args.image_size, width)
        inputs = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        targets = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        baseline = measure(
            keras.layers.Conv2D(width, 3, padding="same"), inputs, targets, args.repeats)
        for group_size in args.group_sizes:
            if width % group_size or width <= group_size:
                continue
            multigrid = measure(
                keras_mgconv.MultigridConv2D(width, 3, padding="same", group_size=group_size),
                inputs, targets, args.repeats)
            row = {"width": width, "group_size": group_size,
                   "baseline": baseline, "multigrid": multigrid}
            for key in ("params", "multiply_adds", "forward_s", "train_step_s"):
                row[f"{key}_ratio"] = multigrid[key] / baseline[key]
            rows.append(row)
            print(f"width {width} group size {group_size}: train step "
                  f"{multigrid['train_step_s'] * 1e3:.1f} ms vs "
                  f"{baseline['train_step_s'] * 1e3:.1f} ms "
                  f"({row['train_step_s_ratio']:.2f}x)", flush=True)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{result['machine']}; batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, k=3; ratios are MultigridConv2D / Conv2D\n")
    print("| width | group size | params | params ratio | MACs ratio "
          "| forward ms (Conv2D) | forward ratio | train step ms (Conv2D) | train step ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        m, b = row["multigrid"], row["baseline"]
        print(f"| {row['width']} | {row['group_size']} | {m['params']:,} "
              f"| {row['params_ratio']:.3f} | {row['multiply_adds_ratio']:.3f} "
              f"| {m['forward_s'] * 1e3:.1f} ({b['forward_s'] * 1e3:.1f}) "
              f"| {row['forward_s_ratio']:.2f} "
              f"| {m['train_step_s'] * 1e3:.1f} ({b['train_step_s'] * 1e3:.1f}) "
              f"| {row['train_step_s_ratio']:.2f} |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
