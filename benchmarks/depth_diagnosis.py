"""Why deep multigrid ResNets test below their baselines: scales, correlations, curves.

The accuracy benchmark (`accuracy.py`) finds multigrid ResNet56 1.5-3.3 points
below its baseline while ResNet20 is within half a point, and the block design
far below both. This script measures what the networks do, on the same data
and recipes, so that a fix is chosen on evidence:

- `init`: one batch of 64 training images in training mode, at
  initialisation (seeded). For every residual block: the standard deviation
  of the residual stream after it, the correlation between the residual
  branch and the shortcut it is added to (0 for independent branches; a
  V-cycle carries its input through, so a branch of two may be correlated
  with its stream), and the norm of the loss's gradient with respect to the
  block's weights relative to the weights' norm.
- `train`: trains each network on split 0 of a setting of `accuracy.py`
  (its Adam recipe, or `train`'s SGD recipe with `--recipe sgd`) for
  `--epochs-factor` times the setting's epochs, recording per epoch the
  training loss and accuracy (training mode) and the test accuracy in
  inference mode with the BatchNormalization statistics recomputed on the
  training images; at the end, the same per-block scales as `init` and the
  test accuracy in training mode (batch statistics), which tells a network
  that generalises worse from one whose population statistics are wrong.

Variants (`--variants`) are ways a multigrid network starts: `scale-1`
starts every BatchNormalization scale at 1 (`zero_init_residual=False`, the
factories' default when this diagnosis was made); `zero-init` starts the last
BatchNormalization of each multigrid residual branch at zero scale (Goyal et
al. 2017; `zero_init_residual="multigrid"`, the factories' default before
"auto"); `zero-init-all` starts every residual branch's, multigrid or
standard, at zero scale (`zero_init_residual=True`, for a multigrid network
the factories' default now; the baselines are measured in it too, to compare
networks at a like start);
`fan-per-group` is `scale-1` with the grouped kernels of every
`MultigridConv2D` drawn from Glorot's uniform initialiser with the fans of one
group (`accuracy.start_at_group_fans`), where Keras counts the fan-out over
all groups, so that a grouped layer starts smaller than the `Conv2D` it
replaces (PyTorch's default initialiser uses the fan-in alone and does not
shrink them; the first runs of this variant drew the same distribution with
NumPy);
`random-transfers` is `scale-1` with the restriction and prolongation weights
drawn from He's normal initialiser (as the authors' released code ends up
doing) instead of the group average.

    nice -n 19 python benchmarks/depth_diagnosis.py init
    nice -n 19 python benchmarks/depth_diagnosis.py train --setting digits16-500
    python benchmarks/depth_diagnosis.py report

Every measurement is appended to `results/depth_diagnosis_runs.jsonl` (a
finished one is not repeated), and `report` rewrites
`results/depth_diagnosis.md` from it.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402 (the benchmark's data, splits and recipe)

RESULTS = accuracy.RESULTS
RUNS = os.path.join(RESULTS, "depth_diagnosis_runs.jsonl")
REPORT = os.path.join(RESULTS, "depth_diagnosis.md")

NETWORKS = ("ResNet20", "ResNet56", "MobileNetV2")
# (label, multigrid, group size, coarsest channels)
DESIGNS = (
    ("baseline", False, None, None),
    ("layer s=8 c=32", "layer", 8, 32),
    ("layer s=8 c=8", "layer", 8, 8),
    ("block s=8 c=8", "block", 8, 8),
    ("layer s=16 c=32", "layer", 16, 32),
    ("layer s=8 c=128", "layer", 8, 128),
)
# The designs each network is measured in: the ResNets' layers are at most
# 64 channels wide, so the wider designs would be their baselines; MobileNetV2
# has only the layer design.
NETWORK_DESIGNS = {
    "ResNet20": DESIGNS[:4],
    "ResNet56": DESIGNS[:4],
    "MobileNetV2": (DESIGNS[0], DESIGNS[1], DESIGNS[4], DESIGNS[5]),
}
VARIANTS = ("scale-1", "zero-init", "random-transfers", "fan-per-group", "zero-init-all")
# The value of the factories' `zero_init_residual` each variant starts with.
ZERO_INIT = {"zero-init": "multigrid", "zero-init-all": True}


def build(network, design, variant, input_shape, seed):
    import keras_mgconv
    from keras_mgconv._keras import keras

    _, multigrid, group_size, coarsest = next(d for d in DESIGNS if d[0] == design)
    keras.utils.set_random_seed(seed)
    extra = {} if group_size is None else {"group_size": group_size, "coarsest_channels": coarsest}
    extra["zero_init_residual"] = ZERO_INIT.get(variant, False)
    model = getattr(keras_mgconv.models, network)(
        input_shape=input_shape,
        classes=10,
        classifier_activation=None,
        multigrid=multigrid,
        **extra,
    )
    if variant == "fan-per-group":
        accuracy.start_at_group_fans(model)
    if variant == "random-transfers":
        initializer = keras.initializers.HeNormal(seed=seed)
        for layer in _sublayers(model):
            if type(layer).__name__ in ("ChannelRestriction", "ChannelProlongation"):
                layer.kernel.assign(initializer(layer.kernel.shape))
    return model


def _sublayers(model):
    for layer in model.layers:
        yield layer
        for sublayer in getattr(layer, "_layers", []) or []:
            yield sublayer
        for attribute in ("restrictions", "prolongations"):
            yield from getattr(layer, attribute, [])


def block_names(model):
    """The residual blocks' name prefixes: "conv2_block1" (ResNets) or "block_3" (MobileNetV2)."""
    return [
        layer.name[: -len(suffix)]
        for layer in model.layers
        for suffix in ("_out", "_project_BN")
        if layer.name.endswith(suffix) and "level" not in layer.name
    ]


