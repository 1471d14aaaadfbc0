"""Analysis is exact on every graph spelling: traced (call_module / call_function) and exported
(aten ops of ``torch.export.export(m, args, strict=False).module()``), with
``torch.utils.flop_counter.FlopCounterMode`` as the oracle (FLOPs = 2 x MACs, bias excluded).

Where the count knowingly differs from FlopCounterMode on CPU (SDPA, matrix-vector products),
the test asserts the convention stated in docs/analysis.md instead.
Reproductions: /work/shared/repro/{aten_convtranspose_flops,sdpa_flops,unused_params}.py.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tucker_fx
from tucker_fx.analysis import SITE_KEY, capture, propagate_shapes, annotate_costs

MAC_KINDS = ("conv", "conv_transpose", "linear", "matmul", "einsum", "attention")


def oracle(fn: Callable[..., Any], *args: Any) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def exported(model: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, strict=False).module()


def both(model: nn.Module, *args: torch.Tensor) -> tuple[tucker_fx.CostReport, tucker_fx.CostReport]:
    """The reports of the traced model and of its exported graph."""
    return tucker_fx.analyze(model, *args), tucker_fx.analyze(exported(model, *args), *args)


def no_mac_op_unsupported(report: tucker_fx.CostReport) -> bool:
    words = ("conv", "linear", "mm", "matmul", "einsum", "attention", "Attention")
    return not [u for u in report.unsupported if any(w in u for w in words)]


# --- 1. transposed convolutions on exported graphs -------------------------------------------

CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class _Up(nn.Module):
    """/work/shared/repro/aten_convtranspose_flops.py"""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv3d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


def test_repro_exported_conv_transpose_counted():
    model, x = _Up().eval(), torch.randn(1, 1, 16, 16, 16)
    traced, export = both(model, x)
    assert traced.total_flops == export.total_flops == oracle(model, x) == 483_328
    assert no_mac_op_unsupported(export)


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("stride,output_padding,dilation,groups,bias", [
    (1, 0, 1, 1, True), (2, 1, 1, 2, False), (3, 2, 2, 1, True), (2, 0, 3, 4, True),
])
def test_exported_conv_transpose_matches_oracle(dims, stride, output_padding, dilation, groups, bias):
    model = CONVT[dims](4, 8, 3, stride=stride, padding=1, output_padding=output_padding,
                        dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(2, 4, *([5] * dims))
    traced, export = both(model, x)
    assert traced.total_flops == export.total_flops == oracle(model, x)
    site = next(r for r in export.rows if r.kind == "conv_transpose")
    assert site.params == sum(p.numel() for p in model.parameters())
    gm = capture(exported(model, x))
    propagate_shapes(gm, (x,))
    annotate_costs(gm)
    sites = [n.meta[SITE_KEY] for n in gm.graph.nodes if SITE_KEY in n.meta]
    assert [(s.transposed, s.groups, s.output_padding, s.dilation) for s in sites] == [
        (True, groups, (output_padding,) * dims, (dilation,) * dims)]


def test_exported_convolution_transposed_flag_counted():
    """``aten.convolution(..., transposed=True, ...)`` (what aot_autograd gives) counts the same."""

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 2, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.convolution(x, self.w, None, [2, 2], [0, 0], [1, 1], True, [1, 1], 1)

    model, x = Raw(), torch.randn(1, 4, 5, 5)
    traced, export = both(model, x)
    assert traced.total_flops == export.total_flops == oracle(model, x) > 0


# --- 2. einsum, matmul family, attention ---------------------------------------------------------

def _of_arity(fn: Callable[..., torch.Tensor], arity: int) -> nn.Module:
    """A module whose forward takes ``arity`` tensors and returns ``fn(*them)`` (symbolic_trace
    cannot trace ``*args``)."""
    forwards = {
        1: lambda self, a: fn(a),
        2: lambda self, a, b: fn(a, b),
        3: lambda self, a, b, c: fn(a, b, c),
        4: lambda self, a, b, c, d: fn(a, b, c, d),
    }
    return type(f"Fn{arity}", (nn.Module,), {"forward": forwards[arity]})()


def _einsum(equation: str, arity: int) -> nn.Module:
    return _of_arity(lambda *xs: torch.einsum(equation, *xs), arity)


EINSUMS = [
    ("bhid,bhjd->bhij", [(1, 2, 5, 4), (1, 2, 6, 4)]),        # MONAI SABlock: QK^T
    ("bhij,bhjd->bhid", [(1, 2, 5, 6), (1, 2, 6, 4)]),        # attention x V
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk->k", [(3, 4), (4, 5)]),                            # i summed out alone first
    ("i,j->ij", [(3,), (4,)]),                                 # outer product: a mul, no MACs
    ("ii->", [(3, 3)]),                                        # one operand: a sum
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)]),        # ellipsis broadcasting
    ("bij,bjk", [(2, 3, 4), (2, 4, 5)]),                      # implicit output
    ("ab,bc,cd,de->ae", [(2, 30), (30, 3), (3, 40), (40, 5)]),  # left to right (no opt_einsum)
    ("bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]),
]


@pytest.mark.parametrize("equation,shapes", EINSUMS, ids=[e for e, _ in EINSUMS])
def test_einsum_matches_oracle(equation, shapes):
    model = _einsum(equation, len(shapes))
    xs = [torch.randn(s) for s in shapes]
    traced, export = both(model, *xs)
    assert traced.total_flops == export.total_flops == oracle(model, *xs)
    assert traced.unsupported == [] and export.unsupported == []


def test_einsum_sublist_format():
    class Sub(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum(a, [0, 1], b, [1, 2], [0, 2])

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert tucker_fx.analyze(Sub(), a, b).total_flops == oracle(Sub(), a, b) == 2 * 3 * 4 * 5


@pytest.mark.parametrize("fn,shapes", [
    (torch.bmm, [(3, 4, 5), (3, 5, 6)]),
    (torch.matmul, [(2, 1, 3, 4), (5, 4, 6)]),
    (torch.matmul, [(4,), (4, 5)]),
    (torch.mm, [(4, 5), (5, 6)]),
    (lambda a, b, c: torch.baddbmm(c, a, b), [(3, 4, 5), (3, 5, 6), (3, 4, 6)]),
    (lambda a, b, c: torch.addmm(c, a, b), [(4, 5), (5, 6), (6,)]),
], ids=["bmm", "matmul_bcast", "vecmat", "mm", "baddbmm", "addmm"])
def test_matmul_family_matches_oracle(fn, shapes):
    model = _of_arity(fn, len(shapes))
    xs = [torch.randn(s) for s in shapes]
    traced, export = both(model, *xs)
    assert traced.total_flops == export.total_flops == oracle(model, *xs) > 0


@pytest.mark.parametrize("a,b", [((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4,))])
def test_matrix_vector_counted_as_its_macs(a, b):
    """Convention (docs/analysis.md): mv/dot count their multiply-adds; FlopCounterMode has no
    formula for aten.mv/aten.dot and reports 0."""

    class M(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x @ y

    xs = torch.randn(a), torch.randn(b)
    expected = 2 * torch.Size(a).numel()
    traced, export = both(M(), *xs)
    assert traced.total_flops == export.total_flops == expected


def _attention_by_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA written as the two matmuls FlopCounterMode does count on CPU."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ v


class _SDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("q,kv,dv", [((1, 2, 5, 4), (1, 2, 7, 4), 4), ((2, 3, 6, 8), (2, 3, 6, 8), 5)])
def test_sdpa_counts_its_two_matmuls(q, kv, dv):
    """Convention: SDPA counts as its two matmuls, FlopCounterMode's ``sdpa_flop_count`` (what it
    reports on CUDA). On CPU FlopCounterMode reports 0: the op dispatches to
    aten._scaled_dot_product_flash_attention_for_cpu, which has no formula."""
    qt, kt = torch.randn(q), torch.randn(kv)
    vt = torch.randn(*kv[:-1], dv)
    traced, export = both(_SDPA(), qt, kt, vt)
    formula = sdpa_flop_count(qt.shape, kt.shape, vt.shape)
    assert traced.total_flops == export.total_flops == formula == oracle(_attention_by_matmuls, qt, kt, vt)


def test_sdpa_cpu_kernel_op_counted():
    """The CPU kernel's own op, as a graph lowered past SDPA holds it, counts the same."""

    class Cpu(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]

    q = torch.randn(1, 2, 5, 4)
    report = tucker_fx.analyze(Cpu(), q, q, q)
    assert report.total_flops == sdpa_flop_count(q.shape, q.shape, q.shape)


