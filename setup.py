"""Distribution "vitas": one-shot supernet architecture search for Vision Transformers.

The stage folders stay at the top of the repository (core/, supernet/, search/, retrain/,
inference/) but install under the `vitas` namespace (`vitas.core`, `vitas.supernet`, ...), so that
nothing but `vitas` lands at the top of site-packages, in regular and in editable installs.
"""
from pathlib import Path

from setuptools import find_packages, setup

STAGE_FOLDERS = ("core", "supernet", "search", "retrain", "inference")


def namespaced_packages() -> dict[str, str]:
    """Package name -> folder, for `vitas` itself and every stage folder (with subpackages)."""
    mapping = {f"vitas.{p}": f"vitas/{p}".replace(".", "/") for p in find_packages("vitas")}
    mapping["vitas"] = "vitas"
    for folder in STAGE_FOLDERS:
        mapping[f"vitas.{folder}"] = folder
        for sub in find_packages(folder):
            mapping[f"vitas.{folder}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return mapping


PACKAGES = namespaced_packages()

setup(
    name="vitas",
    version="0.2.0",
    description="Weight-entangled superformer training, architecture search (pymoo, RL, "
    "training-free proxies), retraining and inference for Vision Transformers.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(PACKAGES),
    package_dir=PACKAGES,
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
    extras_require={
        # the latency model's `onnx` backend (latency.backend=onnx)
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        # the test suite exercises every backend
        "dev": ["pytest", "pytest-xdist", "pytest-timeout", "onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["vitas=vitas.cli:main"]},
)
