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
    "cos_uniform",
    "random_baseline",
    "layer_norm_plain",
    "layer_norm_geometry",
    "irreversibility",
    "summarize_cos",
    "grad_norm_per_layer",
    "grad_norm_at_init",
    "layer_index",
    "ActivationStats",
    "NormTimer",
    "find_norm_layers",
    "tensor_stats",
    "measure_invariances",
    "PAPER_TABLE1",
    "residual_stream",
    "stream_rms",
    "angular_change",
    "max_attention_logit",
]
