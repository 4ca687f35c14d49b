"""Accuracy against parameters, the paper's comparison, over several seeds.

For each network (CIFAR ResNet20 at widths 1x, 2x and 4x, ResNet56 at 1x and
2x) the benchmark trains the baseline, the layer design (every block
convolution a `MultigridConv2D`) and the authors' block design
(`multigrid="block"`), the multigrid ones at group sizes 8 and 16, each with
`--seeds` seeds, through `keras_mgconv.training.train`: the package's recipe
(SGD with Nesterov momentum, weight decay, cosine schedule), checkpoints
selected on a stratified validation split held out of the training data, the
test split used only to report. Every run records the test accuracy of its
final model in inference mode and with batch statistics (BatchNormalization
normalising each test batch by its own statistics), of its selected
checkpoint, its parameters, multiply-adds and training time.

    python benchmarks/accuracy.py            # everything; hours on 2 cores
    python benchmarks/accuracy.py --quick    # smoke run: 2 seeds, 2 epochs, ResNet20 1x
    python benchmarks/accuracy.py --only 'ResNet20 1x'

Each run writes its own directory under the runs folder
(`benchmarks/results/accuracy_runs/` by default); a run with a summary is not
trained again, and an interrupted one resumes from its last epoch, so the
benchmark continues where it stopped. After every run the aggregate is
rewritten: `accuracy.json` (every run and the mean and standard deviation of
each configuration), `accuracy.md` (the table) and `accuracy.png` (test
accuracy against parameters, log scale, error bars of one standard deviation,
one line per design and group size).
"""

import argparse
import json
import os
import re
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
from matplotlib import ticker  # noqa: E402

from keras_mgconv import training  # noqa: E402
from keras_mgconv._files import atomic_write  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NETWORKS = (("ResNet20", 1), ("ResNet20", 2), ("ResNet56", 1), ("ResNet20", 4),
            ("ResNet56", 2))
DESIGNS = (("baseline", False, None), ("layer", "layer", 8), ("layer", "layer", 16),
           ("block", "block", 8), ("block", "block", 16))


def configurations(networks=NETWORKS):
    """Every (model, width, design, multigrid, group size), cheapest network first."""
    return [
        {"model": model, "width": width, "design": design, "multigrid": multigrid,
         "group_size": group_size}
        for model, width in networks for design, multigrid, group_size in DESIGNS
    ]


def label(config):
    """E.g. "ResNet20 2x layer s=8" or "ResNet56 1x baseline"."""
    group = "" if config["group_size"] is None else f" s={config['group_size']}"
    return f"{config['model']} {config['width']}x {config['design']}{group}"


def _summary_path(config, seed, runs_dir):
    return os.path.join(runs_dir, label(config).replace(" ", "_").replace("=", ""),
                        f"seed{seed}", "summary.json")


def run(config, seed, epochs, dataset, runs_dir):
    """Trains, or resumes, one configuration with one seed, unless it is finished."""
    summary_path = _summary_path(config, seed, runs_dir)
    if not os.path.exists(summary_path):
        training.train(model=config["model"], dataset=dataset, epochs=epochs,
                       multigrid=config["multigrid"], group_size=config["group_size"],
                       width=config["width"], seed=seed,
                       output_dir=os.path.dirname(summary_path), verbose=0)


def finished(configs, seeds, runs_dir):
    """(config, summaries) of every configuration with two or more of `seeds` finished."""
    done = []
    for config in configs:
        summaries = []
        for seed in range(seeds):
            path = _summary_path(config, seed, runs_dir)
            if os.path.exists(path):
                with open(path) as file:
                    summaries.append({"seed": seed, **json.load(file)})
        if len(summaries) >= 2:
            done.append((config, summaries))
    return done


def _mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(config, summaries):
    """Mean and standard deviation over the finished seeds of one configuration."""
    row = {**config, "label": label(config), "seeds": len(summaries),
           "parameters": summaries[0]["parameters"],
           "multiply_adds": summaries[0]["multiply_adds"]}
    for key in ("final_test_accuracy", "final_test_accuracy_batch_statistics",
                "selected_test_accuracy", "train_time"):
        row[key], row[f"{key}_std"] = _mean_std([s[key] for s in summaries])
    gaps = [s["final_test_accuracy_batch_statistics"] - s["final_test_accuracy"]
            for s in summaries]
    row["batch_statistics_gap"], row["batch_statistics_gap_std"] = _mean_std(gaps)
    return row


