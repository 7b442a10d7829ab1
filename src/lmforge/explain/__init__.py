"""Explainability: why the model said what it said.

    llm.explain_generation("The capital of France is")    # per token: probability, rank, entropy, alternatives
    llm.explain_attention("床前明月光")                      # (layers, heads, T, T) weights, rollout, heatmaps
    llm.explain_classification("WINNER!! Claim your prize")  # token attributions (integrated gradients, ...)
    llm.logit_lens("The capital of France is")             # what the residual stream predicts after each block

``tokens`` (token probabilities, characters kept whole), ``attention`` (attention maps from the model's own
opt-in return path, rollout, the logit lens), ``attribution`` (integrated gradients with its completeness
check, gradient x input, occlusion, attention rollout as a score), ``render`` (terminal, HTML, PNG).
"""

from lmforge.explain.attention import AttentionMaps, LogitLens, attention_maps, logit_lens
from lmforge.explain.attribution import DEFAULT_BASELINE, DEFAULT_STEPS, METHODS, Attribution, attribute
from lmforge.explain.tokens import TokenExplanation, explain_generation, explain_text

__all__ = [
    "DEFAULT_BASELINE",
    "DEFAULT_STEPS",
    "METHODS",
    "AttentionMaps",
    "Attribution",
    "LogitLens",
    "TokenExplanation",
    "attention_maps",
    "attribute",
    "explain_generation",
    "explain_text",
    "logit_lens",
]
