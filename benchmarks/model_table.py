"""Parameters and multiply-adds of every model factory, baseline against multigrid.

For each factory and width multiplier (1x, 2x, 4x) it builds the baseline
(`multigrid=False`) and the multigrid network at group sizes 8 (the default),
16 and 32 with the factories' default coarsest level (block convolutions of
32 channels or fewer dense), and at group size 8 with the coarsest level at
the group size (`coarsest_channels=8`, the smallest network), and counts
parameters (`count_params`) and multiply-adds per image
(`keras_mgconv.count_multiply_adds`). CIFAR ResNets at 32x32 with 10 classes,
ImageNet ResNets, MobileNetV2 and MobileNetV3 Small and Large (alpha 1.0) at
224x224 with 1000 classes.
A cell is "n/a" where no width of the model can be multigrid.

It also plots parameters against width for one layer (Conv2D against
MultigridConv2D) and for a whole network (CIFAR ResNet56):

    python benchmarks/model_table.py            # writes benchmarks/results/
    python benchmarks/model_table.py --models ResNet20 MobileNetV2 --widths 1 2
"""

import argparse
import gc
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

import keras_mgconv  # noqa: E402
from keras_mgconv import models  # noqa: E402
from keras_mgconv._keras import keras  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FACTORIES = {
    "ResNet20": (models.ResNet20, {}),
    "ResNet32": (models.ResNet32, {}),
    "ResNet44": (models.ResNet44, {}),
    "ResNet56": (models.ResNet56, {}),
    "ResNet110": (models.ResNet110, {}),
    "ResNet18": (models.ResNet18, {}),
    "ResNet34": (models.ResNet34, {}),
    "ResNet50": (models.ResNet50, {}),
    "MobileNetV2": (models.MobileNetV2, {}),
    # keras.applications' default input shape is (None, None, 3): MACs need a size.
    "MobileNetV3Small": (models.MobileNetV3Small, {"input_shape": (224, 224, 3)}),
    "MobileNetV3Large": (models.MobileNetV3Large, {"input_shape": (224, 224, 3)}),
}
# (column label, factory arguments) of the multigrid networks.
VARIANTS = (
    ("s=8", {"group_size": 8}),
    ("s=8 c=8", {"group_size": 8, "coarsest_channels": 8}),
    ("s=16", {"group_size": 16}),
    ("s=32", {"group_size": 32}),
)


def measure(factory, **kwargs):
    try:
        model = factory(**kwargs)
    except ValueError as error:
        return {"error": str(error)}
    result = {
        "params": model.count_params(),
        "multiply_adds": keras_mgconv.count_multiply_adds(model),
    }
    del model
    keras.backend.clear_session()
    gc.collect()
    return result


def _millions(value):
    return f"{value / 1e6:.2f}M"


def table(rows):
    lines = [
        "| model | width | baseline params | baseline MACs | "
        + " | ".join(f"multigrid {label} params (ratio) | MACs (ratio)" for label, _ in VARIANTS)
        + " |",
        "|---|---:|---:|---:|" + "---:|---:|" * len(VARIANTS),
    ]
    for row in rows:
        base = row["baseline"]
        cells = [
            row["model"],
            f"{row['width']}x",
            _millions(base["params"]),
            _millions(base["multiply_adds"]),
        ]
        for label, _ in VARIANTS:
            result = row["multigrid"][label]
            if "error" in result:
                cells += ["n/a", "n/a"]
                continue
            cells += [
                f"{_millions(result['params'])} ({result['params'] / base['params']:.2f})",
                f"{_millions(result['multiply_adds'])} "
                f"({result['multiply_adds'] / base['multiply_adds']:.2f})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path):
    widths = [64, 128, 256, 512, 1024, 2048]
    layer_params = {"Conv2D": [], "MultigridConv2D (s=16)": []}
    for width in widths:
        for label, layer in (
            ("Conv2D", keras.layers.Conv2D(width, 3)),
            ("MultigridConv2D (s=16)", keras_mgconv.MultigridConv2D(width, 3, group_size=16)),
        ):
            layer.build((None, 8, 8, width))
            layer_params[label].append(layer.count_params())

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, values in layer_params.items():
        left.plot(widths, values, marker="o", label=label)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="channels C (in = out)",
        ylabel="parameters",
        title="One 3x3 layer: quadratic against linear",
    )
    left.set_xticks(widths, [str(w) for w in widths])
    left.legend()

    resnet = [row for row in rows if row["model"] == "ResNet56"]
    network_widths = [row["width"] for row in resnet]
    right.plot(
        network_widths, [row["baseline"]["params"] for row in resnet], marker="o", label="baseline"
    )
    for label, _ in VARIANTS:
        values = [row["multigrid"][label].get("params") for row in resnet]
        right.plot(network_widths, values, marker="o", label=f"multigrid {label}")
    right.axhline(
        resnet[0]["baseline"]["params"], color="grey", linestyle=":", label="baseline at 1x"
    )
    right.set(yscale="log", xlabel="width multiplier", ylabel="parameters", title="CIFAR ResNet56")
    right.set_xticks(network_widths, [f"{w}x" for w in network_widths])
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FACTORIES), choices=FACTORIES)
    parser.add_argument("--widths", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--output-dir", default=RESULTS)
    args = parser.parse_args(argv)

    rows = []
    for name in args.models:
        factory, kwargs = FACTORIES[name]
        for width in args.widths:
            row = {
                "model": name,
                "width": width,
                "baseline": measure(factory, multigrid=False, width=width, **kwargs),
                "multigrid": {
                    label: measure(factory, width=width, **kwargs, **variant)
                    for label, variant in VARIANTS
                },
            }
            rows.append(row)
            print(
                f"{name} {width}x: baseline {row['baseline']['params']:,}, multigrid "
                + ", ".join(
                    f"{label} {result['params']:,}" if "params" in result else f"{label} n/a"
                    for label, result in row["multigrid"].items()
                ),
                flush=True,
            )

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "model_table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    markdown = table(rows)
    with open(os.path.join(args.output_dir, "model_table.md"), "w") as f:
        f.write(markdown + "\n")
    print("\n" + markdown)
    if any(row["model"] == "ResNet56" for row in rows):
        path = os.path.join(args.output_dir, "params_vs_width.png")
        plot(rows, path)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
