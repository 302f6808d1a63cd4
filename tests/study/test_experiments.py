"""The study's measurements on known inputs: the learning-rate schedule, divergence, experiment 2's per-layer
gradient norms against a hand computation, experiment 3's runs, costs and edge learning rate against the runs'
own result files, experiment 9's per-run measures against a hand computation, experiment 10's residual stream
against a block-by-block forward, experiments 11 and 12 against hand computations."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from normlab.study.config import RunConfig, StudyConfig
from normlab.study.data import load_corpus
from normlab.study.experiments.common import pm
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
                if setting == PAPER_SETTING and placement == "post":  # the per-seed range, in the notes
                    assert f"{min(ratios):.2f}–{max(ratios):.2f} at {depth} layers" in " ".join(exp.notes)


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


def test_exp9_measures_each_run_on_its_validation_batches(tmp_path, one_thread):
    """Experiment 9's numbers per trained run, recomputed here by hand: the final val loss is the eval-mode loss
    on the run's validation batches; the gap is the train-mode loss (batch statistics) minus that; the context
    change is the cross-entropy of the cut windows minus that of the same positions' logits in the full windows.
    With running statistics the change is zero up to rounding for both norms (causal, per token), LayerNorm's
    gap is exactly zero, and measuring leaves the running statistics as trained."""
    import copy

    import torch.nn.functional as F

    from normlab.nn import BatchNorm
    from normlab.study.experiments import Context
    from normlab.study.experiments.batch_vs_layer import BATCHNORM, LAYERNORM, batch_cost, bn_run_config, run

    cfg = StudyConfig(n_head=2, block_size=16, bn_d_model=32, bn_steps=6, bn_batch_sizes=[4, 2], seeds=2,
                      eval_iters=2, experiments=[9])
    assert cfg.bn_short_block == 4  # a quarter of the context
    corpus = load_corpus()
    ctx = Context(cfg, corpus, tmp_path, progress=False)
    exp = run(ctx)
    assert sorted(exp.data) == [f"{v}|{b}" for v in (BATCHNORM, LAYERNORM) for b in (2, 4)]

    def loss(model, x, y, batch_stats: bool) -> torch.Tensor:
        with torch.no_grad():
            logits = copy.deepcopy(model).train(batch_stats)(x)[0]
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)

    for variant in (BATCHNORM, LAYERNORM):
        for b in (2, 4):
            for i, seed in enumerate(ctx.seeds):
                r = ctx.train("", f"batch_vs_layer/{variant}-b{b}/seed-{seed}",
                              bn_run_config(cfg, corpus, variant, b, seed))
                assert r.config.batch_size == b and r.config.steps == 6 and r.config.model["d_model"] == 32
                model = r.load_model()
                before = {k: v.clone() for k, v in model.state_dict().items()}
                got = {m: vals[i] for m, vals in exp.data[f"{variant}|{b}"].items()}
                batches = [corpus.batch("val", j, b, 16, seed) for j in range(2)]
                full = {s: [loss(model, x, y, s) for x, y in batches] for s in (False, True)}
                short = {s: [loss(model, x[:, :4], y[:, :4], s) for x, y in batches] for s in (False, True)}
                mean = lambda losses, n=16: sum(v[:, :n].mean().item() for v in losses) / len(losses)
                assert got["val_loss"] == r.final["final_val_loss"]
                assert mean(full[False]) == pytest.approx(got["val_loss"], rel=1e-6)
                assert mean(full[True]) - mean(full[False]) == pytest.approx(got["train_eval_gap"], abs=1e-6)
                for s, m in ((True, "length_change_batch"), (False, "length_change_running")):
                    assert mean(short[s]) - mean(full[s], 4) == pytest.approx(got[m], abs=1e-6)
                assert abs(got["length_change_running"]) < 1e-5  # the control: causal, per token
                if variant == LAYERNORM:
                    assert got["train_eval_gap"] == 0.0 and abs(got["length_change_batch"]) < 1e-5
                else:
                    assert abs(got["train_eval_gap"]) > 1e-4  # batch statistics differ from the running ones
                    assert any(isinstance(mod, BatchNorm) for mod in model.modules())
                assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    values = {(v, b): exp.data[f"{v}|{b}"] for v in (BATCHNORM, LAYERNORM) for b in (2, 4)}
    bn_loss = lambda b: values[(BATCHNORM, b)]["val_loss"]
    assert batch_cost(values, BATCHNORM) == [s - l for s, l in zip(bn_loss(2), bn_loss(4))]  # smallest − largest
    assert [r[:2] for r in exp.rows] == [[BATCHNORM, 2], [BATCHNORM, 4], [LAYERNORM, 2], [LAYERNORM, 4]]
    assert exp.below_paper and (tmp_path / exp.plot).stat().st_size > 5000
    assert exp.verdict in ("holds", "partly holds", "does not hold here")
def _stream_by_hand(model, idx):
    """The residual stream of a learned-position GPT, block by block, and its RMS and angular change per
    block, written out here from the formulas."""
    model.eval()
    with torch.no_grad():
        h = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.shape[1]))
        states = [h]
        for block in model.transformer.h:
            states.append(block(states[-1]))
    rms = [s.double().square().mean().sqrt().item() for s in states]
    angular = []
    for a, b in itertools.pairwise(states):
        a, b = a.double(), b.double()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        angular.append((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item())
    return rms, angular


def test_exp10_measures_the_stream_of_each_seed_at_init_and_trained(tmp_path, one_thread):
    """Experiment 10's per-layer RMS and angular change are those of the run's initial and trained model on
    the fixed validation batches, per placement and seed; growth is h_L/h_1 and deep/early the last third's
    mean angular change over the first third's."""
    from normlab.study.experiments import depth
    from normlab.study.experiments.common import Context
    from normlab.study.train import train_run

    cfg = StudyConfig(n_layer=2, n_head=2, d_model=32, block_size=16, batch_size=4, eval_iters=2, seeds=2,
                      depth_placements=["pre", "sandwich", "lnscaling", "post"], depth_n_layer=3, depth_d_model=16,
                      depth_n_head=2, depth_steps=4, depth_batch_size=2, experiments=[10])
    corpus = load_corpus()
    ctx = Context(cfg, corpus, tmp_path, progress=False)
    exp = depth.run(ctx)
    data, summary = exp.data["runs"], exp.data["summary"]
    assert list(data) == cfg.depth_placements and all(len(v) == 2 for v in data.values())
    idx = depth.probe_tokens(cfg, corpus)
    assert idx.shape == (depth.PROBE_BATCHES * 2, 16)
    for placement in cfg.depth_placements:
        for i, seed in enumerate(ctx.seeds):
            name = f"{placement}-s{seed}"
            rc = json.loads((tmp_path / "depth" / name / "config.json").read_text())
            assert (rc["seed"], rc["steps"], rc["batch_size"]) == (seed, 4, 2)
            assert (rc["model"]["placement"], rc["model"]["n_layer"], rc["model"]["d_model"]) == (placement, 3, 16)
            run = train_run(name, tmp_path / "depth" / name, RunConfig(**rc), corpus, progress=False)  # loads it
            got = data[placement][i]
            for key, model in (("", run.load_model()), ("_init", build_model(rc["model"], seed))):
                rms, angular = _stream_by_hand(model, idx)
                assert got["rms" + key] == pytest.approx(rms, rel=1e-9)
                assert got["angular" + key] == pytest.approx(angular, rel=1e-6, abs=1e-12)
            assert got["val_loss"] == run.final["final_val_loss"]
            assert summary[placement]["growth"][i] == pytest.approx(got["rms"][3] / got["rms"][1])
            assert summary[placement]["deep_early"][i] == pytest.approx(got["angular"][2] / got["angular"][0])
    # Post-LN's stream is a LayerNorm output after every block: RMS 1 up to its gain and bias, at init exactly
    assert data["post"][0]["rms_init"][1:] == pytest.approx([1.0] * 3, rel=1e-4)
    assert [r[0] for r in exp.rows] == [depth.NAMES[p] for p in cfg.depth_placements]
    assert exp.rows[0][4] == pm(summary["pre"]["growth"])
    assert exp.verdict in ("holds", "partly holds", "does not hold here") and exp.below_paper
    assert (tmp_path / "exp10_depth.png").stat().st_size > 5000
    assert depth.deep_over_early([0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.05]) == pytest.approx(0.075 / 0.35)
    assert depth.rms_growth([0.02, 0.5, 1.0, 2.0]) == 4.0