def block_output(model, name):
    """A block's output layer: a ResNet block's "_out", else its sum or its projection."""
    for suffix in ("_out", "_add", "_project_BN"):
        try:
            return model.get_layer(name + suffix)
        except ValueError:
            continue
    raise ValueError(f"no output layer for block {name!r}")


def block_scales(model, images, labels):
    """Per block: stream std, branch-shortcut correlation, relative weight gradient."""
    import tensorflow as tf

    from keras_mgconv._keras import keras

    names = block_names(model)
    outputs = [block_output(model, name).output for name in names]
    pairs = {}
    for name in names:
        try:
            add = model.get_layer(f"{name}_add")
        except ValueError:
            continue
        pairs[name] = len(outputs)
        outputs += list(add.input)
    probe = keras.Model(model.input, outputs + [model.output])
    variables = {
        name: [
            v
            for layer in model.layers
            if layer.name.startswith(name + "_")
            for v in layer.trainable_weights
        ]
        for name in names
    }
    flat = [v for name in names for v in variables[name]]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        values = probe(images, training=True)
        loss = loss_fn(labels, values[-1])
    gradients = tape.gradient(loss, [v.value if hasattr(v, "value") else v for v in flat])
    rows, start = [], 0
    for index, name in enumerate(names):
        count = len(variables[name])
        grads = [g for g in gradients[start : start + count] if g is not None]
        weights = variables[name][:count]
        start += count
        grad_norm = math.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
        weight_norm = math.sqrt(sum(float(tf.reduce_sum(tf.square(w))) for w in weights))
        row = {
            "block": name,
            "stream_std": float(np.std(values[index].numpy())),
            "relative_gradient": grad_norm / max(weight_norm, 1e-12),
        }
        if name in pairs:
            skip, branch = (
                values[pairs[name]].numpy().ravel(),
                values[pairs[name] + 1].numpy().ravel(),
            )
            row["branch_correlation"] = float(np.corrcoef(skip, branch)[0, 1])
            row["branch_std"] = float(np.std(branch))
        rows.append(row)
    return rows, float(loss)


def read_runs():
    return accuracy.read_runs(RUNS)


def append(record):
    with open(RUNS, "a") as file:
        file.write(json.dumps(record) + "\n")


def measured(network, design, variant):
    """Whether a network is measured in a design and variant: the baselines
    start at scale 1 or with every residual branch at zero scale."""
    return any(d[0] == design for d in NETWORK_DESIGNS[network]) and (
        variant in ("scale-1", "zero-init-all") or design != "baseline"
    )


def measure_init(networks, designs, variants, seed):
    done = {(r["kind"], r["network"], r["design"], r["variant"]) for r in read_runs()}
    for network in networks:
        # The MobileNets downsample 32-fold: they meet the 32x32 images.
        images, labels = accuracy.load_images(32 if network in accuracy.MOBILENETS else 16)
        batch = np.random.default_rng(seed).choice(len(labels), 64, replace=False)
        for design in designs:
            for variant in variants:
                if (
                    not measured(network, design, variant)
                    or (
                        "init",
                        network,
                        design,
                        variant,
                    )
                    in done
                ):
                    continue
                model = build(network, design, variant, images.shape[1:], seed)
                rows, loss = block_scales(model, images[batch], labels[batch])
                append(
                    {
                        "kind": "init",
                        "network": network,
                        "design": design,
                        "variant": variant,
                        "seed": seed,
                        "loss": loss,
                        "blocks": rows,
                        "parameters": model.count_params(),
                    }
                )
                print(
                    f"init {network} {design} {variant}: last stream {rows[-1]['stream_std']:.2f}",
                    flush=True,
                )


