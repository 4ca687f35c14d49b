"""LiteRT latency of 1 x 1 MultigridConv2D layers exported as their matrix and as their cycle.

A 1 x 1 layer is one `(C_in, filters)` matrix; `export_tflite(pointwise="auto")`
exports it as that matrix (one CONV_2D) where the matrix has at most
`64 / group_size` times the cycle's multiply-adds (keras_mgconv._pointwise),
and as the cycle's grouped convolutions elsewhere. This script measures the
factor: for layer shapes from MobileNetV2 (an expansion and a projection) and
the ImageNet ResNets' bottlenecks, at group sizes 8 and 16, it exports each
layer both ways (`pointwise="dense"` and `"cycle"`, float32 and int8), times them in a
process of their own (1 thread, XNNPACK, batch 1, as benchmarks/tflite_latency.py
does) and prints, per layer, the matrix's multiply-adds over the cycle's and its
time over the cycle's. Their quotient is how many times faster XNNPACK runs a
matrix multiply-add than a cycle's: the matrix wins where the multiply-add
ratio is below it.

    python benchmarks/pointwise_export.py

Writes benchmarks/results/pointwise_export.json and .md.
"""

import os
import sys
import tempfile

import numpy as np

import keras_mgconv
from keras_mgconv._keras import keras
from keras_mgconv.complexity import multiply_adds_per_position
from keras_mgconv.export import export_tflite
from keras_mgconv.models import common
from machine import cpu_description, write_results
from tflite_latency import time_in_child

# (input channels, filters, image size): MobileNetV2's block-13 expansion and
# projection at 28 x 28 (224 inputs), ResNet50's stage-3 and stage-4 1 x 1s.
SHAPES = [
    (96, 576, 28),
    (576, 96, 28),
    (256, 1024, 14),
    (1024, 1024, 14),
    (2048, 512, 7),
    (512, 2048, 7),
]
GROUP_SIZES = (8, 16)
QUANTIZATIONS = {"float32": None, "int8": "int8"}


def main():
    rows, paths = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        for group_size in GROUP_SIZES:
            for channels, filters, size in SHAPES:
                inputs = keras.Input((size, size, channels))
                # The coarsest level the factories give this width.
                settings = common.ConvSettings(True, group_size, None)
                layer = keras_mgconv.MultigridConv2D(
                    filters,
                    1,
                    group_size=group_size,
                    coarsest_channels=settings.coarsest_width(filters),
                )
                model = keras.Model(inputs, layer(inputs))
                images = rng.random((8, size, size, channels), np.float32)
                for name, quantization in QUANTIZATIONS.items():
                    row = {
                        "quantization": name,
                        "group_size": group_size,
                        "input_channels": channels,
                        "filters": filters,
                        "image_size": size,
                        "levels": list(layer.levels),
                        "multiply_add_ratio": channels
                        * filters
                        / multiply_adds_per_position(layer),
                    }
                    for pointwise in ("dense", "cycle"):
                        path = os.path.join(
                            directory,
                            f"{group_size}-{channels}-{filters}.{pointwise}.{name}.tflite",
                        )
                        export_tflite(
                            model,
                            path,
                            quantization,
                            representative_data=images,
                            pointwise=pointwise,
                        )
                        row[f"{pointwise}_path"] = path
                        paths.append(path)
                    rows.append(row)
        timings = time_in_child(paths, (1,), repeats=100, warmup=10, rounds=5)
    lines = [
        f"CPU: {cpu_description()}. 1 thread, XNNPACK, batch 1; CPU time of the invoking thread.",
        "",
        "| quantization | s | layer | image | levels | matrix/cycle MACs "
        "| matrix/cycle time | MAC ratio / time ratio |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    rows.sort(key=lambda row: list(QUANTIZATIONS).index(row["quantization"]))
    for row in rows:
        for pointwise in ("dense", "cycle"):
            row[f"{pointwise}_ms"] = timings[row.pop(f"{pointwise}_path")][0]["cpu_ms"]
        row["time_ratio"] = row["dense_ms"] / row["cycle_ms"]
        row["slowdown"] = row["multiply_add_ratio"] / row["time_ratio"]
        lines.append(
            f"| {row['quantization']} | {row['group_size']} "
            f"| {row['input_channels']} -> {row['filters']} "
            f"| {row['image_size']} | {row['levels']} | {row['multiply_add_ratio']:.2f} "
            f"| {row['time_ratio']:.2f} ({row['dense_ms']:.3f} / {row['cycle_ms']:.3f} ms) "
            f"| {row['slowdown']:.1f} |"
        )
    write_results("pointwise_export", rows, lines)


if __name__ == "__main__":
    sys.exit(main())
