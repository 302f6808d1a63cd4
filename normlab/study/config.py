"""Study and run configuration; variant names ``<norm>-<placement>``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

NORMS = ("layernorm", "rmsnorm", "batchnorm", "groupnorm", "dyt", "none")
PLACEMENTS = ("post", "pre", "sandwich", "deepnorm", "olmo2", "mixln", "lnscaling", "none")
#: Experiment 10's placements that its claims compare (Pre-LN against Peri-LN and LayerNorm Scaling).
DEPTH_CLAIMED = ("pre", "sandwich", "lnscaling")
DEFAULT_VARIANTS = ("layernorm-pre", "layernorm-post", "rmsnorm-pre", "rmsnorm-post", "dyt-pre", "none-pre")
EXPERIMENTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)


class StudyConfigError(ValueError):
    """A run directory that belongs to another configuration, or an invalid configuration."""


def parse_variant(name: str) -> tuple[str, str]:
    """``"rmsnorm-pre"`` → ``("rmsnorm", "pre")``; a clear error for unknown names."""
    norm, sep, placement = name.strip().lower().partition("-")
    if not sep or norm not in NORMS or placement not in PLACEMENTS:
        raise StudyConfigError(
            f"unknown variant {name!r}: expected <norm>-<placement> with norm in {list(NORMS)} and "
            f"placement in {list(PLACEMENTS)}, e.g. 'rmsnorm-pre,batchnorm-post'"
        )
    return norm, placement


def parse_variants(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise StudyConfigError("--variants: expected at least one variant, e.g. 'layernorm-pre,rmsnorm-pre'")
    for n in names:
        parse_variant(n)
    if len(set(names)) != len(names):
        raise StudyConfigError(f"--variants: duplicate names in {names}")
    return names


def check_depth_placements(placements: list[str] | str) -> list[str]:
    """Experiment 10's placements: known, distinct, and including the three its claims compare."""
    names = [p.strip().lower() for p in (placements.split(",") if isinstance(placements, str) else placements)]
    bad = [p for p in names if p not in PLACEMENTS]
    if bad or len(set(names)) != len(names):
        raise StudyConfigError(f"--depth-placements: expected distinct placements of {list(PLACEMENTS)}, got {names}")
    missing = [p for p in DEPTH_CLAIMED if p not in names]
    if missing:
        raise StudyConfigError(f"--depth-placements: the claims compare {', '.join(DEPTH_CLAIMED)}; missing {missing}")
    return names


@dataclass
class RunConfig:
    """Everything that determines one training run's result (its ``config.json``). Per-layer gradient norms
    are logged every ``grad_log_interval`` steps (and after the first and the last)."""

    model: dict
    steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    seed: int
    eval_interval: int
    eval_iters: int
    data: str
    data_digest: str
    beta1: float = 0.9
    beta2: float = 0.95
    grad_log_interval: int = 10

    def to_dict(self) -> dict:
        return asdict(self)

    def check_valid(self) -> None:
        for k in ("steps", "batch_size", "eval_interval", "eval_iters", "grad_log_interval"):
            if getattr(self, k) < 1:
                raise StudyConfigError(f"{k} must be ≥ 1, got {getattr(self, k)}")
        if not 0 <= self.warmup <= self.steps:
            raise StudyConfigError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        if self.lr <= 0 or self.min_lr < 0:
            raise StudyConfigError(f"learning rates must be positive, got lr={self.lr}, min_lr={self.min_lr}")
        check_optimizer(self.beta1, self.beta2, self.weight_decay, self.grad_clip)


def check_optimizer(beta1: float, beta2: float, weight_decay: float, grad_clip: float) -> None:
    """AdamW's betas in [0, 1), weight decay ≥ 0, grad clip ≥ 0 (0: no clipping)."""
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= v < 1.0:
            raise StudyConfigError(f"--{name}: expected a number in [0, 1), got {v}")
    for name, v in (("weight-decay", weight_decay), ("grad-clip", grad_clip)):
        if not (math.isfinite(v) and v >= 0):
            raise StudyConfigError(f"--{name}: expected a finite number ≥ 0, got {v}")


