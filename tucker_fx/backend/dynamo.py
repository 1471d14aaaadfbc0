"""``torch.compile(model, backend="tucker")``: the whole pipeline on Dynamo's graphs.

Dynamo inlines modules: a conv arrives as ``torch.conv3d(x, w, b, ...)`` with ``w`` a
placeholder whose real value is in ``example_inputs``. The backend lifts every placeholder that
Dynamo bound to a module's parameter or buffer (from the compiled module or through a global)
into an attribute of a fresh GraphModule, named by its qualified path (``layer1.0.conv1.weight``),
and so too plain tensor attributes that a layer uses as its weight. The graph then looks like any
traced graph with functional convs on ``get_attr`` weights; layers are found by
:func:`tucker_fx.analysis.sites.site_of`, and the same analysis, planning, rewrite and lowering
passes run on it; per-layer overrides use the same qualified names (``layer1.0.conv1``). A layer
whose weight is computed in ``forward`` or is a real input stays as it is, with the reason in the
plan. Dynamic sizes (``SymInt`` inputs) are compressed and validated at their hint and stay
inputs. The result goes to ``inner``: inductor (default), ``"eager"`` or ``"aot_eager"``.

Dynamo reuses one graph for every instance of a module class (repeated blocks whose ``forward``
has a graph break, two models of one class compiled in one process), passing each instance's
parameters as the graph's inputs. So the compressed graph is a *variant* keyed on the lifted
tensors actually passed (by identity; a 0-d number by value): each new set of weights is
compressed once (``on_report`` is called for it) and compiled by ``inner``, then reused. A variant
is dropped when one of its tensors is freed (it holds them weakly); more than ``max_variants``
(default 64) live sets for one graph raise a ``RuntimeError``. A lifted tensor changed in place
since its variant was compressed (its ``_version`` moved: ``load_state_dict``, ``param.mul_``)
gets the variant compressed again, with a ``RuntimeWarning``; changes through ``.data`` do not
move the version and are not seen: ``torch._dynamo.reset()`` after them. Training through this backend is not supported (no
gradient reaches the parameters): to fine-tune, ``tucker_fx.compress`` the model and train the
result. Parameters reached through ``__dict__`` (a module with its own ``__getattr__``, as
diffusers' ``ModelMixin``) are named as ``compress`` names them.

Example:
    >>> import torch, torch.nn as nn
    >>> import torch._dynamo
    >>> torch._dynamo.reset()
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    >>> reports = []
    >>> fast = torch.compile(net, backend="tucker", options={"rank": 1.0, "only_if_cheaper": False,
    ...                                                        "inner": "eager", "on_report": reports.append})
    >>> x = torch.randn(1, 8, 12, 12)
    >>> bool(torch.allclose(fast(x), net(x), atol=1e-4)), [e.name for e in reports[0].plan.applied]
    (True, ['0', '2'])
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from tucker_fx.analysis.shapes import propagate_shapes
from tucker_fx.analysis.sites import Site, site_of
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import ShapePropagationError

__all__ = ["tucker_backend", "BACKEND_OPTIONS", "DEFAULT_MAX_VARIANTS", "lift_parameters", "concrete_inputs"]

BACKEND_OPTIONS = ("inner", "on_report", "max_variants")
DEFAULT_MAX_VARIANTS = 64
_INNERS = ("inductor", "eager", "aot_eager")
_ROOT = re.compile(r"^(L|G)\['([^']+)'\]")
# ``._parameters['w']`` and, on a module with its own ``__getattr__`` (diffusers' ModelMixin), the
# spelling Dynamo uses there: ``.__dict__['_parameters']['w']``; likewise for modules and attributes
_STATE_PART = re.compile(r"\.(?:_parameters|_buffers|__dict__\['_parameters'\]|__dict__\['_buffers'\])\['([^']+)'\]")
_MODULE_PART = re.compile(r"\.(?:_modules|__dict__\['_modules'\])\['([^']+)'\]")
_DICT_ATTR_PART = re.compile(r"\.__dict__\['([^']+)'\]")
_ATTR_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_ITEM_PART = re.compile(r"\[(\d+)\]|\['([^']+)'\]")


def _parse_source(source_name: str) -> Optional[tuple[str, bool]]:
    """``(qualified name, is_state)`` for a source that is a global or an attribute path from a
    local (``L['self']._modules['stem']._parameters['weight']`` -> ``("stem.weight", True)``,
    ``L['self'].w`` -> ``("w", False)``), else ``None``: an input (``L['x']``), or an item of one
    (``L['xs'][0]``) unless it leads to a parameter or buffer. A local root is dropped (it is the
    compiled module or function); a global root is the first name part (``G['model']...`` ->
    ``model.stem.weight``, ``G['nets']['unet'].w`` -> ``nets.unet.w``)."""
    root = _ROOT.match(source_name)
    if root is None:
        return None
    parts = [root.group(2)] if root.group(1) == "G" else []
    pos, rest, state, indexed = 0, source_name[root.end():], False, False
    while pos < len(rest):
        for pattern in (_STATE_PART, _MODULE_PART, _DICT_ATTR_PART, _ATTR_PART, _ITEM_PART):
            m = pattern.match(rest, pos)
            if m is not None:
                state |= pattern is _STATE_PART
                indexed |= pattern is _ITEM_PART
                parts.append(next(g for g in m.groups() if g is not None))
                pos = m.end()
                break
        else:
            return None
    if root.group(1) == "L" and (not rest or (indexed and not state)):  # an input, or an item of one
        return None
    return ".".join(parts), state


def _qualified_name(source_name: str) -> Optional[str]:
    """The qualified name of a parameter or buffer source
    (``L['self']._modules['stem']._parameters['weight']`` -> ``stem.weight``), else ``None``."""
    parsed = _parse_source(source_name)
    return parsed[0] if parsed is not None and parsed[1] else None


def concrete_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """``example_inputs`` with each ``SymInt``/``SymFloat``/``SymBool`` (what Dynamo passes for a
    dynamic size) replaced by its hint, the value of the call being compiled."""
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

    out: list[Any] = []
    for i, value in enumerate(example_inputs):
        if isinstance(value, (torch.SymInt, torch.SymBool)):
            value = guarding_hint_or_throw(value)
        elif isinstance(value, torch.SymFloat):
            hint = value.node.hint
            if hint is None:
                raise ValueError(f"example input {i}: expected a SymFloat with a hint, got {value!r} without one")
            value = float(hint)
        out.append(value)
    return out


def _source_name(node: fx.Node) -> Optional[str]:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


def _set_nested(root: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Register ``value`` at the dotted ``name`` under ``root``; False if the name is taken."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, nn.Module):
            return False
    if hasattr(owner, leaf):
        return False
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)
    return True


def lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    also: frozenset[int] = frozenset()) -> tuple[fx.GraphModule, list[int]]:
    """A new GraphModule whose module-bound placeholders are attributes; the indices of the
    placeholders that remain inputs.

    Lifted: every parameter or buffer (``..._parameters[...]``/``..._buffers[...]`` sources,
    reached from a local or a global), the placeholders of index in ``also`` whose source is a
    global or an attribute path (plain tensor attributes used as weights), and attributes that
    Dynamo passes as 0-d tensors under ``dynamic=True`` (a norm's ``eps``, ``momentum``): their
    ``.item()`` becomes the number, read at compile time like the weights.
    """
    return _lift(gm, example_inputs, also, _placeholder_sources(gm))


def _placeholder_sources(gm: fx.GraphModule) -> list[tuple[Optional[str], bool]]:
    """``(source name, passed as a tensor)`` of each placeholder, read from Dynamo's ``grapharg``
    (Dynamo drops that meta once the backend has returned: keep this to lift again later)."""
    return [(_source_name(n), bool(getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False)))
            for n in gm.graph.nodes if n.op == "placeholder"]


def _lift(gm: fx.GraphModule, example_inputs: Sequence[Any], also: frozenset[int],
          sources: Sequence[tuple[Optional[str], bool]]) -> tuple[fx.GraphModule, list[int]]:
    """:func:`lift_parameters` with the placeholders' sources given."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    scalars: dict[fx.Node, Any] = {}
    kept: list[int] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        source, as_tensor = sources[i]
        parsed = _parse_source(source) if source is not None else None
        if isinstance(value, torch.Tensor) and parsed is not None:
            name, state = parsed
            attribute = _ROOT.sub("", source, count=1) != ""  # not a bare global
            if as_tensor and value.dim() == 0 and attribute:
                scalars[node] = value.item()
            if state or i in also or node in scalars:
                tensor = value if isinstance(value, nn.Parameter) else value.detach()
                if _set_nested(root, name, tensor):
                    env[node] = graph.get_attr(name)
                    continue
        scalars.pop(node, None)
        env[node] = graph.placeholder(node.target)
        env[node].meta.update(node.meta)
        kept.append(i)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if (node.op == "call_method" and node.target == "item" and len(node.args) == 1
                and node.args[0] in scalars):
            env[node] = scalars[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.eliminate_dead_code(lambda n: n.op != "get_attr")
    return fx.GraphModule(root, graph, class_name="TuckerDynamoGraph"), kept


def _split_options(options: dict[str, Any]) -> tuple[TuckerConfig, str, Optional[Callable[[Any], None]], int]:
    allowed = set(TuckerConfig.field_names()) | set(BACKEND_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for backend='tucker'; expected TuckerConfig fields "
            f"{sorted(TuckerConfig.field_names())} or {list(BACKEND_OPTIONS)}"
        )
    inner = options.get("inner", "inductor")
    if inner not in _INNERS:
        raise ValueError(f"backend='tucker' option inner: expected one of {_INNERS}, got {inner!r}")
    on_report = options.get("on_report")
    if on_report is not None and not callable(on_report):
        raise ValueError(f"backend='tucker' option on_report: expected a callable, got {on_report!r}")
    if options.get("inductor"):
        raise ValueError("backend='tucker' option inductor: the compressed graph goes to `inner` "
                         "(inductor by default); expected inductor=False or no such option, got True")
    max_variants = options.get("max_variants", DEFAULT_MAX_VARIANTS)
    if isinstance(max_variants, bool) or not isinstance(max_variants, int) or max_variants < 1:
        raise ValueError(f"backend='tucker' option max_variants: expected an int >= 1, got {max_variants!r}")
    fields = {k: v for k, v in options.items() if k not in BACKEND_OPTIONS}
    fields.setdefault("progress", False)
    fields.setdefault("speed_check", False)  # per Dynamo graph, at compile time: the inner compiler decides
    return TuckerConfig(**fields), inner, on_report, max_variants


def _find_sites(lifted: fx.GraphModule, inputs: Sequence[Any]) -> list[Site]:
    try:
        propagate_shapes(lifted, inputs)
    except ShapePropagationError as exc:
        numbers = [n.name for n in lifted.graph.nodes
                   if n.op == "placeholder" and getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False)]
        if not numbers:
            raise
        raise ValueError(
            f"backend='tucker' cannot propagate shapes through this graph: {exc}. Expected Python numbers "
            f"that are module attributes; got number input(s) {numbers} that Dynamo passes as tensors under "
            "dynamic=True. Compile with dynamic=False (Dynamo then specialises the numbers), or pass them as tensors"
        ) from exc
    found = (site_of(n, lifted) for n in lifted.graph.nodes)
    return [s for s in found if s is not None]


def _version_of(tensor: torch.Tensor) -> Optional[int]:
    """``tensor._version`` (bumped by every in-place change), or ``None`` for an inference tensor."""
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _is_dynamic(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether Dynamo traced ``gm`` with a symbolic size (a ``SymInt`` input or a symbolic shape)."""
    if any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in example_inputs):
        return True
    for node in gm.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


def _compile_inner(module: fx.GraphModule, inputs: Sequence[Any], inner: str) -> Callable[..., Any]:
    """``module`` compiled by ``inner`` for ``inputs`` (inside Dynamo's compile: may hold ``SymInt``)."""
    if inner == "eager":
        return module.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(module, list(inputs))
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(module, list(inputs))


class _Variant:
    """One compressed, compiled form of a graph, for one set of lifted tensors (held weakly)."""

    __slots__ = ("refs", "versions", "compiled")

    def __init__(self, refs: tuple[Any, ...], versions: tuple[Any, ...], compiled: Callable[..., Any]) -> None:
        self.refs = refs  # weakref.ref for a tensor position, the number for a scalar position
        self.versions = versions
        self.compiled = compiled


class _TuckerGraph:
    """What the backend returns for a graph with conv/linear layers: the compressed graph for each
    set of weights that Dynamo passes to it.

    Dynamo reuses one graph for every instance of a module class (repeated blocks with a graph break,
    two models of one class): their parameters arrive as the lifted arguments. Each call looks up the
    variant compressed for exactly those tensors (by identity; a 0-d number argument by value), and
    compresses and compiles a new one on a miss. A tensor changed in place since (``_version``) gets
    its variant compressed again. Variants are dropped when one of their tensors is freed; more than
    ``max_variants`` live ones is an error.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: TuckerConfig, inner: str,
                 on_report: Optional[Callable[[Any], None]], max_variants: int,
                 also: frozenset[int], kept: list[int]) -> None:
        self._gm = gm
        self._config = config
        self._inner = inner
        self._on_report = on_report
        self._max_variants = max_variants
        self._also = also
        self._kept = kept
        self._sources = _placeholder_sources(gm)
        self._dynamic = _is_dynamic(gm, example_inputs)
        kept_set = set(kept)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        lifted = [i for i in range(len(placeholders)) if i not in kept_set]
        self._scalars = tuple(i for i in lifted if self._sources[i][1] and isinstance(example_inputs[i], torch.Tensor)
                              and example_inputs[i].dim() == 0)
        self._tensors = tuple(i for i in lifted if i not in self._scalars)
        self._variants: dict[tuple[Any, ...], _Variant] = {}
        self._last: Optional[_Variant] = None
        self.compressions = 0  # how many variants were compressed (for tests and diagnostics)

    # -- keys -------------------------------------------------------------------------------
    def _key(self, args: Sequence[Any]) -> tuple[Any, ...]:
        for i in self._tensors:
            if not isinstance(args[i], torch.Tensor):
                raise RuntimeError(
                    f"backend='tucker': argument {i} of a compiled graph was a tensor when it was compiled "
                    f"(a weight lifted into the compressed graph); got {type(args[i]).__name__}")
        return (tuple(id(args[i]) for i in self._tensors)
                + tuple(float(args[i].item()) for i in self._scalars))

    def _matches(self, variant: _Variant, args: Sequence[Any]) -> Optional[bool]:
        """True: same tensors, unchanged; False: same tensors, one changed in place; None: other tensors."""
        tensors = [args[i] for i in self._tensors]
        for ref, arg in zip(variant.refs, tensors):
            if ref() is not arg:
                return None
        for i, value in zip(self._scalars, variant.refs[len(tensors):]):
            if float(args[i].item()) != value:
                return None
        try:
            versions = tuple([t._version for t in tensors])
        except RuntimeError:  # an inference tensor among them
            versions = tuple(_version_of(t) for t in tensors)
        return versions == variant.versions

    # -- building -----------------------------------------------------------------------------
    def add(self, args: Sequence[Any], example_inputs: Optional[Sequence[Any]] = None) -> _Variant:
        """Compress and compile the variant for ``args`` (real values); ``example_inputs`` are
        Dynamo's (during its compile), else the variant is compiled for ``args``."""
        from tucker_fx.api import compress

        live = sum(1 for v in self._variants.values() if all(r() is not None for r in v.refs[:len(self._tensors)]))
        key = self._key(args)
        if key not in self._variants and live >= self._max_variants:
            raise RuntimeError(
                f"backend='tucker': a compiled graph was called with a {live + 1}th set of weights (module "
                f"instances sharing the graph); expected at most max_variants={self._max_variants} live sets. Pass "
                "a larger options={'max_variants': N}, or compile fewer instances of the class in one process "
                "(torch._dynamo.reset() between them)")
        try:
            lifted, kept = _lift(self._gm, args, self._also, self._sources)
            if kept != self._kept:
                raise RuntimeError(f"lifted arguments: expected inputs {self._kept} to stay inputs, got {kept}")
            inputs = [args[i] for i in kept]
            result = compress(lifted, *inputs, config=self._config)
        except Exception as exc:
            raise RuntimeError(
                f"backend='tucker': cannot compress a compiled graph for the weights it was called with "
                f"(arguments {[name for name, _ in self._sources]}): {exc}"
            ) from exc
        self.compressions += 1
        if self._on_report is not None:
            self._on_report(result)
        compressed: fx.GraphModule = result.module
        if example_inputs is not None:  # during Dynamo's compile: its inputs carry the symbolic sizes
            compiled = _compile_inner(compressed, [example_inputs[i] for i in kept], self._inner)
        elif self._inner == "eager" or not self._dynamic:
            # a static graph: Dynamo guards these shapes, so compiling for the call's values is exact
            compiled = _compile_inner(compressed, inputs, self._inner)
        else:
            # a dynamic graph: later calls may bring other sizes; Dynamo guards and recompiles this one
            compiled = torch.compile(compressed, backend=self._inner)
        variants = self._variants
        refs = tuple(weakref.ref(args[i], lambda _r, k=key: variants.pop(k, None)) for i in self._tensors)
        refs += tuple(float(args[i].item()) for i in self._scalars)
        variant = _Variant(refs, tuple(_version_of(args[i]) for i in self._tensors), compiled)
        variants[key] = variant
        return variant

    # -- calling ------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        variant = self._last
        state = self._matches(variant, args) if variant is not None else None
        if state is None:
            variant = self._variants.get(self._key(args))
            state = self._matches(variant, args) if variant is not None else None
        if not state:
            if state is False:
                warnings.warn(
                    "backend='tucker': a weight of a compiled graph was changed in place since it was compressed; "
                    "compressing it again (in-place changes through `.data` are not seen: torch._dynamo.reset() "
                    "after such changes)", RuntimeWarning, stacklevel=2)
            variant = self.add(args)
        self._last = variant
        return variant.compiled(*[args[i] for i in self._kept])


def tucker_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """The ``torch.compile`` backend. Options: TuckerConfig fields, ``inner``, ``on_report``,
    ``max_variants``."""
    options = dict(kwargs.pop("options", None) or {})
    options.update(kwargs)
    config, inner, on_report, max_variants = _split_options(options)
    concrete = concrete_inputs(example_inputs)
    lifted, kept = lift_parameters(gm, concrete)
    sites = _find_sites(lifted, [concrete[i] for i in kept])
    placeholders = [n for n in lifted.graph.nodes if n.op == "placeholder"]
    weights = {n for s in sites for n in (s.weight_node, s.bias_node) if n is not None and n.op == "placeholder"}
    also = frozenset(kept[placeholders.index(n)] for n in weights)
    if also:  # plain tensor attributes and globals used as weights: lift them too, then look again
        lifted, kept = lift_parameters(gm, concrete, also)
        sites = _find_sites(lifted, [concrete[i] for i in kept])
    if not sites:
        # nothing to compress: Dynamo's graph as it is, every weight still an input (right for every
        # module instance that shares the graph)
        return _compile_inner(gm, example_inputs, inner)
    graph = _TuckerGraph(gm, example_inputs, config, inner, on_report, max_variants, also, kept)
    graph._last = graph.add(concrete, example_inputs)
    return graph