def markdown(rows):
    """The table: one row per configuration, accuracies in percent, mean ± std."""
    baselines = {(r["model"], r["width"]): r for r in rows if r["design"] == "baseline"}
    lines = [
        "| network | design | group size | seeds | params | params ratio | MACs | "
        "test acc. % (final) | test acc. % (selected on val.) | batch-stat. acc. % | "
        "batch-stat. gap (points) | train time s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = baselines.get((r["model"], 1))
        ratio = f"{r['parameters'] / base['parameters']:.2f}" if base else "-"
        lines.append(
            f"| {r['model']} {r['width']}x | {r['design']} | {r['group_size'] or '-'} | "
            f"{r['seeds']} | {r['parameters'] / 1e6:.3f}M | {ratio} | "
            f"{r['multiply_adds'] / 1e6:.1f}M | "
            f"{100 * r['final_test_accuracy']:.2f} ± {100 * r['final_test_accuracy_std']:.2f} | "
            f"{100 * r['selected_test_accuracy']:.2f} ± "
            f"{100 * r['selected_test_accuracy_std']:.2f} | "
            f"{100 * r['final_test_accuracy_batch_statistics']:.2f} ± "
            f"{100 * r['final_test_accuracy_batch_statistics_std']:.2f} | "
            f"{100 * r['batch_statistics_gap']:+.2f} ± {100 * r['batch_statistics_gap_std']:.2f} | "
            f"{r['train_time']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Test accuracy against parameters, one line per model, design and group size."""
    figure, axes = plt.subplots(figsize=(8, 5))
    lines = {}
    for r in rows:
        key = (r["model"], r["design"], r["group_size"])
        lines.setdefault(key, []).append(r)
    for (model, design, group_size), points in sorted(
            lines.items(), key=lambda item: tuple(map(str, item[0]))):
        points.sort(key=lambda r: r["parameters"])
        axes.errorbar([r["parameters"] for r in points],
                      [100 * r["final_test_accuracy"] for r in points],
                      yerr=[100 * r["final_test_accuracy_std"] for r in points],
                      marker="o" if model == "ResNet20" else "s", capsize=3,
                      linestyle="-" if design != "baseline" else "--",
                      label=f"{model} {design}" + (f" s={group_size}" if group_size else ""))
        for r in points:
            axes.annotate(f"{r['width']}x", (r["parameters"], 100 * r["final_test_accuracy"]),
                          textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes.set_xscale("log")
    millions = ticker.FuncFormatter(lambda value, _: f"{value / 1e6:g}M")
    axes.xaxis.set_major_formatter(millions)
    axes.xaxis.set_minor_formatter(millions)
    axes.set_xlabel("parameters")
    axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, ncol=2)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_results(rows, runs, arguments, output):
    """accuracy.json, .md and .png under `output` (a path prefix), each atomically."""
    table = markdown(rows)
    content = {"arguments": arguments, "configurations": rows, "runs": runs}

    def write_json(temporary):
        with open(temporary, "w") as file:
            json.dump(content, file, indent=2)

    def write_markdown(temporary):
        with open(temporary, "w") as file:
            file.write(table)

    atomic_write(output + ".json", write_json)
    atomic_write(output + ".md", write_markdown)
    atomic_write(output + ".png", lambda temporary: plot(rows, temporary))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15,
                        help="epochs per run (default 15, `keras-mgconv train`'s)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="configurations whose label matches one of these regexes, "
                             "e.g. 'ResNet20 1x' or 'block s=8'")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 seeds, 2 epochs, ResNet20 1x, into *_quick files")
    parser.add_argument("--runs-dir", default=None,
                        help="where each run trains (default benchmarks/results/accuracy_runs)")
    parser.add_argument("--output", default=None,
                        help="path prefix of the .json/.md/.png results "
                             "(default benchmarks/results/accuracy)")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"a mean and spread need at least 2 seeds. Received: --seeds {args.seeds}")
    networks = NETWORKS
    suffix = ""
    if args.quick:
        args.seeds, args.epochs, networks, suffix = 2, 2, (("ResNet20", 1),), "_quick"
    runs_dir = args.runs_dir or os.path.join(RESULTS, f"accuracy_runs{suffix}")
    output = args.output or os.path.join(RESULTS, f"accuracy{suffix}")
    selected = [c for c in configurations(networks)
                if not args.only or any(re.search(p, label(c)) for p in args.only)]
    if not selected:
        parser.error(f"no configuration matches --only {args.only}")

    arguments = {"seeds": args.seeds, "epochs": args.epochs, "dataset": args.dataset}
    start = time.perf_counter()
    for number, config in enumerate(selected, 1):
        for seed in range(args.seeds):
            print(f"[{number}/{len(selected)}] {label(config)}, seed {seed} "
                  f"({time.perf_counter() - start:.0f} s so far)", flush=True)
            run(config, seed, args.epochs, args.dataset, runs_dir)
        # Every finished configuration in the runs folder, also from earlier
        # invocations with other --only patterns.
        done = finished(configurations(networks), args.seeds, runs_dir)
        rows = [aggregate(config, summaries) for config, summaries in done]
        runs = [{"label": label(config), **summary}
                for config, summaries in done for summary in summaries]
        print(write_results(rows, runs, arguments, output), flush=True)

if __name__ == "__main__":
    main()