class _MHA(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.0, **kwargs)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv)[0]


@pytest.mark.parametrize("kwargs,q,kv", [
    ({"batch_first": True}, (2, 5, 8), (2, 7, 8)),
    ({}, (5, 2, 8), (7, 2, 8)),
    ({"kdim": 6, "vdim": 6, "batch_first": True}, (1, 5, 8), (1, 3, 6)),
    ({"add_bias_kv": True, "add_zero_attn": True}, (5, 1, 8), (4, 1, 8)),
    ({}, (5, 8), (4, 8)),  # unbatched
], ids=["batch_first", "seq_first", "kdim", "bias_kv_zero_attn", "unbatched"])
def test_multihead_attention_module(kwargs, q, kv):
    """A traced nn.MultiheadAttention is one call_module node: its projections plus the two
    attention matmuls, as FlopCounterMode counts the slow path (need_weights=True)."""
    model = _MHA(**kwargs).train()  # train mode, dropout 0: the path FlopCounterMode counts on CPU
    qt, kvt = torch.randn(q), torch.randn(kv)
    expected = oracle(model, qt, kvt)
    traced, export = both(model.eval(), qt, kvt)
    assert any(r.kind == "attention" for r in traced.rows)
    assert traced.total_flops == export.total_flops == expected > 0
    assert no_mac_op_unsupported(traced) and no_mac_op_unsupported(export)


