"""Analysis: pure functions on tensors and models — geometry, gradient flow, invariances, hooks."""

from normlab.analysis.depth import angular_change, max_attention_logit, residual_stream, stream_rms
from normlab.analysis.geometry import (
    cos_uniform,
    irreversibility,
    layer_norm_geometry,
    layer_norm_plain,
    random_baseline,
    summarize_cos,
)
from normlab.analysis.gradients import grad_norm_at_init, grad_norm_per_layer, layer_index
from normlab.analysis.hooks import ActivationStats, NormTimer, find_norm_layers, tensor_stats
from normlab.analysis.invariance import PAPER_TABLE1, measure_invariances

__all__ = [
    "PAPER_TABLE1",
    "ActivationStats",
    "NormTimer",
    "angular_change",
    "cos_uniform",
    "find_norm_layers",
    "grad_norm_at_init",
    "grad_norm_per_layer",
    "irreversibility",
    "layer_index",
    "layer_norm_geometry",
    "layer_norm_plain",
    "max_attention_logit",
    "measure_invariances",
    "random_baseline",
    "residual_stream",
    "stream_rms",
    "summarize_cos",
    "tensor_stats",
]
