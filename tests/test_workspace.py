"""Reused output buffers (kernels.workspace, passes.workspace): exact, never seen by the caller or autograd."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tucker_fx
from tucker_fx.kernels import native
from tucker_fx._internal.meta import NOTES_KEY
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.kernels.workspace import SLOT_ATTR, WORKSPACE_ATTR, Workspace
from tucker_fx.passes.inplace import WriteInPlace
from tucker_fx.passes.workspace import PlanWorkspace


def test_take_reuses_and_grows() -> None:
    ws = Workspace()
    x = torch.randn(3)
    with torch.no_grad():
        a = ws.take(0, (4, 5), x)
        b = ws.take(0, (2, 3), x)
        c = ws.take(0, (6, 6), x)  # larger: a new buffer
        d = ws.take(0, (4, 5), x)  # fits in the grown one
        e = ws.take(1, (4, 5), x)
    assert a.data_ptr() == b.data_ptr() and c.data_ptr() == d.data_ptr() != e.data_ptr()
    assert a.is_contiguous() and tuple(b.shape) == (2, 3)
    with torch.no_grad():
        f = ws.take(0, (2,), x.double())  # another dtype: its own buffer
    assert f.dtype == torch.float64
    assert ws.nbytes() > 0
    ws.clear()
    assert ws.nbytes() == 0


def test_take_refuses_where_reuse_could_be_seen() -> None:
    ws = Workspace()
    x = torch.randn(3)
    w = nn.Parameter(torch.randn(2))
    assert ws.take(0, (2,), x, w) is None  # autograd records: the backward may keep the output
    assert ws.take(0, (2,), x.requires_grad_()) is None
    with torch.no_grad():
        assert ws.take(0, (2,), torch.randn(3), w) is not None
    with torch.inference_mode():
        inf = ws.take(0, (2,), torch.randn(3))
    assert inf is not None and inf.is_inference()
    with torch.no_grad():
        plain = ws.take(0, (2,), torch.randn(3))  # not an inference tensor: writable outside inference mode
    assert not plain.is_inference()


def test_threads_get_their_own_buffers() -> None:
    ws = Workspace()
    ptrs = []

    def work() -> None:
        with torch.no_grad():
            ptrs.append(ws.take(0, (1000,), torch.randn(1)).data_ptr())

    work()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert len(set(ptrs)) == 2


def test_copies_and_pickles_start_empty_and_share_one_workspace() -> None:
    ws = Workspace()
    a, b = nn.Module(), nn.Module()
    setattr(a, WORKSPACE_ATTR, ws)
    setattr(b, WORKSPACE_ATTR, ws)
    with torch.no_grad():
        ws.take(0, (10,), torch.randn(1))
    pair = copy.deepcopy(nn.ModuleList([a, b]))
    copied = getattr(pair[0], WORKSPACE_ATTR)
    assert copied is getattr(pair[1], WORKSPACE_ATTR) and copied is not ws and copied.nbytes() == 0
    restored = pickle.loads(pickle.dumps(ws))
    assert restored.nbytes() == 0


class _Chain(nn.Module):
    """1x1 convs with in-place activations, an in-place residual add, and a tap of an early map."""

    def __init__(self, tap: bool) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv3d(4, 16, 1), nn.Conv3d(16, 16, 1), nn.Conv3d(16, 16, 1),
                                          nn.Conv3d(16, 8, 1))
        self.act = nn.ReLU(inplace=True)
        self.tap = tap

    def forward(self, x: torch.Tensor):
        y = self.act(self.a(x))
        z = self.act(self.b(y))
        w = self.c(z) + y  # y is alive until here
        out = self.d(F.relu(w))
        return (out, y) if self.tap else out


def _lowered(net: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(net)
    for name in ("a", "b", "c", "d"):
        setattr(gm, name, PointwiseConv.from_conv(getattr(net, name)))
    gm.recompile()
    propagate_shapes(gm, (x,))
    return gm


@pytest.mark.parametrize("tap", [False, True])
def test_plan_shares_slots_only_between_maps_never_alive_together(tap: bool) -> None:
    torch.manual_seed(0)
    net = _Chain(tap).eval()
    x = torch.randn(1, 4, 6, 7, 8)
    gm = _lowered(net, x)
    WriteInPlace()(gm)
    assert PlanWorkspace(min_bytes=0)(gm).modified
    slots = {n: getattr(gm.get_submodule(n), SLOT_ATTR, None) for n in ("a", "b", "c", "d")}
    assert slots["d"] is None  # the graph's output: the caller keeps it
    if tap:
        assert slots["a"] is None  # returned to the caller too
    else:
        assert slots["a"] is not None and slots["a"] not in (slots["b"], slots["c"])  # a's map lives until the add
    assert slots["b"] is not None and slots["c"] is not None and slots["b"] != slots["c"]  # c reads b's map
    with torch.no_grad():
        ref = net(x)
        first = gm(x)
        first = tuple(t.clone() for t in first) if tap else first.clone()
        second = gm(x)  # the same buffers again
        other = gm(torch.randn_like(x))
    for got in (first, second):
        for g, r in zip(got if tap else (got,), ref if tap else (ref,)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other if not tap else other[0], ref if not tap else ref[0])
    assert "reused buffers" in " ".join(gm.meta[NOTES_KEY])


def test_outputs_are_never_overwritten_by_a_later_call() -> None:
    torch.manual_seed(1)
    net = _Chain(tap=False).eval()
    x = torch.randn(1, 4, 6, 7, 8)
    gm = _lowered(net, x)
    PlanWorkspace(min_bytes=0)(gm)
    with torch.no_grad():
        out1 = gm(x)
        kept = out1.clone()
        gm(torch.randn_like(x))
    assert torch.equal(out1, kept)


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t  # a Python function the pass knows nothing of: it could keep a reference


torch.fx.wrap("_keep")


class _Viewer(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = nn.Conv3d(4, 16, 1), nn.Conv3d(16, 16, 1), how
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.how == "view":
            v = y.view(1, 16, -1)  # a view of a's map, alive past b
            return self.b(y) + v.view_as(y)
        if self.how == "dropout":
            d = self.drop(y)  # eval: y itself
            return self.b(d) + d
        return self.b(y) + _keep(y)


@pytest.mark.parametrize("how, pooled", [("view", True), ("dropout", True), ("unknown", False)])
def test_views_and_dropouts_extend_a_maps_life_and_unknown_readers_keep_it_out(how: str, pooled: bool) -> None:
    torch.manual_seed(2)
    net = _Viewer(how).eval()
    x = torch.randn(1, 4, 5, 5, 5)
    gm = fx.symbolic_trace(net)
    for name in ("a", "b"):
        setattr(gm, name, PointwiseConv.from_conv(getattr(net, name)))
    gm.recompile()
    propagate_shapes(gm, (x,))
    PlanWorkspace(min_bytes=0)(gm)
    slot_a, slot_b = (getattr(gm.get_submodule(n), SLOT_ATTR, None) for n in ("a", "b"))
    assert (slot_a is not None) is pooled
    assert slot_b is not None and slot_a != slot_b  # a's map (or its view) is read after b runs
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)


def test_training_and_autograd_do_not_reuse() -> None:
    torch.manual_seed(3)
    net = _Chain(tap=False)
    x = torch.randn(1, 4, 6, 7, 8)
    gm = _lowered(net, x)
    PlanWorkspace(min_bytes=0)(gm)
    ws = getattr(gm.get_submodule("a"), WORKSPACE_ATTR)
    out = gm(x)
    out.sum().backward()
    assert ws.nbytes() == 0  # autograd recorded: nothing was taken from the workspace
    grads = [p.grad.clone() for p in gm.parameters()]
    ref = _lowered(net, x)
    ref(x).sum().backward()
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_compress_plans_the_workspace_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import tucker_fx.passes.workspace as workspace_pass

    monkeypatch.setattr(workspace_pass, "MIN_BYTES", 0)  # small maps, so the test stays fast
    # without the native kernels: their chains would not write the wide maps that need the buffers
    monkeypatch.setitem(native._state, "lib", None)
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv3d(8, 32, 3, padding=1), nn.InstanceNorm3d(32, affine=True), nn.LeakyReLU(inplace=True),
                        nn.Conv3d(32, 32, 3, padding=1), nn.InstanceNorm3d(32, affine=True), nn.LeakyReLU(inplace=True),
                        nn.Conv3d(32, 4, 1)).eval()
    x = torch.randn(1, 8, 24, 24, 24)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, tuning_cache=False))
    assert "reused buffers" in " ".join(r.module.meta.get(NOTES_KEY, []))
    plain = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, progress=False, lowering="none"))
    with torch.no_grad():
        want = plain.module(x)
        for _ in range(3):
            torch.testing.assert_close(r.module(x), want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(r.module(x), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # after inference mode: a buffer that is not an inference tensor
        torch.testing.assert_close(r.module(x), want, rtol=1e-4, atol=1e-4)


def test_default_threshold_leaves_heap_sized_maps_alone() -> None:
    from tucker_fx.passes.workspace import MIN_BYTES

    torch.manual_seed(5)
    net = _Chain(tap=False).eval()
    x = torch.randn(1, 4, 6, 7, 8)
    gm = _lowered(net, x)
    assert MIN_BYTES == 32 << 20 and not PlanWorkspace()(gm).modified


def test_dynamic_batch_export_of_a_pooled_model() -> None:
    torch.manual_seed(6)
    net = _Chain(tap=False).eval()
    x = torch.randn(2, 4, 6, 7, 8)
    gm = _lowered(net, x)
    assert PlanWorkspace(min_bytes=0)(gm).modified
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(gm, (x,), dynamic_shapes=({0: batch},))  # no batch size read as an int
    y = torch.randn(3, 4, 6, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y), net(y), rtol=1e-5, atol=1e-5)
