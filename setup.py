"""Distribution "vitas": one-shot supernet architecture search for Vision Transformers."""
from setuptools import setup

setup(
    name="vitas",
    version="0.1.0",
    description="Weight-entangled superformer training, architecture search (pymoo, RL, "
    "training-free proxies), retraining and inference for Vision Transformers.",
    python_requires=">=3.10",
    packages=["core", "supernet", "search", "retrain", "inference", "vitas", "vitas.commands"],
    package_data={"": ["*.yaml"]},
    install_requires=[
        "torch",
        "torchvision",
        "timm>=1.0",
        "pymoo>=0.6.1",
        "submitit>=1.5",
        "scikit-learn",
        "scipy",
        "numpy",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={"dev": ["pytest", "pytest-xdist", "pytest-timeout"]},
    entry_points={"console_scripts": ["vitas=vitas.cli:main"]},
)
