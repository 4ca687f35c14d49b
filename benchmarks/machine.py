"""The CPU a benchmark ran on, and the results files that name it."""

import json
import os
import platform

# The instruction sets that decide which kernels TensorFlow, oneDNN and XNNPACK run.
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_description():
    """E.g. "Intel(R) Xeon(R) Processor, 2 cores, avx2 avx512f avx512_vnni amx_tile"."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    present = " ".join(flag for flag in _FLAGS if flag in flags) or "flags unknown"
    return f"{name}, {os.cpu_count()} cores, {present}"


def write_results(name, rows, lines):
    """Writes benchmarks/results/`name`.json (the CPU and `rows`) and .md (`lines`), and prints the lines."""
    output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(output + ".json", "w") as file:
        json.dump({"cpu": cpu_description(), "rows": rows}, file, indent=2)
        file.write("\n")
    with open(output + ".md", "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))
