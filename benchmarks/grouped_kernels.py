"""LiteRT latency of one grouped convolution against the dense one, by group size.

A multigrid layer's multiply-adds are mostly in grouped convolutions, so its
speed-up under LiteRT is bounded by how fast XNNPACK runs a grouped
convolution's multiply-add against a dense one's. This script exports single
`GroupedConv2D` layers (3 x 3 and 1 x 1, C -> C channels, the widths and image
sizes of the CIFAR ResNets' stages and of a 256-channel layer) at group sizes
4 to 32 and dense, float32 and int8, times them in a process of their own
(1 thread, XNNPACK, batch 1, as benchmarks/tflite_latency.py does) and prints,
per layer, its time over the dense layer's, its multiply-adds over the dense
layer's (s / C) and their quotient: how many times more a multiply-add costs
in the grouped convolution than in the dense one (1.0: equally efficient
kernels).

    python benchmarks/grouped_kernels.py

Writes benchmarks/results/grouped_kernels.json and .md.
"""

import os
import sys
import tempfile

import numpy as np

from keras_mgconv._keras import keras
from keras_mgconv.export import export_tflite
from keras_mgconv.layers import GroupedConv2D
from machine import cpu_description, write_results
from tflite_latency import time_in_child

# (channels, image size): ResNet20/56's three stages at 32 x 32 inputs, the
# widest stage at a larger image, and a 256-channel layer.
SHAPES = [(16, 32), (32, 16), (64, 8), (64, 32), (256, 16)]
KERNEL_SIZES = (3, 1)
GROUP_SIZES = (4, 8, 16, 32)
QUANTIZATIONS = {"float32": None, "int8": "int8"}


def main():
    rows, paths = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        for kernel_size in KERNEL_SIZES:
            for channels, size in SHAPES:
                images = rng.random((8, size, size, channels), np.float32)
                for group_size in [s for s in GROUP_SIZES if s < channels] + [channels]:
                    inputs = keras.Input((size, size, channels))
                    layer = GroupedConv2D(
                        channels,
                        kernel_size,
                        groups=channels // group_size,
                        padding="same",
                        use_bias=False,
                    )
                    model = keras.Model(inputs, layer(inputs))
                    for name, quantization in QUANTIZATIONS.items():
                        path = os.path.join(
                            directory, f"{kernel_size}-{channels}-{size}-{group_size}.{name}.tflite"
                        )
                        export_tflite(model, path, quantization, representative_data=images)
                        rows.append(
                            {
                                "quantization": name,
                                "kernel_size": kernel_size,
                                "channels": channels,
                                "image_size": size,
                                "group_size": group_size,
                                "path": path,
                            }
                        )
                        paths.append(path)
        timings = time_in_child(paths, (1,), repeats=100, warmup=10, rounds=5)
    for row in rows:
        row["ms"] = timings[row.pop("path")][0]["cpu_ms"]
    dense = {
        (r["quantization"], r["kernel_size"], r["channels"], r["image_size"]): r["ms"]
        for r in rows
        if r["group_size"] == r["channels"]
    }
    lines = [
        f"CPU: {cpu_description()}. 1 thread, XNNPACK, batch 1; CPU time of the "
        f"invoking thread. One C -> C convolution, 'same' padding.",
        "",
        "| quantization | kernel | C | image | s | ms | time / dense | MACs / dense "
        "| cost of a MAC / dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows.sort(key=lambda row: list(QUANTIZATIONS).index(row["quantization"]))
    for row in rows:
        reference = dense[
            row["quantization"], row["kernel_size"], row["channels"], row["image_size"]
        ]
        row["time_ratio"] = row["ms"] / reference
        row["multiply_add_ratio"] = row["group_size"] / row["channels"]
        row["cost_per_multiply_add"] = row["time_ratio"] / row["multiply_add_ratio"]
        kernel = f"{row['kernel_size']}x{row['kernel_size']}"
        lines.append(
            f"| {row['quantization']} | {kernel} | {row['channels']} | {row['image_size']} "
            f"| {row['group_size']} | {row['ms']:.3f} | {row['time_ratio']:.2f} "
            f"| {row['multiply_add_ratio']:.3f} | {row['cost_per_multiply_add']:.1f} |"
        )
    write_results("grouped_kernels", rows, lines)


if __name__ == "__main__":
    sys.exit(main())
