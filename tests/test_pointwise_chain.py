"""1x1 -> activation -> 1x1 chains on the native kernel (kernels/pointwise_chain, passes/pointwise_chain):
exact against the three modules, fused only where the pattern holds, counted the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tucker_fx
from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.kernels import native
from tucker_fx.kernels.norm_fold import NormedPointwise
from tucker_fx.kernels.pointwise import PointwiseConv
from tucker_fx.kernels.pointwise_chain import NormActPointwise, PointwiseAdd, PointwiseChain, UpsampleAdd, activation_slope
from tucker_fx.passes.fast_kernels import UseFastKernels
from tucker_fx.passes.norm_fold import FoldNormIntoPointwise
from tucker_fx.passes.pointwise_chain import FusePointwiseChains

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.status()}")


def _reference(z: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2, slope: float) -> torch.Tensor:
    n, r1 = z.shape[:2]
    cols = z.reshape(n, r1, -1).double()
    w1d = w1.double() if w1.dim() == 3 else w1.double().expand(n, -1, -1)
    b1d = b1.double() if b1.dim() == 2 else b1.double().expand(n, -1)
    h = torch.bmm(w1d, cols) + b1d.unsqueeze(2)
    h = torch.where(h > 0, h, slope * h)
    y = torch.einsum("oc,ncp->nop", w2.double(), h)
    if b2 is not None:
        y = y + b2.double()[:, None]
    return y.reshape(n, w2.shape[0], *z.shape[2:]).float()


@needs_native
@pytest.mark.parametrize("r1,c,r2", [(4, 16, 4), (8, 32, 8), (3, 10, 5), (16, 64, 16), (1, 7, 2), (32, 128, 32)])
@pytest.mark.parametrize("spatial", [(1, 1, 1), (2, 3, 5), (4, 4, 16), (3, 5, 33)])
@pytest.mark.parametrize("slope", [0.0, 0.01, 1.0])
def test_kernel_is_the_chain(r1: int, c: int, r2: int, spatial: tuple[int, ...], slope: float) -> None:
    torch.manual_seed(r1 + c + r2)
    z, w1, b1, w2, b2 = (torch.randn(2, r1, *spatial), torch.randn(c, r1), torch.randn(c), torch.randn(r2, c),
                         torch.randn(r2))
    y = native.pointwise_chain(z, w1, b1, w2, b2, slope)
    # float32 sums of r1 and c products against float64: rounding only
    torch.testing.assert_close(y, _reference(z, w1, b1, w2, b2, slope), rtol=1e-5, atol=2e-5 * (r1 * c) ** 0.5)


@needs_native
def test_kernel_takes_per_sample_weights_no_bias_and_threads() -> None:
    torch.manual_seed(0)
    z, w1, b1, w2 = torch.randn(3, 4, 5, 6, 70), torch.randn(3, 16, 4), torch.randn(3, 16), torch.randn(4, 16)
    ref = _reference(z, w1, b1, w2, None, 0.1)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.testing.assert_close(native.pointwise_chain(z, w1, b1, w2, None, 0.1), ref, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("r,c", [(16, 4), (4, 16), (3, 5), (8, 32), (33, 2)])
@pytest.mark.parametrize("n,spatial", [(1, (9, 31, 33)), (2, (4, 16, 130))])
@pytest.mark.parametrize("bias,into", [(True, False), (False, True)])
def test_pointwise_product_kernel_matches_a_1x1_conv(r: int, c: int, n: int, spatial: tuple, bias: bool,
                                                     into: bool) -> None:
    torch.manual_seed(0)
    z, w = torch.randn(n, r, *spatial), torch.randn(c, r)
    b = torch.randn(c) if bias else None
    out = torch.full((n, c, *spatial), float("nan")) if into else None
    y = native.pointwise(z, w, b, out)
    ref = torch.nn.functional.conv3d(z.double(), w.double()[:, :, None, None, None], None if b is None else b.double())
    assert out is None or y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=2e-6 * r ** 0.5)  # sums of r products: rounding


@needs_native
@pytest.mark.parametrize("grad", [False, True])
def test_pointwise_conv_takes_the_native_product_only_where_it_wins_and_no_gradient_is_recorded(
        grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = native.pointwise
    monkeypatch.setattr(native, "pointwise", lambda z, w, *a: calls.append(tuple(w.shape)) or real(z, w, *a))
    torch.manual_seed(0)
    for r, c in [(16, 4), (64, 16), (4, 16)]:
        conv = nn.Conv3d(r, c, 1)
        x = torch.randn(1, r, 8, 32, 32)  # 8192 positions
        with torch.set_grad_enabled(grad):
            y = PointwiseConv.from_conv(conv)(x)
            torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
        assert y.requires_grad == grad
    assert calls == ([] if grad else [(4, 16), (16, 4)])  # 64 -> 16: both sides wide, torch.mm


@needs_native
@pytest.mark.parametrize("r,c,r2,groups", [(4, 16, 4, 8), (5, 12, 3, 12), (16, 64, 16, 8), (1, 2, 1, 1)])
@pytest.mark.parametrize("n,spatial", [(1, (16, 16, 16)), (2, (3, 7, 9))])
@pytest.mark.parametrize("threads", [1, 3])
def test_normed_chain_kernel_is_a_group_norm_between_two_products(r: int, c: int, r2: int, groups: int, n: int,
                                                                  spatial: tuple, threads: int) -> None:
    """The statistics from the narrow input's moments (a large mean: shifted sums, or the variance
    cancels away), the fold and the chain against the plain ops in float64."""
    torch.manual_seed(0)
    z = torch.randn(n, r, *spatial) * 3 + 50
    w, b, gamma, beta = torch.randn(c, r), torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    w2, b2 = torch.randn(r2, c), torch.randn(r2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = native.normed_chain(z, w, b, groups, gamma, beta, 1e-5, w2, b2, 0.1)
    finally:
        torch.set_num_threads(before)
    d = {k: t.double() for k, t in dict(z=z, w=w, b=b, gamma=gamma, beta=beta, w2=w2, b2=b2).items()}
    h = torch.einsum("cr,nr...->nc...", d["w"], d["z"]) + d["b"].reshape(-1, *[1] * len(spatial))
    h = torch.nn.functional.leaky_relu(torch.nn.functional.group_norm(h, groups, d["gamma"], d["beta"], 1e-5), 0.1)
    ref = torch.einsum("oc,nc...->no...", d["w2"], h) + d["b2"].reshape(-1, *[1] * len(spatial))
    torch.testing.assert_close(y, ref.float(), rtol=1e-4, atol=1e-4 * c ** 0.5)


_SPLIT_CALLS = {  # every kernel, on maps large enough that three threads each get a share
    "chain": lambda z, s: native.pointwise_chain(z, torch.randn(16, 4), torch.randn(16), torch.randn(4, 16), None, 0.0),
    "add": lambda z, s: native.pointwise_add(z, torch.randn(16, 4), torch.randn(16), s),
    "product": lambda z, s: native.pointwise(s, torch.randn(4, 16), torch.randn(4)),
    "norm_act": lambda z, s: native.norm_act_pointwise(s, 4, None, None, 1e-5, 0.1, torch.randn(4, 16), torch.randn(4)),
    "upsample": lambda z, s: native.upsample2x_trilinear(z, torch.randn(z.shape[:2] + tuple(2 * k for k in z.shape[2:]))),
    "conv": lambda z, s: native.narrow_conv3d(z, torch.randn(4, 4, 3, 3, 3), torch.randn(4)),
}


@needs_native
@pytest.mark.parametrize("kernel", sorted(_SPLIT_CALLS))
@pytest.mark.parametrize("n", [1, 2])
def test_every_kernel_gives_the_same_bits_on_one_thread_and_three(kernel: str, n: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each position (row, plane) is computed by the same code whichever thread runs it, so splitting
    changes no bit; 12 x 16 x 72 positions: 3 chunks of at least 4096."""
    z, s = torch.randn(n, 4, 12, 16, 72), torch.randn(n, 16, 12, 16, 72)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            torch.manual_seed(1)
            out[threads] = _SPLIT_CALLS[kernel](z, s.clone())
        monkeypatch.setattr(native, "MAX_THREADS", 1)  # the cap: three torch threads, one for the kernels
        torch.manual_seed(1)
        capped = _SPLIT_CALLS[kernel](z, s.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1], out[3]) and torch.equal(out[1], capped)


