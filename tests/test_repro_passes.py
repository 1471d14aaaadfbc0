"""Regression tests for /work/shared/repro: dead_conv.py (issue 11.3), fft_dynamic_export.py
(issue 11.4) and dropout2d_merge.py (issue 12.4)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch._dynamo
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

import tucker_fx
from tucker_fx.analysis import propagate_shapes
from tucker_fx.passes.fold_bn import NOTES_KEY
from tucker_fx.passes.lowering import LowerBlocks
from tucker_fx.passes.merge_linear import MergeLinear
from tucker_fx.passes.tucker_rewrite import DEAD_REASON, dead_nodes
from tucker_fx.planning.plan import LayerPlan, Plan


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# --- issue 11.3: a conv whose output is unused ---------------------------------------------------

class _DeadHead(nn.Module):
    """forward computes ``aux`` (a deep-supervision head) and does not return it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        aux = self.aux(y)  # noqa: F841  (unused on purpose)
        return self.head(y)


_FULL = tucker_fx.TuckerConfig(rank=1.0, only_if_cheaper=False, progress=False, tuning_cache=False)


def _check_dead_plan(plan: Plan, n_live: int = 2) -> None:
    dead = [e for e in plan.layers if e.reason == DEAD_REASON]
    assert len(dead) == 1, plan
    entry = dead[0]
    assert entry.kind == "none" and not entry.applied
    assert entry.lowering is None and entry.weight_error is None
    assert (entry.macs_after, entry.params_after) == (0, 0)
    assert entry.params_before == 8 * 2 + 2
    assert len(plan.applied) == n_live


@pytest.mark.parametrize("lowering", ["auto", "none"])
def test_dead_conv_traced(lowering: str) -> None:
    model, x = _DeadHead().eval(), torch.randn(1, 3, 8, 8)
    r = tucker_fx.compress(model, x, config=_FULL.replace(lowering=lowering))
    _check_dead_plan(r.plan)
    assert r.plan["aux"].reason == DEAD_REASON
    assert "aux" not in dict(r.module.named_modules())
    assert _rel(model(x), r.module(x)) < 1e-5
    assert hasattr(model, "aux")  # the user's model is untouched
    # re-applying the plan (the dead layer's entry is now "none") says the same
    again = tucker_fx.apply_plan(_DeadHead().eval(), r.plan, x, config=_FULL.replace(lowering=lowering))
    _check_dead_plan(again.plan)


def test_dead_conv_exported() -> None:
    model, x = _DeadHead().eval(), torch.randn(1, 3, 8, 8)
    r = tucker_fx.compress(torch.export.export(model, (x,)), x, config=_FULL)
    _check_dead_plan(r.plan)
    assert _rel(model(x), r.module(x)) < 1e-5
    assert _rel(model(x), r.exported.module()(x)) < 1e-5


def test_dead_conv_compiled() -> None:
    torch._dynamo.reset()
    model, x = _DeadHead().eval(), torch.randn(1, 3, 8, 8)
    reports: list = []
    fast = torch.compile(model, backend="tucker", options={"rank": 1.0, "only_if_cheaper": False, "inner": "eager",
                                                           "tuning_cache": False, "on_report": reports.append})
    out = fast(x)
    torch._dynamo.reset()
    assert _rel(model(x), out) < 1e-5
    assert len(reports) == 1
    _check_dead_plan(reports[0].plan)


def test_dead_nodes_agree_with_eliminate_dead_code() -> None:
    gm = fx.symbolic_trace(_DeadHead())
    dead = {n.name for n in dead_nodes(gm.graph)}
    before = {n.name for n in gm.graph.nodes}
    gm.graph.eliminate_dead_code()
    assert dead == before - {n.name for n in gm.graph.nodes} == {"aux"}


def test_lowering_skips_a_block_that_is_gone() -> None:
    """A plan entry whose block the graph no longer calls is skipped, with a note (no crash)."""
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    entry = LayerPlan(name="aux", node="aux", op="conv", kind="tucker2", ranks=(2, 2), full_ranks=(8, 2))
    result = LowerBlocks(Plan([entry]), originals={}, tune=False)(gm)
    assert not result.modified
    assert entry.lowering is None and any("dead code" in n for n in entry.notes)


# --- issue 11.4: dynamic batch + FFT lowering under export ---------------------------------------

