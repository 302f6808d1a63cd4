"""The study's measurements and verdicts on known inputs: the learning-rate schedule, divergence,
experiment 2's per-layer gradient norms against a hand computation, experiment 3's runs, costs and edge
learning rate against the runs' own result files."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from normlab.study.config import StudyConfig
from normlab.study.data import load_corpus
from normlab.study.experiments.grad_init import DEFAULT_SETTING, PAPER_SETTING, exp2_grad_at_init, grad_model_config
from normlab.study.train import _diverged, build_model, lr_at

NAN, INF = math.nan, math.inf


def test_lr_schedule_closed_form():
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at the last step."""
    rc = SimpleNamespace(steps=21, lr=1.0, min_lr=0.1, warmup=5)  # what lr_at reads of a RunConfig
    assert [lr_at(s, rc) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_at(5, rc) == pytest.approx(1.0)
    assert lr_at(5 + 15 // 2, rc) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr_at(20, rc) == pytest.approx(0.1)
    assert lr_at(0, SimpleNamespace(steps=10, lr=0.5, min_lr=0.0, warmup=0)) == 0.5


def _records(train_losses, val_losses):
    return [{"train_loss": v} for v in train_losses], [{"val_loss": v} for v in val_losses]


@pytest.mark.parametrize("train, val, diverged", [
    ([3.0, 2.5, 2.0], [4.6, 2.1], False),
    ([3.0, NAN, NAN], [4.6, NAN], True),       # a NaN loss
    ([3.0, INF, 2.0], [4.6, 2.1], True),       # an inf on the way
    ([3.0, 9e4, 1e5], [4.6, 1e5], True),       # exploded but finite
    ([3.0, 4.0, 5.0], [4.6, 5.7], True),       # more than 1 nat above the untrained model
    ([3.0, 4.0, 5.0], [4.6, 5.5], False),
    ([3.0], [], False),
])
def test_divergence(train, val, diverged):
    assert _diverged(*_records(train, val)) is diverged


def test_exp2_is_the_mlp_output_matrix_gradient_at_init(tmp_path):
    """Experiment 2's per-layer values are ‖∂L/∂W^{2,l}‖ of the freshly initialised model, averaged over
    the batches, layer 1 first, per seed — computed here by hand from the modules; the paper's setting is
    Xavier init, ReLU FFN and a final norm for Pre-LN only."""
    cfg = StudyConfig(n_layer=2, n_head=2, d_model=32, block_size=16, grad_batch_size=4, grad_depths=[2, 3],
                      grad_batches=2, grad_d_model=16, grad_n_head=2, grad_seeds=2, experiments=[2])
    corpus = load_corpus()
    exp = exp2_grad_at_init(cfg, corpus, tmp_path)
    for setting in (PAPER_SETTING, DEFAULT_SETTING):
        for depth in cfg.grad_depths:
            for placement in ("post", "pre"):
                mc = grad_model_config(cfg, corpus.vocab_size, setting, depth, placement)
                assert (mc["d_model"], mc["n_head"], mc["n_layer"]) == (16, 2, depth)
                assert (mc["init"], mc["mlp"], mc["final_norm"]) == (
                    ("xavier", "relu", placement == "pre") if setting == PAPER_SETTING else ("gpt2", "gelu", True))
                ratios = []
                for s in range(cfg.grad_seeds):
                    model = build_model(mc, cfg.seed + s)
                    want = [0.0] * depth
                    for i in range(cfg.grad_batches):
                        x, y = corpus.batch("train", i, cfg.grad_batch_size, cfg.block_size, cfg.seed + s)
                        model.zero_grad()
                        model(x, y)[1].backward()
                        for layer, block in enumerate(model.transformer.h):
                            want[layer] += block.mlp.c_proj.weight.grad.norm().item() / cfg.grad_batches
                    got = exp.data[f"{setting}|{depth}|{placement}"][s]
                    assert got == pytest.approx(want, rel=1e-6), (setting, depth, placement, s)
                    ratios.append(want[-1] / want[0])
                rows = exp.rows if setting == PAPER_SETTING else exp.extra_tables[0][2]
                row = next(r for r in rows if r[0] == depth and r[1] == f"{placement}-LN")
                mean = sum(ratios) / 2
                std = abs(ratios[0] - ratios[1]) / 2 ** 0.5
                assert row[-1] == f"{mean:.3g} ± {std:.2g}"  # last / first over the seeds


def test_exp7_times_the_three_norms_per_width_and_repeat(tmp_path):
    """Experiment 7: per width and repeat one time per variant; the share and saving are the percents of
    LayerNorm's step that identity norms and RMSNorm take off."""
    from normlab.study.experiments.norm_share import SHARE_VARIANTS, exp7_norm_share, share_percents

    cfg = StudyConfig(n_layer=1, block_size=8, batch_size=2, share_widths=[16, 32], share_repeats=2, experiments=[7])
    exp = exp7_norm_share(cfg, load_corpus(), tmp_path)
    assert sorted(exp.data) == ["16", "32"]
    for t in exp.data.values():
        assert set(t) == set(SHARE_VARIANTS) and all(len(v) == 2 and min(v) > 0 for v in t.values())
    times = {16: {"LayerNorm": [2.0, 4.0], "RMSNorm": [1.5, 4.0], "identity": [1.0, 3.0]}}
    assert share_percents(times) == ({16: [50.0, 25.0]}, {16: [25.0, 0.0]})
    assert [r[0] for r in exp.rows] == [16, 32] and (tmp_path / "exp7_norm_share.png").exists()
    assert exp.verdict in ("holds", "partly holds", "does not hold here")


def test_exp3_sweeps_lrs_then_trains_every_seed_at_the_edge(tmp_path):
    """Experiment 3: every (placement, warmup, lr) at the sweep's seed, then the other seeds at the edge lr
    (computed here from the runs' result files); the runs are the paper's model and optimizer; the table's costs
    are mean(no warmup) − mean(warmup)."""
    import json

    from normlab.study.experiments import Context, warmup
    from normlab.study.experiments.warmup import arm_name

    cfg = StudyConfig(n_head=2, block_size=16, batch_size=4, eval_iters=1, seeds=2, warmup_lrs=[1e-3, 3e-2],
                      warmup_layers=2, warmup_d_model=16, warmup_steps=6, warmup_sweep_seeds=1, experiments=[3])
    exp = warmup.run(Context(cfg, load_corpus(), tmp_path, progress=False))

    def final(placement, warm, lr, seed):
        run_dir = tmp_path / "warmup" / f"lr-{lr:g}" / arm_name(placement, warm) / f"seed-{seed}"
        rc = json.loads((run_dir / "config.json").read_text())
        assert (rc["model"]["n_layer"], rc["model"]["d_model"], rc["model"]["init"], rc["model"]["mlp"]) == (
            2, 16, "xavier", "relu")
        assert rc["model"]["final_norm"] == (placement == "pre") and rc["model"]["placement"] == placement
        assert (rc["lr"], rc["warmup"], rc["beta2"], rc["weight_decay"], rc["grad_clip"], rc["seed"]) == (
            lr, 2 if warm else 0, 0.98, 0.0, 0.0, seed)
        return json.loads((run_dir / "result.json").read_text())["final_val_loss"]

    cost = {lr: {p: final(p, False, lr, 1337) - final(p, True, lr, 1337) for p in ("post", "pre")}
            for lr in cfg.warmup_lrs}
    # one seed, no spread: only Post-LN needs warmup where its cost is > 0.05 and Pre-LN's is not
    edge = max(cfg.warmup_lrs, key=lambda lr: (cost[lr]["post"] > 0.05 >= cost[lr]["pre"],
                                               cost[lr]["post"] - cost[lr]["pre"]))
    assert exp.data["edge_lr"] == edge
    other = next(lr for lr in cfg.warmup_lrs if lr != edge)
    assert not (tmp_path / "warmup" / f"lr-{other:g}" / "post-LN-warmup" / "seed-1338").exists()
    for p in ("post", "pre"):
        for w in (True, False):
            assert exp.data["runs"][f"{p}|{w}|{edge:g}"] == [(final(p, w, edge, s), False) for s in (1337, 1338)]
        without, with_ = (sum(final(p, w, edge, s) for s in (1337, 1338)) / 2 for w in (False, True))
        row = next(r for r in exp.rows if r[0].startswith(f"{edge:g}") and r[1] == f"{p}-LN")
        assert row[2] == 2 and row[-1].startswith(f"{without - with_:+.3f}")
    assert len(exp.rows) == 4 and (tmp_path / "exp3_warmup.png").stat().st_size > 5000
    assert exp.below_paper and "layers 2 (paper: 6)" in exp.below_paper


@pytest.mark.parametrize("sweep, edge", [
    ({1: (2.5, 2.0, 2.0, 2.0), 2: (3.0, 2.0, 2.2, 2.0)}, 1),   # only Post-LN needs warmup at 1: before 2's bigger gap
    ({1: (2.5, 2.0, 2.1, 2.0), 2: (3.0, 2.0, 2.2, 2.0)}, 2),   # Pre-LN needs it at both: the bigger gap
    ({1: (2.5, 2.0, 2.0, 2.0), 2: (2.5, 2.0, 2.0, 2.0)}, 1),   # a tie: the lower lr
    ({1: (2.5, 2.0, 2.0, 2.0), 2: (NAN, 2.0, 2.0, 2.0)}, 2),   # a divergence without warmup: +inf
    ({1: (2.5, 2.0, 2.0, 2.0), 2: (2.0, NAN, 2.0, 2.0)}, 1),   # diverged with warmup: never the edge
    ({1: (NAN, 2.0, NAN, 2.0), 2: (2.1, 2.0, 2.08, 2.0)}, 2),  # both diverged without warmup: a gap of 0
])
def test_exp3_edge_lr(sweep, edge):
    from normlab.study.experiments.warmup import edge_lr

    arms = (("post", False), ("post", True), ("pre", False), ("pre", True))
    results = {(p, w, lr): [(x, not math.isfinite(x))]
               for lr, losses in sweep.items() for (p, w), x in zip(arms, losses)}
    assert edge_lr(results) == edge