def test_kernels_share_torchs_openmp_runtime() -> None:
    """Built with OpenMP only where torch runs on libgomp, and then on torch's copy: one ``libgomp.so.1``
    in the process, so a kernel's threads are torch's pool, not a second pool competing with it.
    (A wheel's vendored, renamed copy, as scikit-learn's, loaded by an earlier test, is its own.)"""
    try:  # a renamed libgomp in the process too, as in a full test run (the test extra has scikit-learn)
        import sklearn.utils._openmp_helpers  # noqa: F401
    except ImportError:
        pass
    mode = native.threading_mode()
    if not native.available():
        assert mode == "not loaded"
        return
    gomps = native.gomp_libraries()
    assert len(gomps) <= 1, gomps
    assert (mode == "OpenMP, torch's thread pool") == bool(gomps) or mode.startswith("the calling thread (an OpenMP")


@needs_native
def test_kernel_checks_its_arguments() -> None:
    z = torch.randn(1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"expected z \(N, R1, \.\.\.\), w1 \(\[N,\] C, R1\).*got \(1, 4, 3, 3, 3\), \(16, 5\)"):
        native.pointwise_chain(z, torch.randn(16, 5), torch.randn(16), torch.randn(4, 16), None, 0.0)
    with pytest.raises(ValueError, match=r"at most \(R1, C, R2\) = \(64, 512, 64\), got \(4, 600, 4\)"):
        native.pointwise_chain(z, torch.randn(600, 4), torch.randn(600), torch.randn(4, 600), None, 0.0)
    with pytest.raises(ValueError, match="expected float32 CPU tensors, got z torch.float64"):
        native.pointwise_chain(z.double(), torch.randn(16, 4), torch.randn(16), torch.randn(4, 16), None, 0.0)


