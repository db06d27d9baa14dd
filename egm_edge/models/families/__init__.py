"""Model families: one frozen record each (`Family`), the only place that names a family's tokens,
prompts, module prefixes and architectures. Every gate asks the record (`family.require(stage, what)`).

Adding a family: a module here with its record (`register(Family(...))`), imported below, and its
export graph module. Tests register a toy one with `register` / `unregister`.
"""

from egm_edge.models.families.base import (
    STAGES, TASKS, Family, FamilyTokens, families, family_names, family_of_config, get_family, register, unregister,
)
from egm_edge.models.families.qwen3_vl import QWEN3_VL
from egm_edge.models.families.internvl import INTERNVL

__all__ = [
    "INTERNVL", "QWEN3_VL", "STAGES", "TASKS", "Family", "FamilyTokens", "families", "family_names", "family_of_config",
    "get_family", "register", "unregister",
]
