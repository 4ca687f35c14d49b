"""Times `.tflite` files with LiteRT, in turn, in a process that has run no converter.

A process that has just run TensorFlow's converter can slow LiteRT's invokes
three- to fourfold (measured: ResNet56 multigrid 10.4 ms there, 2.8 ms in a fresh
process), so the benchmarks export in one process and time in this one:

    python benchmarks/litert_timing.py '{"paths": [...], "threads": [1], "repeats": 100,
                                          "warmup": 10, "rounds": 5}'

prints one JSON line: for every path, one dict per thread count.
"""

import collections
import json
import sys
import time

import numpy as np


def time_files(paths, threads, repeats, warmup, rounds):
    """Median wall and thread-CPU ms per invoke of every file, timed in turn, in this process.

    Each round times every file for `repeats // rounds` invokes per thread
    count, so that a change of background load over the run falls on all files
    alike; a figure is the median over rounds of the rounds' medians.

    Returns:
        For every path, one dict per thread count with "threads", "median_ms",
        "p90_ms" and "cpu_ms" (the invoking thread's CPU time, which counts the
        other threads' work only when they are the invoking thread).
    """
    from ai_edge_litert import interpreter as litert

    interpreters = {}
    for path in paths:
        for count in threads:
            interpreter = litert.Interpreter(model_path=path, num_threads=count)
            interpreter.allocate_tensors()
            details = interpreter.get_input_details()[0]
            values = np.random.default_rng(0).random(details["shape"], np.float32)
            if np.issubdtype(details["dtype"], np.integer):
                values = np.zeros(details["shape"], details["dtype"])
            interpreter.set_tensor(details["index"], values.astype(details["dtype"]))
            for _ in range(warmup):
                interpreter.invoke()
            interpreters[path, count] = interpreter
    samples = collections.defaultdict(lambda: {"wall": [], "p90": [], "cpu": []})
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for key, interpreter in interpreters.items():
            wall, cpu = [], []
            for _ in range(per_round):
                start, start_cpu = time.perf_counter(), time.thread_time()
                interpreter.invoke()
                cpu.append(time.thread_time() - start_cpu)
                wall.append(time.perf_counter() - start)
            samples[key]["wall"].append(np.median(wall))
            samples[key]["p90"].append(np.percentile(wall, 90))
            # thread_time ticks coarsely: the round's total over its invokes.
            samples[key]["cpu"].append(np.sum(cpu) / per_round)
    return {
        path: [
            {
                "threads": count,
                "median_ms": 1000 * float(np.median(samples[path, count]["wall"])),
                "p90_ms": 1000 * float(np.median(samples[path, count]["p90"])),
                "cpu_ms": 1000 * float(np.median(samples[path, count]["cpu"])),
            }
            for count in threads
        ]
        for path in paths
    }


if __name__ == "__main__":
    print(json.dumps(time_files(**json.loads(sys.argv[1]))))