def _parts(normed: bool, act: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(1)
    up = PointwiseConv.from_conv(nn.Conv3d(4, 16, 1))
    first = NormedPointwise(up, nn.GroupNorm(4, 16)) if normed else up
    return first, act, PointwiseConv.from_conv(nn.Conv3d(16, 4, 1))


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.ReLU(inplace=True)])
@pytest.mark.parametrize("how", ["eager", "grad", "channels_last", "disabled"])
def test_module_is_its_three_modules_on_every_path(normed: bool, act: nn.Module, how: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first, act, second = _parts(normed, act)
    chain = PointwiseChain(first, act, second)
    z = torch.randn(2 if how == "eager" else 1, 4, 5, 6, 21)
    if how == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last_3d)
    if how == "disabled":
        monkeypatch.setitem(native._state, "lib", None)
    calls: list[int] = []
    name = "normed_chain" if normed else "pointwise_chain"  # a folded norm: statistics, fold and chain in one call
    real = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        ref = second(act(first(z.clone())))
    with torch.set_grad_enabled(how == "grad"):
        y = chain(z)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    assert bool(calls) == (how in ("eager", "channels_last") and native.available())
    if how == "grad":  # the three modules, so gradients reach the shared parameters
        y.sum().backward()
        assert second.weight.grad is not None and first.weight.grad is not None