@dataclass
class StudyConfig:
    """The whole study: the grid of variants (experiment 1) and each experiment's settings. The defaults are
    the ``default`` profile (``make study``, a few minutes on 2 cores); :meth:`from_profile` gives the others."""

    profile: str = "default"
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    steps: int = 100
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    preset: str | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine decay's end, as a fraction of lr
    warmup: int | None = None  # None → 10 % of steps
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # AdamW's, on matrices only
    grad_clip: float = 1.0     # max gradient norm; 0: no clipping
    seed: int = 1337
    seeds: int = 3  # training comparisons: seeds seed, seed+1, …; a seed sets init and data order
    timing_rounds: int = 5  # interleaved rounds of every timing comparison
    eval_interval: int = 25
    eval_iters: int = 4
    data: str | None = None
    experiments: list[int] = field(default_factory=lambda: list(EXPERIMENTS))
    # experiment 2: gradient norm at init, at these depths, width and heads (the paper's d=512), over seeds
    grad_depths: list[int] = field(default_factory=lambda: [6, 12])
    grad_d_model: int = 512
    grad_n_head: int = 8
    grad_batch_size: int = 8
    grad_batches: int = 1
    grad_seeds: int = 3
    # experiment 7: the norm layers' share of a training step at these widths, over repeated interleaved timings
    share_widths: list[int] = field(default_factory=lambda: [128, 256])
    share_repeats: int = 3
    # experiment 3: warmup sensitivity, Post-LN vs Pre-LN, over a learning-rate sweep (Xiong et al. 2020): Adam
    # with warmup_beta2, the paper's init; every lr at warmup_sweep_seeds seeds, the edge lr at all seeds
    warmup_lrs: list[float] = field(default_factory=lambda: [1e-3])  # the paper's
    warmup_layers: int = 6
    warmup_d_model: int = 64
    warmup_steps: int = 30
    warmup_warmup: int | None = None  # None → a third of warmup_steps
    warmup_beta2: float = 0.98
    warmup_grad_clip: float = 0.0  # 0: no clipping
    warmup_sweep_seeds: int = 1
    # experiment 9: BatchNorm vs LayerNorm (Pre-LN), trained at these batch sizes for the same number of steps,
    # then evaluated also at a shorter context (None → a quarter of block_size)
    bn_batch_sizes: list[int] = field(default_factory=lambda: [2, 8])
    bn_steps: int = 30
    bn_n_layer: int = 2
    bn_d_model: int = 64
    bn_short_block: int | None = None
    # experiment 10: depth and activations per placement, a deeper LayerNorm model than the grid's, over seeds
    depth_placements: list[str] = field(default_factory=lambda: list(DEPTH_CLAIMED))
    depth_n_layer: int = 6
    depth_d_model: int = 32
    depth_n_head: int = 2
    depth_steps: int = 30
    depth_batch_size: int = 8
    # experiment 11: QK-norm and learning-rate sensitivity: a learning-rate sweep with and without QK-norm, at this
    # depth and width (None: the grid's)
    qk_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    qk_steps: int = 40
    qk_n_layer: int | None = 2
    qk_d_model: int | None = 64
    # experiment 12: DyT's α₀: a sweep of α₀ against LayerNorm, at this depth and width (None: the grid's)
    dyt_alphas: list[float] = field(default_factory=lambda: [0.5, 8.0, 128.0])
    dyt_steps: int = 50
    dyt_n_layer: int | None = 2
    dyt_d_model: int | None = 64

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise StudyConfigError(f"--profile: expected one of {list(PROFILES)}, got {self.profile!r}")
        self.variants = parse_variants(self.variants)
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad or not self.experiments:
            raise StudyConfigError(f"--experiments: expected numbers in {list(EXPERIMENTS)}, got {self.experiments}")
        if self.d_model % self.n_head:
            raise StudyConfigError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        for k in ("steps", "batch_size", "block_size", "n_layer", "n_head", "d_model", "warmup_steps", "grad_d_model",
                  "grad_n_head", "grad_batch_size", "grad_batches", "grad_seeds", "share_repeats", "seeds",
                  "timing_rounds", "bn_steps", "bn_n_layer", "bn_d_model", "depth_d_model", "depth_n_head",
                  "depth_steps", "depth_batch_size", "qk_steps", "dyt_steps", "warmup_layers", "warmup_d_model",
                  "warmup_sweep_seeds"):
            if getattr(self, k) < 1:
                raise StudyConfigError(f"{k} must be ≥ 1, got {getattr(self, k)}")
        if self.preset not in (None, "gpt2", "llama"):
            raise StudyConfigError(f"--preset: expected 'gpt2' or 'llama', got {self.preset!r}")
        if self.warmup_warmup is None:
            self.warmup_warmup = max(1, self.warmup_steps // 3)
        if not 0 < self.warmup_warmup <= self.warmup_steps:
            raise StudyConfigError(
                f"warmup of experiment 3 must be in [1, {self.warmup_steps}], got {self.warmup_warmup}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise StudyConfigError(f"--warmup must be in [0, steps={self.steps}], got {self.warmup}")
        check_optimizer(self.beta1, self.beta2, self.weight_decay, self.grad_clip)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise StudyConfigError(f"--min-lr-ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise StudyConfigError(f"--lr: expected a finite number > 0, got {self.lr}")
        if not self.warmup_lrs or not all(math.isfinite(x) and x > 0 for x in self.warmup_lrs):
            raise StudyConfigError(f"--warmup-lrs: expected finite learning rates > 0, got {self.warmup_lrs}")
        if len(set(self.warmup_lrs)) != len(self.warmup_lrs):
            raise StudyConfigError(f"--warmup-lrs: duplicate learning rates in {self.warmup_lrs}")
        if self.warmup_d_model % self.n_head:
            raise StudyConfigError(f"warmup_d_model={self.warmup_d_model} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.warmup_beta2 < 1.0:
            raise StudyConfigError(f"--warmup-beta2: expected a number in [0, 1), got {self.warmup_beta2}")
        if not (math.isfinite(self.warmup_grad_clip) and self.warmup_grad_clip >= 0):
            raise StudyConfigError(f"--warmup-grad-clip: expected a finite number ≥ 0, got {self.warmup_grad_clip}")
        if not self.grad_depths or any(d < 1 for d in self.grad_depths):
            raise StudyConfigError(f"--grad-depths: expected positive depths, got {self.grad_depths}")
        if not self.share_widths or any(d < 1 or (d > 32 and d % 32) for d in self.share_widths):
            raise StudyConfigError("--share-widths: expected positive widths, multiples of 32 above 32, "
                                   f"got {self.share_widths}")
        if len(set(self.bn_batch_sizes)) < 2 or any(b < 1 for b in self.bn_batch_sizes):
            raise StudyConfigError(f"--bn-batch-sizes: expected at least two different positive batch sizes, "
                                   f"got {self.bn_batch_sizes}")
        if self.bn_d_model % self.n_head:
            raise StudyConfigError(f"bn_d_model={self.bn_d_model} must be divisible by n_head={self.n_head}")
        if self.bn_short_block is None:
            self.bn_short_block = max(1, self.block_size // 4)
        if not 1 <= self.bn_short_block < self.block_size:
            raise StudyConfigError(f"--bn-short-block: expected a context in [1, block_size={self.block_size}), "
                                   f"shorter than the trained one, got {self.bn_short_block}")
        self.depth_placements = check_depth_placements(self.depth_placements)
        if self.depth_n_layer < 2:
            raise StudyConfigError(f"--depth-n-layer: expected at least 2 layers, got {self.depth_n_layer}")
        if self.depth_d_model % self.depth_n_head:
            raise StudyConfigError(
                f"depth_d_model={self.depth_d_model} must be divisible by depth_n_head={self.depth_n_head}")
        for k in ("qk_lrs", "dyt_alphas"):  # sweeps, kept in ascending order
            values = getattr(self, k)
            if not values or not all(math.isfinite(v) and v > 0 for v in values) or len(set(values)) != len(values):
                raise StudyConfigError(f"--{k.replace('_', '-')}: expected distinct finite numbers > 0, got {values}")
            setattr(self, k, sorted(values))
        for k in ("qk_n_layer", "qk_d_model", "dyt_n_layer", "dyt_d_model"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise StudyConfigError(f"{k} must be ≥ 1, got {getattr(self, k)}")
        for k in ("qk_d_model", "dyt_d_model"):
            if getattr(self, k) is not None and getattr(self, k) % self.n_head:
                raise StudyConfigError(f"{k}={getattr(self, k)} must be divisible by n_head={self.n_head}")
        if self.grad_d_model % self.grad_n_head:
            raise StudyConfigError(
                f"grad_d_model={self.grad_d_model} must be divisible by grad_n_head={self.grad_n_head}")

    @classmethod
    def from_profile(cls, profile: str = "default", **overrides) -> StudyConfig:
        """The ``profile``'s settings (``"default"`` or ``"full"``), then ``overrides``."""
        if profile not in PROFILES:
            raise StudyConfigError(f"--profile: expected one of {list(PROFILES)}, got {profile!r}")
        return cls(**{**PROFILES[profile], **overrides, "profile": profile})

    @property
    def seed_list(self) -> list[int]:
        """The seeds of every training comparison: ``seed``, ``seed + 1``, … (``seeds`` of them)."""
        return list(range(self.seed, self.seed + self.seeds))

    @property
    def warmup_iters(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    def to_dict(self) -> dict:
        return asdict(self)


#: Each profile's settings over the dataclass defaults (which are the default profile). ``full`` runs each
#: experiment at the scale where its claim can show, in about an hour on 2 cores.
PROFILES: dict[str, dict] = {
    "default": {},
    "full": {
        # experiment 1 (and 4, 6, 8: the grid)
        "steps": 600, "seeds": 3, "eval_interval": 60, "eval_iters": 8, "timing_rounds": 7,
        # experiment 2
        "grad_depths": [6, 12], "grad_batches": 2, "grad_seeds": 5,
        # experiment 3: the sweep at one seed, the edge lr at all 3
        "warmup_lrs": [1e-3, 2e-3, 4e-3], "warmup_d_model": 128, "warmup_steps": 240,
        # experiment 7
        "share_widths": [128, 256, 512, 1024], "share_repeats": 5,
        # experiment 9
        "bn_batch_sizes": [2, 8, 32], "bn_steps": 300,
        # experiment 10: every placement at 12 layers (d=64 keeps 8 placements × 3 seeds within minutes)
        "depth_placements": list(PLACEMENTS), "depth_n_layer": 12, "depth_d_model": 64, "depth_n_head": 4,
        "depth_steps": 80,
        # experiment 11
        "qk_lrs": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "qk_steps": 150, "qk_n_layer": None, "qk_d_model": None,
        # experiment 12
        "dyt_alphas": [0.5, 2.0, 8.0, 32.0, 128.0], "dyt_steps": 250, "dyt_n_layer": None, "dyt_d_model": None,
    },
}


def check_or_write_config(run_dir: Path, config: dict, what: str = "run") -> None:
    """Write ``run_dir/config.json``, or check that the one there is the same; a different one is an
    error (nothing in ``run_dir`` is touched)."""
    path = run_dir / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StudyConfigError(f"{path} is unreadable ({e}); delete {run_dir} or choose another --name") from None
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
            detail = ", ".join(f"{k}: {old.get(k)!r} there vs {config.get(k)!r} now" for k in diff[:6])
            raise StudyConfigError(
                f"{run_dir} holds a {what} with another configuration ({detail}). Nothing was overwritten: "
                f"use another --name/--out, or delete that directory to start over."
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    import os

    os.replace(tmp, path)
