"""Install cached-diffusers. ``models/`` and ``pipelines/`` install as ``cached_diffusers.models`` / ``.pipelines``."""

from setuptools import setup

setup(
    name="cached-diffusers",
    version="0.1.0",
    description="Step caching (TeaCache, ...) for diffusion transformers, as drop-in subclasses of diffusers classes",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "cached_diffusers", "cached_diffusers.models", "cached_diffusers.pipelines", "cached_diffusers.tools",
        "cached_diffusers.tools.cli",
    ],
    package_dir={
        "cached_diffusers": "cached_diffusers",
        "cached_diffusers.models": "models",
        "cached_diffusers.pipelines": "pipelines",
    },
    package_data={"cached_diffusers": ["assets/*/*", "assets/*/*/*"]},
    install_requires=[
        "torch>=2.4",
        # The cached Qwen-Image and FLUX.2 transformers run the installed parent's own forward and cache through its
        # block calls (no copy of diffusers code): any release with the classes and pipelines. Model and pipeline tests
        # run on 0.40.0, 0.41.0, 0.42.0 and 0.42.1 (docs/development.md); no known break above. Tested with
        # transformers 5.23 and 5.24.
        "diffusers>=0.40.0",
        "transformers>=5.23,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "pillow",
    ],
    extras_require={
        "bench": ["scikit-image>=0.22", "matplotlib>=3.7"],  # fidelity metrics and plots: `bench` and `demo`
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the fast set on two processes (docs/development.md, "Tests")
            "cache-dit==1.5.3",
            "peft>=0.17",  # diffusers' load_lora_weights (tests/test_ecosystem.py)
            "nbclient>=0.10",  # the notebooks in notebooks/ run in the tests (tests/test_notebooks.py)
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "hypothesis>=6.100",  # property-based and fuzz tests (tests/test_generation_properties.py, test_fuzz.py)
            "scikit-image>=0.22",  # the bench extra: the suite tests bench and demo
            "matplotlib>=3.7",
            "parameterized>=0.9",  # diffusers' own LoRA test files (scripts/run_upstream_diffusers_tests.py)
        ]
    },
    entry_points={"console_scripts": ["cached-diffusers=cached_diffusers.tools.cli:main"]},
)