def test_module_refuses_what_it_does_not_compute() -> None:
    first, act, second = _parts(False, nn.ReLU())
    for bad in ((first, nn.GELU(), second), (first, act, nn.Conv3d(16, 4, 1)),
                (PointwiseConv.from_conv(nn.Conv3d(4, 16, 1, stride=2)), act, second)):
        with pytest.raises(ValueError, match="PointwiseChain: expected a stride-1 PointwiseConv or NormedPointwise"):
            PointwiseChain(*bad)
    with pytest.raises(ValueError, match="the first product makes 16 channels, the second reads 8"):
        PointwiseChain(first, act, PointwiseConv.from_conv(nn.Conv3d(8, 4, 1)))
    assert activation_slope(nn.ReLU()) == 0.0 and activation_slope(nn.LeakyReLU(0.3)) == pytest.approx(0.3)
    assert activation_slope(nn.PReLU()) is None


def _graph(net: nn.Module, x: torch.Tensor, fold: bool = False) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    UseFastKernels()(gm)
    if fold:
        FoldNormIntoPointwise()(gm)
    return gm


@needs_native
@pytest.mark.parametrize("fold", [False, True])
def test_pass_fuses_the_chain_keeps_the_output_and_the_counts(fold: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(4, 16, 1), nn.GroupNorm(4, 16), nn.LeakyReLU(0.01), nn.Conv3d(16, 4, 1),
                        nn.Conv3d(4, 4, 3, padding=1)).eval()
    x = torch.randn(1, 4, 6, 8, 16)
    gm = _graph(net, x, fold)
    before = tucker_fx.analyze(gm, x)
    result = FusePointwiseChains()(gm)
    kinds = [gm.get_submodule(str(n.target)).__class__.__name__ for n in gm.graph.nodes if n.op == "call_module"]
    if fold:  # NormedPointwise -> LeakyReLU -> PointwiseConv
        assert result.modified and kinds == ["PointwiseChain", "NarrowConv3d"]
        assert "1x1 -> activation -> 1x1 chains on the native kernel" in " ".join(gm.meta["tucker_fx.notes"])
    else:  # the norm not folded: GroupNorm -> LeakyReLU -> PointwiseConv is the pre-activation head
        assert result.modified and kinds == ["PointwiseConv", "NormActPointwise", "NarrowConv3d"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-4)
    after = tucker_fx.analyze(gm, x)
    assert after.unsupported == [] and after.total_params == before.total_params
    assert after.total_flops == pytest.approx(before.total_flops, rel=0.02)  # the activation counted per element


@needs_native
def test_pass_leaves_chains_whose_maps_are_read_elsewhere_or_not_wide() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.act, self.down = nn.Conv3d(4, 16, 1), nn.ReLU(), nn.Conv3d(16, 4, 1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h = self.act(self.up(z))
            return self.down(h), h  # the wide map is an output too

    x = torch.randn(1, 4, 4, 4, 8)
    assert not FusePointwiseChains()(_graph(Branch().eval(), x)).modified
    narrow = nn.Sequential(nn.Conv3d(8, 12, 1), nn.ReLU(), nn.Conv3d(12, 8, 1)).eval()  # 12 < 2 * 8
    assert not FusePointwiseChains()(_graph(narrow, torch.randn(1, 8, 4, 4, 8))).modified


def test_compressed_model_with_chains_exports_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 16, 6, 8, 16)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, only_if_cheaper=False,
                                                                 keep_original_if_faster=False, progress=False))
    chains = [m for m in r.module.modules() if isinstance(m, PointwiseChain)]
    assert len(chains) == (1 if native.available() else 0)  # last(4 -> 16) -> ReLU -> first(16 -> 4)
    ep = torch.export.export(r.module, (x,))
    assert not any("tucker_fx" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(ep.module()(x), r.module(x), rtol=1e-5, atol=1e-5)
    loaded = tucker_fx.load(tucker_fx.save(r, tmp_path / "net"), net, x)
    torch.testing.assert_close(loaded.module(x), r.module(x), rtol=0, atol=0)


@pytest.mark.slow
def test_module_compiles_with_inductor() -> None:
    first, act, second = _parts(True, nn.LeakyReLU(0.01))
    chain = PointwiseChain(first, act, second)
    z = torch.randn(1, 4, 4, 6, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(chain)(z), second(act(first(z))), rtol=1e-5, atol=1e-4)


class _Residual(nn.Module):
    """A pre-activation block's tail: the last factor's product and the residual sum."""

    def __init__(self, skip_read_again: bool) -> None:
        super().__init__()
        self.pre, self.core, self.last = nn.Conv3d(16, 16, 1), nn.Conv3d(16, 4, 1), nn.Conv3d(4, 16, 1)
        self.skip_read_again = skip_read_again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.pre(x)  # a buffer the graph owns
        y = self.last(self.core(skip)) + skip
        return y * skip if self.skip_read_again else y


@needs_native
@pytest.mark.parametrize("skip_read_again", [False, True])
def test_pass_fuses_the_residual_add_in_place_only_where_nothing_else_reads(skip_read_again: bool) -> None:
    torch.manual_seed(0)
    net = _Residual(skip_read_again).eval()
    x = torch.randn(1, 16, 6, 8, 20)
    gm = _graph(net, x)
    before = tucker_fx.analyze(gm, x)
    assert FusePointwiseChains()(gm).modified
    adds = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), PointwiseAdd)]
    assert len(adds) == 1 and adds[0].inplace is False  # `core` (and maybe the product) read skip too
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-4)
    after = tucker_fx.analyze(gm, x)
    assert after.unsupported == [] and after.total_flops == before.total_flops


