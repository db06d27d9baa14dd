"""Model specs for the planner, the compiler and the runtime: pure Python, no torch.

`ModelSpec` (family, name, `TextSpec`, `VisionSpec`, parameter counts by part),
the registry of real EGM architectures (`get_spec("egm-8b")`, `list_specs()`),
and `spec_from_config(dir_or_config)` for a Hugging Face checkpoint. What differs
between model families lives in one record each, `egm_edge.models.families`.
"""

from egm_edge.models.hf_config import SUPPORTED, spec_from_config, supported_architectures, to_hf_config
from egm_edge.models.registry import ALIASES, REGISTRY, alias_of, choices, get_spec, list_specs, same_architecture
from egm_edge.models.spec import FAMILIES, PARTS, ModelSpec, PartParams, TextSpec, VisionSpec

__all__ = [
    "ALIASES", "FAMILIES", "PARTS", "REGISTRY", "SUPPORTED", "ModelSpec", "PartParams", "TextSpec", "VisionSpec",
    "alias_of", "choices", "get_spec", "list_specs", "same_architecture", "spec_from_config", "supported_architectures",
    "to_hf_config",
]