def test_native_multi_head_attention_op_counted_like_the_module():
    """The fused op of MultiheadAttention's eval fast path counts like the module."""
    mha = _MHA(batch_first=True).attn

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.m
            return torch._native_multi_head_attention(x, x, x, m.embed_dim, m.num_heads, m.in_proj_weight,
                                                      m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)[0]

    x = torch.randn(2, 5, 8)
    traced, export = both(Fused(), x)
    module = tucker_fx.analyze(_MHA(batch_first=True), x, x)
    assert traced.total_flops == export.total_flops == module.total_flops > 0


def test_repro_sdpa_einsum_mha():
    """/work/shared/repro/sdpa_flops.py: every one counted, none unsupported."""
    q = torch.randn(1, 2, 5, 4)
    assert tucker_fx.analyze(_SDPA(), q, q, q).total_flops == sdpa_flop_count(q.shape, q.shape, q.shape)
    e = _einsum("bhid,bhjd->bhij", 2)
    report = tucker_fx.analyze(e, q, q)
    assert report.total_flops == oracle(e, q, q) == 400 and report.unsupported == []
    mha = _MHA(batch_first=True)
    x = torch.randn(1, 5, 8)
    report = tucker_fx.analyze(mha.eval(), x, x)
    assert report.unsupported == [] and report.total_flops == oracle(mha.train(), x, x)


# --- 3. parameters of modules forward does not call ----------------------------------------------

class _VaeHead(nn.Module):
    """/work/shared/repro/unused_params.py"""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)
        self.vae_head = nn.Linear(8, 256)  # used only in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training:
            y = y + self.vae_head(y.mean((2, 3)))[:, :8, None, None]
        return y


def test_unused_params_reported():
    model, x = _VaeHead().eval(), torch.randn(1, 3, 8, 8)
    for report in both(model, x):
        assert report.total_params == sum(p.numel() for p in model.parameters()) == 2528
        assert report.unused_params == 8 * 256 + 256
        assert report.unused == ["vae_head.weight", "vae_head.bias"]
        data = json.loads(report.to_json())
        assert data["unused_params"] == 2304 and data["unused"] == ["vae_head.weight", "vae_head.bias"]
        md = report.to_markdown()
        assert "2,528" in md and "2,304" in md and "vae_head" in md