@needs_native
def test_pass_writes_the_residual_into_a_buffer_only_the_add_reads() -> None:
    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv3d(4, 16, 1), nn.Conv3d(4, 16, 1)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.a(z) + nn.functional.relu(self.b(z))  # made here, read only by the add

    torch.manual_seed(0)
    net = Tail().eval()
    z = torch.randn(1, 4, 4, 6, 33)
    gm = _graph(net, z)
    assert FusePointwiseChains()(gm).modified
    adds = [m for m in gm.modules() if isinstance(m, PointwiseAdd)]
    assert len(adds) == 1 and adds[0].inplace
    with torch.no_grad():
        torch.testing.assert_close(gm(z), net(z), rtol=1e-5, atol=1e-5)


def test_pointwise_add_module_is_the_sum_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    last = PointwiseConv.from_conv(nn.Conv3d(4, 16, 1))
    z, skip = torch.randn(1, 4, 3, 5, 17), torch.randn(1, 16, 3, 5, 17)
    with torch.no_grad():
        ref = last(z) + skip
        torch.testing.assert_close(PointwiseAdd(last)(z, skip), ref, rtol=1e-5, atol=1e-5)
        s2 = skip.clone()
        out = PointwiseAdd(last, inplace=True)(z, s2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert out.data_ptr() == s2.data_ptr() or not native.available()
        monkeypatch.setitem(native._state, "lib", None)
        torch.testing.assert_close(PointwiseAdd(last)(z, skip), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="PointwiseAdd: expected a stride-1 PointwiseConv"):
        PointwiseAdd(nn.Conv3d(4, 16, 1))



@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 16), nn.GroupNorm(1, 16, affine=False), nn.InstanceNorm3d(16, affine=True)])
@pytest.mark.parametrize("how", ["eager", "grad", "disabled"])
def test_norm_act_pointwise_is_its_three_modules(norm: nn.Module, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    act, conv = nn.LeakyReLU(0.05), PointwiseConv.from_conv(nn.Conv3d(16, 4, 1))
    m = NormActPointwise(norm, act, conv)
    x = torch.randn(2, 16, 4, 5, 19) * 3 + 20  # a mean far from 0: the statistics' shifted sums
    if how == "disabled":
        monkeypatch.setitem(native._state, "lib", None)
    with torch.no_grad():
        ref = conv(act(norm(x)))
    with torch.set_grad_enabled(how == "grad"):
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="NormActPointwise: expected a GroupNorm or InstanceNorm"):
        NormActPointwise(nn.BatchNorm3d(16), act, conv)
    with pytest.raises(ValueError, match="the norm has 8 channels, the product reads 16"):
        NormActPointwise(nn.GroupNorm(2, 8), act, conv)


