"""mixedae_fast: a fast MixedAE (Mixed Autoencoder, CVPR 2023) implementation.

kernels/, pipelines/ and benchmarks/ sit at the top of the repository (as the design fixes) but
install as mixedae_fast.kernels / .pipelines / .benchmarks; configs/ installs as package data so
`--config cpu_tiny` works from any directory.
"""
import re

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', open("mixedae_fast/__init__.py", encoding="utf-8").read()).group(1)
DALI_CU13, DALI_CU12 = "nvidia-dali-cuda130>=2.4", "nvidia-dali-cuda120>=2.4"

setup(
    name="mixedae_fast",
    version=VERSION,  # one source: mixedae_fast.__version__ (mixedae-fast --version)
    description="Fast MixedAE (Mixed Autoencoder) self-supervised ViT pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "mixedae_fast",
        "mixedae_fast.model",
        "mixedae_fast.train",
        "mixedae_fast.downstream",
        "mixedae_fast.kernels",
        "mixedae_fast.pipelines",
        "mixedae_fast.benchmarks",
        "mixedae_fast.configs",
    ],
    package_dir={
        "mixedae_fast": "mixedae_fast",
        "mixedae_fast.model": "mixedae_fast/model",
        "mixedae_fast.train": "mixedae_fast/train",
        "mixedae_fast.downstream": "mixedae_fast/downstream",
        "mixedae_fast.kernels": "kernels",
        "mixedae_fast.pipelines": "pipelines",
        "mixedae_fast.benchmarks": "benchmarks",
        "mixedae_fast.configs": "configs",
    },
    package_data={"mixedae_fast": ["measured.json"],
                  "mixedae_fast.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.11",
        "torchvision",
        "timm>=1.0.16,<1.1",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "safetensors",
        "matplotlib",
        "webdataset",  # streaming tar shards (local, URL, pipe:) for the torch loader
    ],
    # Nothing CUDA in install_requires: a CPU machine (the quickstart) gets no CUDA library. A GPU's CUDA torch
    # brings triton itself; DALI comes in the build for the machine's CUDA major version.
    extras_require={
        "dali-cu13": [DALI_CU13],
        "dali-cu12": [DALI_CU12],
        "dali": [DALI_CU13],  # the name older docs use: CUDA 13
        # the fused kernels' compiler; a CUDA torch already depends on it. The tests run its interpreter on CPU
        "triton": ["triton>=3.4; platform_system == 'Linux'"],
        "xformers": ["xformers>=0.0.35", "nvidia-cuda-runtime-cu12"],
        # torchrun / DDP come with torch, and `mixedae-fast launch slurm` writes a plain sbatch script:
        # the extra stays (the README lists it) but needs nothing
        "dist": [],
        # run.loggers beyond metrics.csv: TensorBoard event files, Weights & Biases
        "log": ["tensorboard", "wandb"],
        "dev": ["pytest", "ruff", "scikit-learn", "scikit-image", "triton>=3.4; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["mixedae-fast = mixedae_fast.cli:main"]},
)
