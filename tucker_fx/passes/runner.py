"""Run graph passes: each is ``gm -> PassResult(gm, modified)``; the runner lints,
recompiles and re-raises failures with the pass's name.

:func:`run_passes` runs a plain list of passes. :class:`PipelineRun` runs declared
:class:`Stage` s (see :mod:`tucker_fx.passes.pipeline` for the pipelines of ``compress`` and
``lower``): before each stage it checks the :class:`Fact` s the stage requires, re-establishes
those that can be re-established (shapes, analysis records) when an earlier pass left them
stale, and raises a :class:`PassError` naming the stage and the missing fact otherwise.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.infra.pass_base import PassResult
    >>> from tucker_fx.passes.runner import run_passes
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    >>> run_passes(gm, [lambda g: PassResult(g, False)]) is gm
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

if TYPE_CHECKING:
    from tucker_fx.config import TuckerConfig

__all__ = ["PassResult", "GraphPass", "run_passes", "PassError", "Fact", "Stage", "StageContext", "PipelineRun",
           "check_stages"]

GraphPass = Callable[[fx.GraphModule], PassResult]


class PassError(RuntimeError):
    """A graph pass failed, or a stage's precondition did not hold; the message names the pass."""


def _name(p: GraphPass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _run_one(gm: fx.GraphModule, p: GraphPass, name: Optional[str] = None) -> PassResult:
    """Run ``p``; lint and recompile if it modified the graph; failures re-raised with its name."""
    name = name or _name(p)
    try:
        result = p(gm)
    except (ValueError, TypeError, PassError):
        raise  # bad user input, or a pass's own precondition: already says what and where
    except Exception as exc:
        raise PassError(f"graph pass {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if result.modified:
        try:
            result.graph_module.graph.lint()
        except Exception as exc:
            raise PassError(f"graph pass {name!r} left an invalid graph: {exc}") from exc
        result.graph_module.recompile()
    return result


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass]) -> fx.GraphModule:
    """Apply ``passes`` in order; lint and recompile after each one that modified the graph."""
    for p in passes:
        gm = _run_one(gm, p).graph_module
    return gm


@dataclass(frozen=True)
class Fact:
    """Something a pass may need to hold of the graph before it runs.

    A fact with a ``meta_key`` holds when ``gm.meta`` has that key (a pass wrote it); one with
    ``establish`` is tracked by the runner, which calls ``establish(gm, example_inputs)`` (after
    establishing ``needs``) when a stage requires it and it does not hold. A ``transient`` fact's
    ``gm.meta`` entry is dropped when the pipeline ends (it is hand-over state between passes).

    Example:
        >>> Fact("plan", "the plan", meta_key="tucker_fx.plan").meta_key
        'tucker_fx.plan'
    """

    name: str
    what: str
    meta_key: Optional[str] = None
    establish: Optional[Callable[[fx.GraphModule, tuple], Any]] = None
    needs: tuple[str, ...] = ()
    transient: bool = False


@dataclass
class StageContext:
    """What a stage's ``build`` sees: the config, the graph it will run on, the progress display
    and one timing cache shared by every tuning pass of the run (``cache()``, ``None`` when
    ``config.tune`` is off or ``config.tuning_cache`` is ``False``)."""

    config: "TuckerConfig"
    gm: fx.GraphModule
    progress: Optional[Any] = None
    _cache: Any = field(default=None, repr=False)
    _cache_made: bool = field(default=False, repr=False)

    def cache(self) -> Optional[Any]:
        if not self._cache_made:
            self._cache_made = True
            if self.config.tune and self.config.tuning_cache is not False:
                from tucker_fx.tuning.cache import TimingCache

                self._cache = TimingCache(None if self.config.tuning_cache is True else self.config.tuning_cache)
        return self._cache

    def meta(self, key: str) -> Any:
        """``gm.meta[key]`` (the runner has checked that the stage's required facts are there)."""
        return self.gm.meta[key]


@dataclass(frozen=True)
class Stage:
    """A declared pass: ``build(ctx)`` makes the pass from the config (``None``: the config turns it
    off); ``requires`` are facts checked (or re-established) before it runs; ``provides`` facts it
    establishes; ``invalidates`` facts it leaves stale when it modifies the graph.

    Example:
        >>> from tucker_fx.passes.pool_first import PoolBeforeActivation
        >>> Stage("pool_first", lambda ctx: PoolBeforeActivation()).requires
        ()
    """

    name: str
    build: Callable[[StageContext], Optional[GraphPass]]
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()
    doc: str = ""


