"""JARe: per-task low-rank slots mixed per query."""
from slm_llm.jare.layer import JareLinear
from slm_llm.jare.model import JareModel, lm_loss

__all__ = ["JareLinear", "JareModel", "lm_loss"]
