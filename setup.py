"""Install unidml: `pip install -e .` (add `[test]` for the test suite's oracles)."""
from setuptools import find_packages, setup

setup(
    name="unidml",
    version="0.1.0",
    description="Distributed deep metric learning: cross-entropy vs pairwise losses (Boudiaf et al., ECCV 2020)",
    python_requires=">=3.10",
    packages=find_packages(include=["unidml", "unidml.*"]),
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "numpy",
        "scipy",
        "pillow",
        "pyyaml",
        "omegaconf>=2.3",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "faiss-cpu",
        "nvidia-dali-cuda130",
        "deepspeed",
        "triton",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytorch-metric-learning>=2.0"],
    },
    entry_points={"console_scripts": ["unidml=unidml.launcher.cli:main"]},
)
