"""The study's experiments, one module each. Every module names its ``NUMBER`` and ``TITLE``, says whether
it ``TRAINS`` (then every rank runs it, and only rank 0 gets an :class:`~normlab.study.report.Experiment`),
and has ``run(ctx) -> Experiment``, which measures one published claim and renders table, plot and verdict.

1. loss and speed of every variant over seeds (Zhang & Sennrich 2019);
2. gradient norm per layer at initialization, Post-LN vs Pre-LN (Xiong et al. 2020, Fig. 3);
3. warmup sensitivity at a high learning rate, Post-LN vs Pre-LN (Xiong et al. 2020);
4. ``cos(h, 1)`` of the inputs to every norm layer; irreversibility (Gupta et al. 2024);
5. invariances of LayerNorm vs RMSNorm (Zhang & Sennrich 2019, Table 1);
6. exact Pre-LN → Pre-RMSNorm conversion (Jiang et al. 2023);
7. the norm layers' share of a training step across widths;
8. gradient-norm trajectories, RMSNorm vs LayerNorm;
9. why Transformers prefer LayerNorm to BatchNorm: batch size, train/eval statistics, context length (Shen et al.
   2020).
10. the residual stream and each layer's change of it across depth, per placement (Peri-LN, LayerNorm Scaling).
11. QK-norm and learning-rate sensitivity (Wortsman et al. 2023);
12. DyT's α₀ against LayerNorm (Zhu et al. 2025).
"""

from __future__ import annotations

from types import ModuleType

from normlab.study.experiments import (
    batch_vs_layer,
    conversion,
    depth,
    dyt_alpha,
    geometry,
    grad_init,
    grad_trajectories,
    invariances,
    loss_speed,
    norm_share,
    qk_norm,
    warmup,
)
from normlab.study.experiments.common import Context, model_config, run_config

#: The experiments by number, in report order.
REGISTRY: dict[int, ModuleType] = {m.NUMBER: m for m in sorted(
    (loss_speed, grad_init, warmup, geometry, invariances, conversion, norm_share, grad_trajectories,
     batch_vs_layer, depth, qk_norm, dyt_alpha),
    key=lambda m: m.NUMBER)}
#: The experiments that read experiment 1's grid of trained variants.
USES_GRID = {1, 4, 6, 8}

__all__ = ["REGISTRY", "USES_GRID", "Context", "model_config", "run_config"]
