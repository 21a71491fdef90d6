"""Install cached-diffusers. ``models/`` and ``pipelines/`` install as ``cached_diffusers.models`` / ``.pipelines``."""

from setuptools import setup

setup(
    name="cached-diffusers",
    version="0.1.0",
    description="Step caching (TeaCache, ...) for diffusion transformers, as drop-in subclasses of diffusers classes",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cached_diffusers", "cached_diffusers.models", "cached_diffusers.pipelines"],
    package_dir={
        "cached_diffusers": "cached_diffusers",
        "cached_diffusers.models": "models",
        "cached_diffusers.pipelines": "pipelines",
    },
    package_data={"cached_diffusers": ["assets/*/*", "assets/*/*/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "pillow",
        "scikit-image>=0.22",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "cache-dit==1.5.3",
            "peft>=0.17",  # diffusers' load_lora_weights (tests/test_ecosystem.py)
            "nbclient>=0.10",  # the notebooks in notebooks/ run in the tests (tests/test_notebooks.py)
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.7",
            "parameterized>=0.9",  # diffusers' own LoRA test files (scripts/run_upstream_diffusers_tests.py)
        ]
    },
    entry_points={"console_scripts": ["cached-diffusers=cached_diffusers.cli:main"]},
)