def _tiny_ctx(tmp_path, **kw):
    from normlab.study.experiments import Context

    cfg = StudyConfig(n_layer=2, n_head=2, d_model=32, block_size=16, batch_size=4, eval_iters=2, seeds=2, **kw)
    return Context(cfg, load_corpus(), tmp_path, progress=False)


def _block0_max_logit(model, x) -> float:
    """max q·k/√d_head of the first block, by hand: learned positions, Pre-LN, QK-norm when the model has it."""
    import torch

    with torch.no_grad():
        h = model.transformer.wte(x) + model.transformer.wpe(torch.arange(x.shape[1]))
        block = model.transformer.h[0]
        q, k, _ = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=-1)
        heads = block.attn.n_head
        q, k = (t.view(*x.shape, heads, -1).transpose(1, 2) for t in (q, k))
        if block.attn.q_norm is not None:
            q, k = block.attn.q_norm(q), block.attn.k_norm(k)
        s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return s.masked_fill(~torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril(), -math.inf).max().item()


def test_exp11_sweeps_both_arms_and_measures_the_trained_models(tmp_path):
    """Experiment 11 trains Pre-LN with and without QK-norm at every learning rate and seed; its losses are the
    capped final val losses, its logits those of the trained (and the freshly initialised) model on the first
    validation batch — block 1's recomputed here by hand — and its LR sensitivity the paper's formula."""
    from normlab.study.experiments import qk_norm
    from normlab.study.experiments.common import capped_loss

    ctx = _tiny_ctx(tmp_path, qk_lrs=[1e-1, 1e-3], qk_steps=6, qk_n_layer=1, qk_d_model=16, experiments=[11])
    exp = qk_norm.run(ctx)
    lrs, runs, summary = exp.data["lrs"], exp.data["runs"], exp.data["summary"]
    assert lrs == [1e-3, 1e-1]  # ascending
    corpus = ctx.corpus
    x = corpus.batch("val", 0, 4, 16, ctx.cfg.seed)[0]
    for arm, qk in qk_norm.ARMS.items():
        for i, lr in enumerate(lrs):
            for s, seed in enumerate(ctx.seeds):
                rc = qk_norm.qk_run_config(ctx.cfg, corpus, qk, lr, seed)
                run = ctx.train("again", f"qk_norm/{'qk' if qk else 'plain'}-lr{lr:g}/seed-{seed}", rc)  # loads
                assert (run.config.lr, run.config.model["qk_norm"], run.config.model["d_model"]) == (lr, qk, 16)
                got = runs[arm][i][s]
                assert got["loss"] == capped_loss(run.final)
                assert got["logits"][0] == pytest.approx(_block0_max_logit(run.load_model(), x), rel=1e-9)
                fresh = build_model(rc.model, seed).eval()
                assert got["init_logits"][0] == pytest.approx(_block0_max_logit(fresh, x), rel=1e-9)
        losses = [[runs[arm][i][s]["loss"] for i in range(2)] for s in range(2)]
        assert summary[arm]["sensitivity"] == pytest.approx([(max(l) - min(l)) / 2 for l in losses])
        assert summary[arm]["top_logit"] == [max(runs[arm][1][s]["logits"]) for s in range(2)]
    assert [r[:2] for r in exp.rows] == [[a, lr] for a in qk_norm.ARMS for lr in lrs]
    assert exp.below_paper and (tmp_path / exp.plot).stat().st_size > 5000