def test_fft_lowering_keeps_dynamic_batch() -> None:
    # a big-kernel, few-channel layer: the cost model lowers its Tucker core to FFT
    m = nn.Sequential(nn.Conv3d(2, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 7, padding=3)).eval()
    x = torch.randn(2, 2, 8, 16, 16)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=8)},))
    r = tucker_fx.compress(ep, x, config=_FULL.replace(lowering="auto", tune=False))
    assert "fft" in [e.lowering for e in r.plan.applied]  # else this test tests nothing
    assert r.exported is not None
    for batch in (1, 5):
        xb = torch.randn(batch, 2, 8, 16, 16)
        assert _rel(m(xb), r.exported.module()(xb)) < 1e-5


# --- issue 12.4: training-mode dropout between two linear maps -----------------------------------

class _FunctionalDropout(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.a, self.b, self.fn = nn.Conv2d(8, 64, 1), nn.Conv2d(64, 4, 1), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn(self.a(x), 0.5, self.training))


_DROPOUTS = {
    "Dropout": lambda: nn.Dropout(0.5),
    "Dropout2d": lambda: nn.Dropout2d(0.5),
    "Dropout3d": lambda: nn.Dropout3d(0.5),
    "AlphaDropout": lambda: nn.AlphaDropout(0.5),
}


def _pair(kind: str, train: bool) -> tuple[nn.Module, torch.Tensor]:
    if kind.startswith("F."):
        m: nn.Module = _FunctionalDropout(getattr(F, kind[2:]))
        x = torch.randn(2, 8, 4, 4)
    elif kind == "Dropout3d":
        m, x = nn.Sequential(nn.Conv3d(8, 64, 1), _DROPOUTS[kind](), nn.Conv3d(64, 4, 1)), torch.randn(2, 8, 2, 4, 4)
    else:
        m, x = nn.Sequential(nn.Conv2d(8, 64, 1), _DROPOUTS[kind](), nn.Conv2d(64, 4, 1)), torch.randn(2, 8, 4, 4)
    return m.train(train), x


def _merged(kind: str, train: bool) -> tuple[nn.Module, fx.GraphModule, torch.Tensor, bool]:
    m, x = _pair(kind, train)
    gm = fx.symbolic_trace(m)
    propagate_shapes(gm, (x,))
    modified = MergeLinear()(gm).modified
    gm.recompile()
    return m, gm, x, modified


def _seeded(fn, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn(x)


@pytest.mark.parametrize("kind", [*_DROPOUTS, "F.dropout", "F.dropout2d"])
def test_merge_across_eval_dropout(kind: str) -> None:
    m, gm, x, modified = _merged(kind, train=False)
    assert modified
    assert sum(1 for n in gm.graph.nodes if n.op in ("call_module", "call_function")) == 1
    assert _rel(m(x), gm(x)) < 1e-5


@pytest.mark.parametrize("kind", [*_DROPOUTS, "F.dropout", "F.dropout2d"])
def test_no_merge_across_training_dropout(kind: str) -> None:
    m, gm, x, modified = _merged(kind, train=True)
    assert not modified
    notes: Optional[list] = gm.meta.get(NOTES_KEY)
    assert notes and len(notes) == 1 and "training-mode dropout" in notes[0], notes
    # the same random mask is drawn: the graph computes exactly what the model does
    assert _rel(_seeded(m, x), _seeded(gm, x)) < 1e-5


def test_compress_in_train_mode_keeps_dropout2d() -> None:
    """The repro: a training-mode Dropout2d between two 1x1 maps survives compress()."""
    m = nn.Sequential(nn.Conv2d(8, 64, 1), nn.Dropout2d(0.5), nn.Conv2d(64, 4, 1), nn.ReLU(),
                      nn.Conv2d(4, 64, 1), nn.Dropout(0.5), nn.Conv2d(64, 4, 1)).train()
    x = torch.randn(2, 8, 4, 4)
    r = tucker_fx.compress(m, x, config=_FULL.replace(validate=False))
    kinds = [type(mod).__name__ for mod in r.module.modules()]
    assert kinds.count("Dropout2d") == 1 and kinds.count("Dropout") == 1
    notes = r.module.meta.get(NOTES_KEY, [])
    assert sum("training-mode dropout" in n for n in notes) == 2, notes
    assert _rel(_seeded(m, x), _seeded(r.module, x)) < 1e-5
