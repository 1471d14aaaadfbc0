"""Shape propagation without compute: every node gets ``node.meta["tensor_meta"]``.

The graph runs under ``FakeTensorMode`` on a fake deep copy of the module, so a full-size
video input costs milliseconds and nothing of the real model runs (a training-mode
BatchNorm's counters, for one, stay as they were).

Example:
    >>> import torch, torch.nn as nn
    >>> from tucker_fx.analysis.shapes import propagate_shapes
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv3d(4, 6, 3)))
    >>> propagate_shapes(gm, (torch.empty(1, 4, 28, 120, 160),))
    >>> tuple([n for n in gm.graph.nodes][1].meta["tensor_meta"].shape)
    (1, 6, 26, 118, 158)
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from tucker_fx.errors import ShapePropagationError

__all__ = ["propagate_shapes", "shape_of"]


def shape_of(arg: Any) -> tuple[int, ...] | None:
    """The propagated shape of a node argument, or ``None`` if it is not a tensor."""
    if isinstance(arg, fx.Node):
        tm = arg.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
    if isinstance(arg, torch.Tensor):
        return tuple(arg.shape)
    return None


def _describe(arg: Any) -> str:
    def one(a: Any) -> str:
        s = shape_of(a)
        if s is not None:
            return f"{a.name if isinstance(a, fx.Node) else 'tensor'}: {list(s)}"
        return repr(a) if not isinstance(a, fx.Node) else a.name
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(one(a) for a in arg) + "]"
    return one(arg)


class _FakePropagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, fake_module: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(fake_module, garbage_collect_values=True)
        self.extra_traceback = False  # our message names the node already; no "While executing" appendix
        self._mode = mode
        self._real_nodes = {n.name: n for n in gm.graph.nodes}
        self._real_gm = gm

    def run_node(self, n: fx.Node) -> Any:
        real = self._real_nodes[n.name]
        try:
            try:
                with self._mode:
                    result = super().run_node(n)
            except DataDependentOutputException:
                if n.op != "call_module":
                    raise
                result = self._run_for_real(n)
        except Exception as exc:
            inputs = ", ".join(_describe(a) for a in real.args)
            raise ShapePropagationError(
                f"shape propagation failed at node {real.name!r} ({real.format_node()}); "
                f"its inputs: {inputs or 'none'}; torch said: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
            ) from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            real.meta["tensor_meta"] = meta
        else:
            real.meta.pop("tensor_meta", None)
        return result


    def _run_for_real(self, n: fx.Node) -> Any:
        """A leaf module whose control flow reads values: run a copy of it on zeros."""
        real_module = copy.deepcopy(self._real_gm.get_submodule(str(n.target)))
        args, kwargs = self.fetch_args_kwargs_from_env(n)

        def zeros(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                return torch.zeros(t.shape, dtype=t.dtype, device="cpu" if t.is_meta else t.device)
            return t

        with torch.no_grad():
            out = real_module(*map_aggregate(args, zeros), **map_aggregate(kwargs, zeros))
        return map_aggregate(out, lambda t: self._mode.from_tensor(t) if isinstance(t, torch.Tensor) else t)


def _fake_copy(gm: fx.GraphModule, mode: FakeTensorMode, on_meta: bool) -> fx.GraphModule:
    """A deep copy of ``gm`` whose parameters and buffers are fake tensors (no data copied).

    With ``on_meta`` they are faked on the meta device, to meet meta example inputs.
    """
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        fake = mode.from_tensor(t.detach().to("meta") if on_meta else t)
        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
    for name, value in vars(gm).items():  # plain tensor attributes read by get_attr
        if isinstance(value, torch.Tensor) and id(value) not in memo:
            memo[id(value)] = mode.from_tensor(value.to("meta") if on_meta else value)
    fake = copy.deepcopy(gm, memo)
    for m in fake.modules():  # user hooks must not run on fake tensors
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
                      m._forward_pre_hooks_with_kwargs, m._forward_hooks_always_called):
            hooks.clear()
    return fake


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["tensor_meta"]`` on every node of ``gm`` from ``example_inputs``.

    Raises :class:`~tucker_fx.errors.ShapePropagationError` naming the failing node and the
    shapes it received when the inputs do not fit the model.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders with defaults have args
    if not (len(required) <= len(example_inputs) <= len(placeholders)):
        names = ", ".join(n.name for n in placeholders)
        raise ShapePropagationError(
            f"the model takes {len(placeholders)} input(s) ({names}), "
            f"got {len(example_inputs)} example input(s)"
        )
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in example_inputs)
    fake_module = _fake_copy(gm, mode, on_meta)
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in example_inputs]
    _FakePropagator(gm, fake_module, mode).run(*fake_args)