def check_stages(stages: Sequence[Stage], facts: Mapping[str, Fact], given: Iterable[str] = ()) -> None:
    """Raise a :class:`PassError` unless every requirement of ``stages`` is a known fact that is
    ``given``, provided by an earlier stage, or one the runner can establish.

    Example:
        >>> check_stages([Stage("s", lambda ctx: None, requires=("plan",))], {"plan": Fact("plan", "the plan")})
        Traceback (most recent call last):
        ...
        tucker_fx.passes.runner.PassError: stage 's' requires 'plan' (the plan), which nothing before it provides
    """
    have = set(given)
    for stage in stages:
        for name in stage.requires + stage.provides + stage.invalidates:
            if name not in facts:
                raise PassError(f"stage {stage.name!r}: unknown fact {name!r}; expected one of {sorted(facts)}")
        for name in stage.requires:
            fact = facts[name]
            if name not in have and fact.establish is None:
                raise PassError(f"stage {stage.name!r} requires {name!r} ({fact.what}), which nothing before it "
                                "provides")
        have |= set(stage.provides)


class PipelineRun:
    """Runs declared stages on a graph, with its config and example inputs.

    ``holds`` names the tracked facts that hold of the graph at the start (a freshly analysed
    capture has ``"shapes"`` and ``"sites"``). Calls of :meth:`run` share the run's state (which
    facts hold, the timing cache); :attr:`ran` lists the stages that ran, in order.

    Example:
        >>> import torch, torch.nn as nn
        >>> from tucker_fx import TuckerConfig
        >>> from tucker_fx.passes.pipeline import FACTS, POOL_FIRST
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
        >>> run = PipelineRun(TuckerConfig(), (torch.randn(1, 2, 4, 4),), FACTS)
        >>> gm = run.run(gm, [POOL_FIRST])
        >>> run.ran
        ['pool_before_activation']
    """

    def __init__(self, config: "TuckerConfig", example_inputs: Optional[tuple], facts: Mapping[str, Fact],
                 *, holds: Iterable[str] = (), progress: Optional[Any] = None) -> None:
        self.config = config
        self.example_inputs = example_inputs
        self.facts = dict(facts)
        self.progress = progress
        self.ran: list[str] = []
        self._holds = set(holds)
        self._stale_after: dict[str, str] = {}  # fact -> the stage that left it stale
        self._ctx: Optional[StageContext] = None

    def holds(self, gm: fx.GraphModule, name: str) -> bool:
        fact = self.facts[name]
        return fact.meta_key in gm.meta if fact.meta_key is not None else name in self._holds

    def ensure(self, gm: fx.GraphModule, name: str, *, stage: str = "the caller") -> None:
        """Make ``name`` hold of ``gm`` (establishing it if the runner can), else raise a :class:`PassError`."""
        if self.holds(gm, name):
            return
        self.refresh(gm, name, stage=stage)

    def refresh(self, gm: fx.GraphModule, name: str, *, stage: str = "the caller") -> None:
        """Establish ``name`` afresh, whether or not it holds."""
        fact = self.facts[name]
        stale = self._stale_after.get(name)
        why = f" (left stale by {stale!r})" if stale else ""
        if fact.establish is None:
            raise PassError(f"graph pass {stage!r} requires {name!r} ({fact.what}), which no earlier pass "
                            f"provided{why}")
        if self.example_inputs is None:
            raise PassError(f"graph pass {stage!r} requires {name!r} ({fact.what}){why}; expected example inputs "
                            "to establish it, got none")
        for need in fact.needs:
            self.ensure(gm, need, stage=stage)
        fact.establish(gm, self.example_inputs)
        self._holds.add(name)
        self._stale_after.pop(name, None)

    def _invalidate(self, name: str, stage: str) -> None:
        self._holds.discard(name)
        self._stale_after[name] = stage
        for other, fact in self.facts.items():  # what was built on it is stale too
            if name in fact.needs and other in self._holds:
                self._invalidate(other, stage)

    def run(self, gm: fx.GraphModule, stages: Sequence[Stage]) -> fx.GraphModule:
        """Build and run each stage that the config turns on, checking its requirements first."""
        for stage in stages:
            if self._ctx is None:
                self._ctx = StageContext(self.config, gm, self.progress)
            self._ctx.gm = gm
            for name in stage.requires:  # a plan or originals must be in gm.meta before the pass is built
                if self.facts[name].meta_key is not None:
                    self.ensure(gm, name, stage=stage.name)
            p = stage.build(self._ctx)
            if p is None:  # turned off by the config
                continue
            for name in stage.requires:
                self.ensure(gm, name, stage=stage.name)
            result = _run_one(gm, p, stage.name)
            gm = result.graph_module
            self.ran.append(stage.name)
            if result.modified:
                for name in stage.invalidates:
                    self._invalidate(name, stage.name)
            for name in stage.provides:
                fact = self.facts[name]
                if fact.meta_key is not None and fact.meta_key not in gm.meta:
                    raise PassError(f"graph pass {stage.name!r} declares it provides {name!r} but left no "
                                    f"gm.meta[{fact.meta_key!r}]")
                if fact.meta_key is None:
                    self._holds.add(name)
        for fact in self.facts.values():  # hand-over state does not outlive the pipeline
            if fact.transient and fact.meta_key is not None:
                gm.meta.pop(fact.meta_key, None)
        return gm
