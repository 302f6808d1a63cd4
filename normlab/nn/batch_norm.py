"""``BatchNorm``: ``torch.nn.BatchNorm1d`` over ``(N, C)`` / ``(N, C, L)``, or over ``(N, L, C)`` tokens.

Parameters ``weight``/``bias``, buffers ``running_mean``/``running_var``/``num_batches_tracked``, their
defaults, ``reset_parameters``, ``reset_running_stats`` and ``state_dict`` keys are those of
``torch.nn.BatchNorm1d``: a state dict loads into either. ``process_group=`` synchronizes the training
statistics across processes (as ``torch.nn.SyncBatchNorm``, on any backend, gloo included).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.ops._common import check_choice
from normlab.ops.batch_norm import LAYOUTS, batch_norm


class BatchNorm(nn.Module):
    _version = 2  # as torch's _NormBase: version 2 added num_batches_tracked
    __constants__: ClassVar[list[str]] = ["track_running_stats", "momentum", "eps", "num_features", "affine", "layout"]

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, device=None, dtype=None, *, layout: str = "NCL", bias: bool = True,
        process_group=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.layout = check_choice(layout, "layout", LAYOUTS)
        self.process_group = process_group
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            expected = "(N, C) or (N, C, L)" if self.layout == "NCL" else "(N, C) or (N, L, C)"
            raise ValueError(f"expected 2D or 3D input {expected} for layout {self.layout!r}, got {input.dim()}D input")
        features = input.shape[1] if self.layout == "NCL" else input.shape[-1]
        if features != self.num_features:
            where = "dim 1" if self.layout == "NCL" else "the last dim"
            raise ValueError(
                f"expected input with {self.num_features} features (num_features) at {where} for layout "
                f"{self.layout!r}, got shape {list(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # as torch: batch statistics in training, and in eval when no running statistics are kept
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if (update or not self.training) else None,
            self.running_var if (update or not self.training) else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
            layout=self.layout,
            num_batches_tracked=self.num_batches_tracked if update else None,
            process_group=self.process_group if self.training else None,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        return s if self.layout == "NCL" else s + f", layout={self.layout!r}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # a state dict from before the counter existed
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
