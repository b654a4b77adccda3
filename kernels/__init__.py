"""Triton kernels for SRC (pairwise score aggregation, weighted DPO loss) with their PyTorch references."""

import importlib.metadata as _metadata


def _refuse_hub_kernels() -> None:
    # Hugging Face's `kernels` distribution installs a top-level package of the same name. Whichever of the two
    # Python finds first shadows the other, and transformers then fails deep inside its own imports (for example
    # "cannot import name 'CUDAProperties' from 'kernels'"). Say what is wrong instead.
    try:
        version = _metadata.version("kernels")
    except _metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"The Hugging Face package 'kernels' {version} is installed in this environment, and its import name "
        f"'kernels' is this project's Triton package ({__file__}). transformers 5.25 and later require it; "
        "install this project's pinned range instead: pip install 'transformers>=5.0,<5.25' && "
        "pip uninstall -y kernels"
    )


_refuse_hub_kernels()
