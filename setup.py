"""Packaging for apriel-jax.

Version ranges are deliberately "compatible" rather than exact:

* the lower bounds are the set this project is developed and tested with on
  CPU (Python 3.11, jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint
  0.12.8, ...);
* the upper bounds admit the next jax minor release (0.11.x, used on the GPU
  machines with Python 3.12) but stop before releases that are likely to break
  APIs we rely on.

Notes on the extras:

* ``test`` pins ``torch==2.13.0`` exactly.  On the development machines a CPU
  build of that exact release is available locally; any looser requirement can
  make pip download a multi-GB CUDA build from PyPI instead.  torchvision is
  intentionally absent (it does not import beside torch 2.13).
* ``test`` installs ``jax[tpu]`` (on Linux), i.e. the libtpu release that the
  installed jax pins for TPU pods (0.0.42.* for jax 0.10.2), so that TPU
  ahead-of-time compiles on a CPU-only host (``apriel-jax aot``, the AOT tests)
  use the very compiler a pod installed with ``.[tpu]`` runs. A newer libtpu
  compiles too, but its HLO is unreadable by the older jaxlib
  (``compiled.as_text()`` fails), and its memory figures differ.
* ``cuda`` / ``cuda12`` install the CUDA 12 jax plugin, ``cuda13`` the CUDA 13
  one.
"""

import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))

JAX_RANGE = ">=0.10.2,<0.12"


def _long_description() -> str:
    readme = os.path.join(_HERE, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            return f.read()
    return "JAX/Flax NNX reimplementation of the Apriel-1.5 / Pixtral VLM training recipe."


INSTALL_REQUIRES = [
    f"jax{JAX_RANGE}",
    f"jaxlib{JAX_RANGE}",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.14",
    "chex>=0.1.90,<0.2",
    "ml-collections>=1.1.0,<2",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",
    "sentencepiece>=0.2.0,<0.3",
    # Checkpoints' chat templates (apriel_jax.data.chat_template); 3.1.6 closes known sandbox escapes.
    "jinja2>=3.1.6,<4",
    # mistral-common itself caps numpy below 2.4 on Python <= 3.12.
    "numpy>=2.0,<3",
    "pillow>=10.3",
    "safetensors>=0.4.3,<1",
    "ml_dtypes>=0.5.0",
    "psutil>=5.9",
    "mistral-common[opencv]>=1.13.1,<2",
    "tokenizers>=0.22,<0.24",
    "matplotlib>=3.8",
    # TensorBoard event files without tensorflow.
    "tensorboardX>=2.6.5,<3",
    # gs:// locations (apriel_jax.storage): etils.epath over fsspec/gcsfs for file operations; CRC32C to
    # verify downloads; orbax/tensorstore and array_record speak GCS themselves.
    "etils[epath]>=1.12",
    "gcsfs>=2025.3",
    "google-crc32c>=1.5",
    # Parquet data shards (most public VLM datasets); also required by tensorflow-datasets.
    "pyarrow>=15",
]

NOTEBOOK_KERNEL_REQUIRES = [
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0,<10",
        "pytest-xdist>=3.6,<4",  # `make test` runs two test files at a time
        "transformers>=5.0,<6",
        # LoRA parity: our PEFT-layout adapters loaded by PeftModel onto transformers (tests/test_lora.py).
        "peft>=0.21,<0.23",
        # Exact pin on purpose: see the module docstring.
        "torch==2.13.0",
        f'jax[tpu]{JAX_RANGE}; platform_system == "Linux"',
        # A GCS JSON API server on loopback: the gs:// tests run against it (tests/gcs_server.py).
        "gcp-storage-emulator>=2024.8",
        *NOTEBOOK_KERNEL_REQUIRES,
    ],
    "tpu": [f"jax[tpu]{JAX_RANGE}"],
    "cuda": [f"jax[cuda12]{JAX_RANGE}"],
    "cuda12": [f"jax[cuda12]{JAX_RANGE}"],
    "cuda13": [f"jax[cuda13]{JAX_RANGE}"],
    "notebooks": [
        "jupyter>=1.0",
        "matplotlib>=3.8",
        "ipywidgets>=8.0",
    ],
}

setup(
    name="apriel-jax",
    version="0.1.0",
    description=(
        "JAX/Flax NNX reimplementation of the Apriel-1.5 / Pixtral "
        "vision-language model training recipe"
    ),
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["apriel_jax", "apriel_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "apriel-jax=apriel_jax.cli:main",
        ],
    },
    include_package_data=True,
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Operating System :: POSIX :: Linux",
    ],
)
