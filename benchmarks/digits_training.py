"""The README's training figures: multigrid against baseline on the embedded digits.

Trains the `keras-mgconv train` default (CIFAR ResNet20, 15 epochs, SGD with
Nesterov momentum, cosine schedule) twice with the same seed, multigrid and
baseline, and records the test-accuracy curve of both:

    python benchmarks/digits_training.py       # writes benchmarks/results/digits_training.*

Target: the multigrid network within 1 point of the baseline's best test accuracy.
"""

import argparse
import json
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from keras_mgconv import training  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _curve(output_dir):
    with open(os.path.join(output_dir, "history.csv")) as file:
        header, *rows = [line.strip().split(",") for line in file]
    return [float(row[header.index("val_accuracy")]) for row in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ResNet20")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, multigrid in (("baseline", False), ("multigrid", True)):
            output_dir = os.path.join(scratch, name)
            summary = training.train(model=args.model, epochs=args.epochs, multigrid=multigrid,
                                     seed=args.seed, output_dir=output_dir, verbose=0)
            runs[name] = {key: summary[key] for key in (
                "parameters", "multiply_adds", "best_test_accuracy", "final_test_accuracy",
                "train_time", "group_size", "batch_norm_momentum")}
            runs[name]["test_accuracy_curve"] = _curve(output_dir)
    gap = runs["baseline"]["best_test_accuracy"] - runs["multigrid"]["best_test_accuracy"]
    result = {"model": args.model, "dataset": "digits", "epochs": args.epochs,
              "seed": args.seed, "runs": runs, "best_accuracy_gap_points": 100 * gap,
              "target_met": gap <= 0.01}

    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "digits_training.json"), "w") as file:
        json.dump(result, file, indent=2)
    lines = ["| network | parameters | multiply-adds | best test accuracy | final | "
             "train time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        lines.append(f"| {args.model} {name} | {run['parameters']:,} | "
                     f"{run['multiply_adds']:,} | {run['best_test_accuracy']:.4f} | "
                     f"{run['final_test_accuracy']:.4f} | {run['train_time']:.1f} |")
    table = "\n".join(lines)
    with open(os.path.join(RESULTS, "digits_training.md"), "w") as file:
        file.write(table + "\n")
    print(table)
    print(f"multigrid best accuracy is {100 * gap:.2f} points below the baseline "
          f"(target: at most 1): {'met' if result['target_met'] else 'NOT met'}")

    for name, run in runs.items():
        curve = run["test_accuracy_curve"]
        plt.plot(range(1, len(curve) + 1), curve, marker="o",
                 label=f"{name} ({run['parameters']:,} parameters)")
    plt.xlabel("epoch")
    plt.ylabel("test accuracy")
    plt.ylim(0.5, 1.0)
    plt.title(f"{args.model} on the embedded digits")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(os.path.join(RESULTS, "digits_training.png"), dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main()
