"""Install unidml: `pip install -e .` for the core (CPU or GPU, any platform torch supports), or with extras:

- `dali`: NVIDIA DALI data loader (the torchvision loader is used without it)
- `deepspeed`: `engine.backend=deepspeed` (DDP needs nothing extra)
- `triton`: fused GPU loss kernels (the tiled kernels are used without it)
- `gpu`: DALI built for CUDA 13 (on a CUDA machine). FAISS for the GPU is not an extra: faiss-cpu (core) and
  faiss-gpu both install the module `faiss`, so one would overwrite the other; docs/cluster.md gives the
  command that replaces faiss-cpu by faiss-gpu, and a run logs at its start which FAISS it uses
- `timm`, `export` (ONNX), `study` (Optuna tuning): the backbones, exporters and tuner that need them
- `mlflow` (mlflow-skinny), `wandb`: the experiment trackers of `log.trackers` (TensorBoard is core)
- `all`: every extra that installs on any Linux machine (not `gpu`); `test`: the test suite and its oracles

`pip install -e ".[all,test]"` is what the test suite runs with.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "unidml" / "__init__.py").read_text()).group(1)

EXTRAS = {
    "dali": ["nvidia-dali-cuda130"],
    "deepspeed": ["deepspeed"],
    "triton": ["triton"],
    "gpu": ["nvidia-dali-cuda130"],
    "timm": ["timm"],
    "export": ["onnx", "onnxruntime"],
    "study": ["optuna"],
    "mlflow": ["mlflow-skinny"],
    "wandb": ["wandb>=0.20"],  # wandb.init(reinit="create_new"): a study's runs follow each other in one process
    "test": ["pytest", "pytest-timeout", "pytorch-metric-learning>=2.0", "ruff", "psutil"],
}
EXTRAS["all"] = sorted({req for name in ("dali", "deepspeed", "triton", "timm", "export", "study",
                                                 "mlflow", "wandb")
                        for req in EXTRAS[name]})

setup(
    name="unidml",
    version=VERSION,
    description="Deep metric learning training: cross-entropy and pairwise losses side by side, honest Recall@K",
    python_requires=">=3.10",
    packages=find_packages(include=["unidml", "unidml.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "scipy",  # the Cars196 annotation file (.mat)
        "pillow",
        "pyyaml",
        "omegaconf>=2.3",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "faiss-cpu",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["unidml=unidml.launcher.cli:main"]},
)