def test_no_unused_params_no_markdown_line():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8)
    report = tucker_fx.analyze(model, x)
    assert report.unused_params == 0 and report.unused == [] and "unused" not in report.to_markdown()


def test_shared_and_tied_params_count_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied: one tensor, two names
            self.spare = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x)

    model = Tied()
    report = tucker_fx.analyze(model, torch.randn(2, 4))
    assert report.total_params == sum(p.numel() for p in model.parameters()) == 16 + 4 + 4 + 10
    assert report.unused == ["a.bias", "spare.weight", "spare.bias"] and report.unused_params == 14


def test_bare_leaf_module_has_no_unused_params():
    conv = nn.Conv2d(3, 4, 3)
    report = tucker_fx.analyze(conv, torch.randn(1, 3, 8, 8))
    assert report.total_params == 3 * 4 * 9 + 4 and report.unused == []


def test_annotate_costs_counts_the_given_model():
    """``annotate_costs(gm, model=...)``: totals over the model the graph was captured from (what
    compress's before-report needs), matched by name also on a deep copy."""
    model, x = _VaeHead().eval(), torch.randn(1, 3, 8, 8)
    gm = capture(model, copy_weights=True)
    propagate_shapes(gm, (x,))
    assert annotate_costs(gm).total_params == 224  # the graph module holds only what it uses
    report = annotate_costs(gm, model=model)
    assert report.total_params == 2528 and report.unused == ["vae_head.weight", "vae_head.bias"]


# --- real networks: MONAI 3D nets in small configs --------------------------------------------------

def _monai_nets() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]]:
    """name: (factory, input shape, symbolic_trace works)."""
    from monai.networks import nets

    return {
        "UNet": (lambda: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
                 (1, 1, 16, 16, 16), True),
        "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), (1, 1, 32, 32, 32), False),
        "SegResNet": (lambda: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2, blocks_down=(1, 1),
                                             blocks_up=(1,), norm=("GROUP", {"num_groups": 2})),
                      (1, 1, 16, 16, 16), True),
        "DynUNet": (lambda: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                         upsample_kernel_size=[2, 2], filters=[4, 8, 16]), (1, 1, 16, 16, 16), True),
        "UNETR": (lambda: nets.UNETR(1, 2, img_size=(16, 16, 16), feature_size=4, hidden_size=24, mlp_dim=48,
                                     num_heads=2, proj_type="conv"), (1, 1, 16, 16, 16), False),
        "AutoEncoder": (lambda: nets.AutoEncoder(3, 1, 1, channels=(4, 8), strides=(2, 2)), (1, 1, 16, 16, 16), True),
        "VarAutoEncoder": (lambda: nets.VarAutoEncoder(3, (1, 16, 16, 16), 1, 8, channels=(4, 8), strides=(2, 2)),
                           (1, 1, 16, 16, 16), True),
        "SwinUNETR2d": (lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                                               num_heads=(1, 1, 1, 1), spatial_dims=2), (1, 1, 64, 64), False),
    }


MONAI_NETS = [pytest.param(name, marks=pytest.mark.slow)
              for name in ("UNet", "BasicUNet", "SegResNet", "DynUNet", "UNETR", "VarAutoEncoder", "SwinUNETR2d")]
MONAI_NETS.append("AutoEncoder")  # ~1 s: conv + transposed conv, traced and exported, in the fast run


@pytest.mark.parametrize("name", MONAI_NETS)
def test_monai_net_matches_oracle_traced_and_exported(name):
    pytest.importorskip("monai")
    factory, shape, traceable = _monai_nets()[name]
    model = factory().eval()
    x = torch.randn(shape)
    expected = oracle(model, x)
    params = sum(p.numel() for p in model.parameters())
    reports = [tucker_fx.analyze(exported(model, x), x)]
    if traceable:
        reports.append(tucker_fx.analyze(model, x))
    for report in reports:
        assert report.total_flops == expected
        assert report.total_params == params
        assert no_mac_op_unsupported(report), report.unsupported
