from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    for line in (ROOT / "gspo_engine" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("gspo_engine/__init__.py has no __version__")


setup(
    name="gspo-engine",
    version=read_version(),
    description="GSPO reinforcement-learning fine-tuning of Qwen3 models with fused Triton kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gspo_kernels", "gspo_kernels.*", "gspo_engine", "gspo_engine.*"]),
    package_data={"gspo_engine": ["assets/*"]},
    install_requires=[
        # The oldest pair checked: the interpreter kernel tests and gspo_kernels.compile_check pass with
        # torch 2.7.1 and Triton 3.3.1 (README, "Set-up").
        "torch>=2.7",
        "triton>=3.3; platform_system == 'Linux'",
        "transformers>=4.51",
        "tokenizers",
        "safetensors",
        "numpy",
        "click>=8.0",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "pyarrow",  # parquet prompt datasets
        "pillow",  # images of Qwen3-VL prompts, and the drawn built-in vision tasks
        # Models by Hub id and their cache (gspo_engine/hub); checked with huggingface_hub 2.4 (its
        # IncompleteSnapshotError and httpx2 client) and datasets 5.2 (save_to_disk folders, Hub datasets).
        "huggingface_hub>=2.4",
        "datasets>=5.2",
        "math-verify",  # the `math` reward
        "peft>=0.17",  # LoRA (lora.rank > 0); 0.17 added LoRA on parameters, which the MoE experts need
    ],
    extras_require={
        # liger-kernel: the parity test against its sequence-level GRPO loss runs in CI too.
        # scipy: the Qwen3-Omni tests write and read WAV files (the omni extra's reader).
        "test": ["pytest>=7", "pytest-benchmark>=4", "liger-kernel", "trl", "scipy"],
        "bench": ["pytest-benchmark>=4", "liger-kernel"],
        # flash-linear-attention's kernels for the Gated DeltaNet layers of Qwen3-Next / Qwen3.5 on CUDA
        # (gspo_engine/model/fla_backend.py, checked against 0.6.0); CPUs run our PyTorch path without it.
        "next": ["fla-core>=0.6.0,<0.7"],
        # Qwen3-Omni prompts with audio: WAV files and resampling (scipy), FLAC files (soundfile).
        "omni": ["scipy", "soundfile"],
    },
    entry_points={"console_scripts": ["gspo-engine=gspo_engine.cli:main"]},
)