def test_exp11_measures():
    from normlab.study.experiments.common import capped_loss
    from normlab.study.experiments.qk_norm import largest_stable_lr, lr_sensitivity, max_logit

    assert lr_sensitivity([3.0, 2.0, 2.5, 4.0]) == pytest.approx((1.0 + 0.0 + 0.5 + 2.0) / 4)
    assert largest_stable_lr([1e-3, 1e-2, 1e-1], [2.05, 2.0, 2.3]) == 1e-2
    assert largest_stable_lr([1e-3, 1e-2, 1e-1], [2.05, 2.0, 2.1], margin=0.1) == 1e-1
    assert max_logit([1.0, 3.0]) == 3.0 and max_logit([1.0, math.nan]) == math.inf
    assert capped_loss({"final_val_loss": NAN, "init_val_loss": 4.2}) == 4.2
    assert capped_loss({"final_val_loss": 1e5, "init_val_loss": 4.2}) == 4.2
    assert capped_loss({"final_val_loss": 2.5, "init_val_loss": 4.2}) == 2.5


def test_exp12_sweeps_alpha_against_layernorm_and_measures_saturation(tmp_path):
    """Experiment 12 trains DyT at every α₀ and LayerNorm, per seed; the saturation is the fraction of the final
    DyT's input (the last block's output) with |α·x| > 2 on the first validation batch, and its mean over the
    three DyT layers of the one-block model, recomputed here."""
    import torch

    from normlab.analysis import residual_stream
    from normlab.study.experiments import dyt_alpha
    from normlab.study.experiments.common import capped_loss

    ctx = _tiny_ctx(tmp_path, dyt_alphas=[2.0, 0.5], dyt_steps=6, dyt_n_layer=1, dyt_d_model=16, experiments=[12])
    exp = dyt_alpha.run(ctx)
    assert list(exp.data["dyt"]) == ["0.5", "2.0"]
    x = ctx.corpus.batch("val", 0, 4, 16, ctx.cfg.seed)[0]
    for alpha in (None, 0.5, 2.0):
        for s, seed in enumerate(ctx.seeds):
            arm = "layernorm" if alpha is None else f"dyt-a{alpha:g}"
            run = ctx.train("again", f"dyt_alpha/{arm}/seed-{seed}",
                            dyt_alpha.dyt_run_config(ctx.cfg, ctx.corpus, alpha, seed))
            got = exp.data["layernorm"][s] if alpha is None else exp.data["dyt"][str(alpha)][s]
            assert got["loss"] == capped_loss(run.final)
            assert run.config.model["norm"] == ("layernorm" if alpha is None else "dyt")
            if alpha is None:
                assert "saturated" not in got
                continue
            assert run.config.model["dyt_alpha"] == alpha
            model = run.load_model()
            h = residual_stream(model, x)[-1]
            trained_alpha = model.transformer.ln_f.alpha.detach()
            assert got["layer"] == "transformer.ln_f"
            assert got["saturated"] == pytest.approx((trained_alpha.abs() * h.abs() > 2).double().mean().item())
            assert got["input_rms"] == pytest.approx(h.double().pow(2).mean().sqrt().item(), rel=1e-6)
            block = model.transformer.h[0]  # Pre-LN: ln_1 sees the stream, ln_2 the stream after attention
            with torch.no_grad():
                h0 = residual_stream(model, x)[0]
                inputs = [(block.ln_1, h0), (block.ln_2, h0 + block.attn(block.ln_1(h0))), (model.transformer.ln_f, h)]
            fractions = [(layer.alpha.detach().abs() * v.abs() > 2).double().mean().item() for layer, v in inputs]
            assert got["saturated_mean"] == pytest.approx(sum(fractions) / 3)
            assert torch.isfinite(h).all()
    assert [r[1] for r in exp.rows] == ["—", 0.5, 2.0]
    from collections import Counter

    from normlab.study.experiments.common import unigram_entropy

    counts = Counter(ctx.corpus.train.tolist())
    n = sum(counts.values())
    assert unigram_entropy(ctx.corpus) == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()))
    assert exp.below_paper and (tmp_path / exp.plot).stat().st_size > 5000
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
