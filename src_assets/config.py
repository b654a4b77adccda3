"""Run settings and the named profiles.

Everything the pipeline can be told lives in ``SRCConfig``; a profile is a set
of defaults. ``default`` is the embedded run the README's main command makes;
``smoke`` shrinks every size so that tests and quick checks finish in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .tiny_models import TinySpec

TINY = "tiny"  # a model reference meaning "build the tiny local model"


@dataclass(frozen=True)
class SRCConfig:
    seed: int = 0
    # Data: sizes of the synthetic splits (0 turns synthetic data off; Parquet
    # files under ``source_prefix`` in the store are added either way).
    n_sft: int = 2000
    n_calibrate: int = 400
    n_eval: int = 500
    min_objects: int = 2
    max_objects: int = 5
    source_prefix: str = "source"
    # Models: "tiny", a local model directory, or a hub id.
    policy_model: str = TINY
    scorer_model: str = TINY
    use_fused_dpo_kernel: bool = True  # the Triton DPO loss when training on CUDA; off: the eager reference
    tiny_hidden_size: int = 128
    tiny_layers: int = 2

    def tiny_spec(self) -> TinySpec:
        return TinySpec(hidden_size=self.tiny_hidden_size, intermediate_size=2 * self.tiny_hidden_size, num_layers=self.tiny_layers)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, SRCConfig] = {
    "default": SRCConfig(),
    "smoke": SRCConfig(n_sft=60, n_calibrate=12, n_eval=20, tiny_hidden_size=32, tiny_layers=1),
}


def profile(name: str, **overrides) -> SRCConfig:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    known = {f.name for f in fields(SRCConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; SRCConfig has {sorted(known)}")
    return replace(PROFILES[name], **overrides)
