from setuptools import setup

setup(
    name="softpo",
    version="0.1.0",
    description="Fused Triton kernels for RL policy losses (SAPO, SPO, GRPO family) for LLM fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as softpo.kernels, reached through the link softpo/kernels -> ../kernels. It has no
    # __init__.py: from the checkout root (python -m, pytest, torchrun, a notebook) the folder is then at
    # most a namespace portion named `kernels`, which never wins over PyPI's regular package of that name
    # (transformers imports it).
    packages=["softpo", "softpo.bench", "softpo.integrations", "softpo.kernels", "softpo.train"],
    install_requires=[
        # The floor is the oldest release CI tests (.ci/run: 2.13, and the newest, 2.15). The APIs used would
        # allow 2.6 (public FSDP2 `fully_shard`, torch.library custom ops with autograd; addmm(out_dtype=) is
        # feature-detected), but nothing older than 2.13 is tested.
        "torch>=2.13",
        "triton>=3.0",
        "transformers>=4.51",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "liger-kernel", "trl>=1.16", "accelerate", "datasets", "peft"],
        "bench": ["pytest-benchmark", "liger-kernel", "trl>=1.16", "matplotlib", "cut-cross-entropy"],
        "trl": ["trl>=1.16", "accelerate", "datasets", "peft"],
        # The TRL drop-in under ZeRO-3. DS_BUILD_OPS=0 (the default) compiles no op at install.
        "deepspeed": ["deepspeed>=0.19", "trl>=1.16", "accelerate", "datasets"],
        "verl": ["verl>=0.9.1"],
    },
    entry_points={
        "console_scripts": ["softpo=softpo.cli:main"],
        # verl imports every "verl.plugins" entry point when it is imported: this registers softpo's losses.
        "verl.plugins": ["softpo=softpo.integrations.verl"],
    },
)