class _Decoder(nn.Module):
    def __init__(self, mode: str = "trilinear", align_corners: bool = False) -> None:
        super().__init__()
        self.enc, self.down = nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode, align_corners=align_corners if mode != "nearest" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        return self.up(self.down(skip)) + skip


@needs_native
@pytest.mark.parametrize("mode,align,fused", [("trilinear", False, True), ("trilinear", True, False),
                                              ("nearest", False, False)])
def test_pass_fuses_a_x2_trilinear_upsampling_and_its_skip_add(mode: str, align: bool, fused: bool) -> None:
    from tucker_fx.passes.resample import UseSeparableInterpolate
    torch.manual_seed(0)
    net = _Decoder(mode, align).eval()
    x = torch.randn(1, 4, 6, 8, 18)
    gm = torch.fx.symbolic_trace(net)
    propagate_shapes(gm, (x,))
    UseSeparableInterpolate()(gm)
    before = tucker_fx.analyze(gm, x)
    FusePointwiseChains()(gm)
    kinds = {type(m).__name__ for m in gm.modules()}
    assert ("UpsampleAdd" in kinds) == fused
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)
    after = tucker_fx.analyze(gm, x)
    assert after.unsupported == before.unsupported and after.total_flops == before.total_flops


@needs_native
def test_native_upsampling_is_aten_s_and_upsample_add_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F
    from tucker_fx.kernels.resample import SeparableInterpolate
    torch.manual_seed(0)
    for shape in [(2, 3, 1, 1, 1), (1, 5, 3, 4, 17), (1, 2, 8, 8, 8)]:
        x = torch.randn(shape)
        ref = F.interpolate(x, scale_factor=2, mode="trilinear")
        torch.testing.assert_close(native.upsample2x_trilinear(x), ref, rtol=1e-6, atol=1e-6)
        by_size = SeparableInterpolate(size=tuple(2 * s for s in shape[2:]), mode="trilinear")
        torch.testing.assert_close(by_size(x), ref, rtol=1e-6, atol=1e-6)
    up = SeparableInterpolate(scale_factor=2, mode="trilinear")
    x, skip = torch.randn(1, 4, 3, 5, 9), torch.randn(1, 4, 6, 10, 18)
    want = F.interpolate(x, scale_factor=2, mode="trilinear") + skip
    s2 = skip.clone()
    torch.testing.assert_close(UpsampleAdd(up, inplace=True)(x, s2), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2, want, rtol=1e-6, atol=1e-6)  # written in place
    xg = x.clone().requires_grad_()
    UpsampleAdd(up)(xg, skip).sum().backward()  # the differentiable fallback
    assert xg.grad is not None and torch.allclose(xg.grad, torch.full_like(x, 8.0))
    monkeypatch.setitem(native._state, "lib", None)
    torch.testing.assert_close(UpsampleAdd(up)(x, skip), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="UpsampleAdd: expected a SeparableInterpolate"):
        UpsampleAdd(nn.Upsample(scale_factor=2))


def test_jit_trace_records_the_plain_ops_not_the_native_calls() -> None:
    # a ctypes call is invisible to torch.jit.trace: traced, the native path would bake its output in
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1),
                        nn.Upsample(scale_factor=2, mode="trilinear")).eval()
    x = torch.randn(1, 16, 4, 6, 8)
    r = tucker_fx.compress(net, x, config=tucker_fx.TuckerConfig(rank=0.25, only_if_cheaper=False,
                                                                 keep_original_if_faster=False, progress=False))
    with torch.no_grad():
        traced = torch.jit.trace(r.module, (x,), check_trace=False)
        other = torch.randn(1, 16, 4, 6, 8)
        torch.testing.assert_close(traced(other), r.module(other), rtol=1e-5, atol=1e-5)