def measure_training(networks, designs, variants, setting, recipe, factor, split_index):
    import tensorflow as tf

    from keras_mgconv import batch_norm
    from keras_mgconv._keras import keras

    spec = accuracy.SETTINGS[setting]
    images, labels = accuracy.load_images(spec["image_size"])
    split, seed, train, _, test = list(accuracy.splits(setting, labels))[split_index]
    epochs = spec["epochs"] * factor
    steps_per_epoch = math.ceil(len(train) / accuracy.BATCH_SIZE)
    done = {
        (
            r["kind"],
            r["network"],
            r["design"],
            r["variant"],
            r.get("setting"),
            r.get("recipe"),
            r.get("epochs"),
            r.get("split"),
        )
        for r in read_runs()
    }
    for network in networks:
        if setting not in accuracy.network_settings(network):
            print(f"{network} does not meet {setting}: skipped", flush=True)
            continue
        for design in designs:
            for variant in variants:
                key = ("train", network, design, variant, setting, recipe, epochs, split)
                if not measured(network, design, variant) or key in done:
                    continue
                start = time.perf_counter()
                model = build(network, design, variant, images.shape[1:], seed)
                steps = epochs * steps_per_epoch
                if recipe == "adam":
                    optimizer = keras.optimizers.Adam(
                        keras.optimizers.schedules.CosineDecay(accuracy.LEARNING_RATE, steps)
                    )
                else:
                    # `train`'s recipe: SGD with Nesterov momentum, linear
                    # warm-up over 5% of the steps, cosine decay, weight decay.
                    warmup = max(1, steps // 20)
                    optimizer = keras.optimizers.SGD(
                        keras.optimizers.schedules.CosineDecay(
                            0.0, steps - warmup, warmup_target=0.1, warmup_steps=warmup
                        ),
                        momentum=0.9,
                        nesterov=True,
                        weight_decay=5e-4,
                    )
                model.compile(
                    optimizer,
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"],
                )
                curve = []

                class Curve(keras.callbacks.Callback):
                    def __init__(self, points):
                        super().__init__()
                        self.points = points

                    def on_epoch_end(self, epoch, logs=None):
                        if (epoch + 1) % max(1, epochs // 10) and epoch + 1 != epochs:
                            return
                        saved = [(v.numpy()) for v in self.model.non_trainable_weights]
                        batch_norm.recompute_batch_norm_statistics(
                            self.model,
                            tf.data.Dataset.from_tensor_slices(images[train]).batch(
                                accuracy.BATCH_SIZE
                            ),
                        )
                        test_accuracy = float(
                            self.model.evaluate(
                                images[test],
                                labels[test],
                                batch_size=256,
                                verbose=0,
                                return_dict=True,
                            )["accuracy"]
                        )
                        for variable, value in zip(self.model.non_trainable_weights, saved):
                            variable.assign(value)
                        self.points.append(
                            {
                                "epoch": epoch + 1,
                                "loss": float(logs["loss"]),
                                "train_accuracy": float(logs["accuracy"]),
                                "test_accuracy": test_accuracy,
                            }
                        )

                keras.utils.set_random_seed(seed)
                model.fit(
                    images[train],
                    labels[train],
                    batch_size=accuracy.BATCH_SIZE,
                    epochs=epochs,
                    verbose=0,
                    callbacks=[Curve(curve)],
                )
                batch_norm.recompute_batch_norm_statistics(
                    model,
                    tf.data.Dataset.from_tensor_slices(images[train]).batch(accuracy.BATCH_SIZE),
                )
                rng = np.random.default_rng(seed)
                batch = rng.choice(train, 64, replace=False)
                rows, _ = block_scales(model, images[batch], labels[batch])
                predictions = [
                    np.argmax(model(images[test[i : i + 64]], training=True).numpy(), -1)
                    for i in range(0, len(test), 64)
                ]
                training_mode = float(np.mean(np.concatenate(predictions) == labels[test]))
                append(
                    {
                        "kind": "train",
                        "network": network,
                        "design": design,
                        "variant": variant,
                        "setting": setting,
                        "recipe": recipe,
                        "epochs": epochs,
                        "split": split,
                        "seed": seed,
                        "curve": curve,
                        "blocks": rows,
                        "test_accuracy": curve[-1]["test_accuracy"],
                        "test_accuracy_training_mode": training_mode,
                        "parameters": model.count_params(),
                        "time": time.perf_counter() - start,
                    }
                )
                print(
                    f"train {network} {design} {variant} {setting} {recipe} x{factor}: "
                    f"test {curve[-1]['test_accuracy']:.4f} (training mode "
                    f"{training_mode:.4f})",
                    flush=True,
                )


def _three(rows, key):
    """The value after the first, middle and last block."""
    values = [row.get(key) for row in rows]
    picks = [values[0], values[len(values) // 2], values[-1]]
    return " / ".join("-" if v is None else f"{v:.2f}" for v in picks)


def _mean_of(rows, key):
    """The mean over blocks, as text; "-" where no block has one (a zero branch has none)."""
    values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
    return f"{statistics.mean(values):.2f}" if values else "-"


def report():
    runs = read_runs()
    lines = []
    init = [r for r in runs if r["kind"] == "init"]
    if init:
        lines += [
            "### At initialisation",
            "",
            "One batch of 64 `digits16` training images (`digits32` for MobileNetV2), training "
            "mode, seeded. Stream: std of "
            "the residual stream after the first / middle / last block. Correlation: between "
            "a block's residual branch and its shortcut (mean over blocks with a shortcut). "
            "Gradient: norm of the loss's gradient over a block's weights relative to their "
            "norm, first / middle / last block.",
            "",
            "| network | design | variant | params | stream std | mean branch correlation "
            "| relative gradient |",
            "|---|---|---|---:|---|---:|---|",
        ]
        for r in init:
            lines.append(
                f"| {r['network']} | {r['design']} | {r['variant']} | {r['parameters']:,} | "
                f"{_three(r['blocks'], 'stream_std')} | "
                f"{_mean_of(r['blocks'], 'branch_correlation')} | "
                f"{_three(r['blocks'], 'relative_gradient')} |"
            )
        lines.append("")
    trained = [r for r in runs if r["kind"] == "train"]
    if trained:
        lines += [
            "### Trained",
            "",
            "One split of a setting (`accuracy.py`). Test accuracy in inference mode with "
            "the BatchNormalization statistics recomputed on the training images; in training "
            "mode (batch statistics, batches of 64). Curve: test accuracy at a tenth, half "
            "and the end of the run.",
            "",
            "| setting | split | recipe | epochs | network | design | variant | test % | "
            "training mode % | curve (test %) | stream std after training | mean branch "
            "correlation | s |",
            "|---|---|---|---:|---|---|---|---:|---:|---|---|---:|---:|",
        ]
        for r in sorted(
            trained,
            key=lambda r: (r["setting"], r["split"], r["recipe"], r["epochs"], r["network"]),
        ):
            curve = r["curve"]
            points = [curve[0], curve[len(curve) // 2], curve[-1]]
            lines.append(
                f"| {r['setting']} | {r['split']} | {r['recipe']} | {r['epochs']} | "
                f"{r['network']} | "
                f"{r['design']} | {r['variant']} | {100 * r['test_accuracy']:.2f} | "
                f"{100 * r['test_accuracy_training_mode']:.2f} | "
                + " / ".join(f"{100 * p['test_accuracy']:.1f}" for p in points)
                + " | "
                f"{_three(r['blocks'], 'stream_std')} | "
                f"{_mean_of(r['blocks'], 'branch_correlation')} | {r['time']:.0f} |"
            )
        lines.append("")
    from keras_mgconv._files import atomic_write

    def write(temporary):
        with open(temporary, "w") as file:
            file.write("\n".join(lines))

    atomic_write(REPORT, write)
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("init", "train", "report"))
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument(
        "--designs", nargs="+", default=[d[0] for d in DESIGNS], choices=[d[0] for d in DESIGNS]
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--setting", default="digits16-500", choices=list(accuracy.SETTINGS))
    parser.add_argument("--recipe", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--epochs-factor", type=int, default=1)
    parser.add_argument("--split", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "init":
        measure_init(args.networks, args.designs, args.variants, args.seed)
    elif args.what == "train":
        measure_training(
            args.networks,
            args.designs,
            args.variants,
            args.setting,
            args.recipe,
            args.epochs_factor,
            args.split,
        )
    report()


if __name__ == "__main__":
    main()
