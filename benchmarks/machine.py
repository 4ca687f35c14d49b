"""The CPU a benchmark ran on, and the results files that name it."""

import json
import os
import platform

# The instruction sets that decide which kernels TensorFlow, oneDNN and XNNPACK run.
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_description():
    """E.g. "AMD EPYC (family 26, model 2), 2 cores, avx2 avx512f avx512_vnni avx512_bf16".

    The family and model tell apart CPUs sold under one name (AMD EPYC: 25 is
    Zen 3 or 4, 26 Zen 5), whose kernels can run at different relative speeds.
    """
    name, flags = platform.processor() or platform.machine(), set()
    family = model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "cpu family":
                    family = value.strip()
                elif key.strip() == "model":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    present = " ".join(flag for flag in _FLAGS if flag in flags) or "flags unknown"
    if family is not None:
        name += f" (family {family}, model {model})"
    return f"{name}, {os.cpu_count()} cores, {present}"


def write_results(name, rows, lines):
    """Writes results/`name`.json (the CPU and `rows`) and .md (`lines`); prints the lines."""
    output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(output + ".json", "w") as file:
        json.dump({"cpu": cpu_description(), "rows": rows}, file, indent=2)
        file.write("\n")
    with open(output + ".md", "w") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))
