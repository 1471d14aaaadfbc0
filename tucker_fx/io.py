"""Save a compressed model and load it back: the plan as JSON, the weights as plain tensors.

A saved model is a directory with two files:

- ``tucker_fx.json``: the format version, how the model was captured (``capture``:
  ``symbolic_trace`` or ``export``, as in ``result.capture``), the plan, the config fields that shape the compressed
  graph (``fold_bn``, ``lowering``, ``merge``), a description of the original model (its
  tensors' names, shapes and dtypes, and which submodules were in training mode), the example
  inputs' shapes, the compressed graph's structure (one line per node: op, target, the class and
  geometry of a called module, arguments) and the list of weight tensors with the SHA-256 of the
  weights file;
- ``weights.pt``: the compressed module's ``state_dict``, written by ``torch.save`` and read
  with ``torch.load(weights_only=True)``: tensors only, no pickled code.

Nothing executable is stored: :func:`load` rebuilds the compressed graph by re-applying the plan
to a copy of a fresh instance of the original architecture (``tucker_fx.apply_plan``, no
validation, the lowering the plan records, captured the way it was when saved: a model that
needed ``torch.export`` is exported again on the example inputs), compares what it built with what was saved, and then
loads the weights strictly. The model passed to ``load`` is never modified, and ``load`` returns
nothing on error. The manifest, the weights file and the model's tensors are checked before
anything is built (another format or plan version, a damaged or edited file, missing, extra or
mis-shaped tensors); another structure with the same tensors (another activation, say) is found
once the copy is built. Each is a ``ValueError`` that says what does not match.

Example:
    >>> import tempfile, torch, torch.nn as nn, tucker_fx
    >>> def make() -> nn.Module:
    ...     torch.manual_seed(0)
    ...     return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    >>> x = torch.randn(1, 4, 10, 10)
    >>> result = tucker_fx.compress(make(), x, config=tucker_fx.TuckerConfig(rank=0.5))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = tucker_fx.save(result, tmp.name + "/net")
    >>> sorted(p.name for p in path.iterdir())
    ['tucker_fx.json', 'weights.pt']
    >>> loaded = tucker_fx.load(path, make(), x)
    >>> torch.equal(loaded.module(x), result.module(x))
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from tucker_fx._internal.meta import PLAN_KEY
from tucker_fx.api import CompressionResult, apply_plan, model_signature
from tucker_fx.config import TuckerConfig
from tucker_fx.errors import PlanEditedWarning
from tucker_fx.planning.plan import CAPTURES, Plan, check_plan_data
from tucker_fx.planning.schema import (
    SchemaError as _Bad,
    describe as _got,
    is_int as _is_int,
    need as _need,
    require_object as _object,
)

__all__ = ["save", "load", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST_NAME", "WEIGHTS_NAME"]

FORMAT = "tucker_fx.compressed"
FORMAT_VERSION = 2
"""2 adds ``structure`` (the compressed graph, node by node); 1 files still load, without that check."""
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "tucker_fx.json"
WEIGHTS_NAME = "weights.pt"
_STRUCTURAL_FIELDS = ("fold_bn", "lowering", "merge")
_LIST_AT_MOST = 8
_SHOW_NODES = 4
# module attributes that change what a module computes without changing any tensor's shape
_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "output_padding",
             "ceil_mode", "count_include_pad", "divisor_override", "return_indices", "output_size",
             "normalized_shape", "num_groups", "affine", "track_running_stats", "negative_slope", "alpha",
             "beta", "threshold", "lambd", "min_val", "max_val", "value", "approximate", "dim", "start_dim",
             "end_dim", "scale_factor", "mode", "align_corners", "upscale_factor", "downscale_factor")

PathLike = Union[str, "os.PathLike[str]"]


# --- helpers -------------------------------------------------------------------------------------

def _describe(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def _short(names: Any) -> str:
    names = sorted(names)
    more = f" and {len(names) - _LIST_AT_MOST} more" if len(names) > _LIST_AT_MOST else ""
    return ", ".join(repr(n) for n in names[:_LIST_AT_MOST]) + more


def _differences(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]],
                 expected_name: str, got_name: str) -> list[str]:
    """Missing, extra and mis-shaped/mis-typed tensors between two ``name -> {shape, dtype}`` maps."""
    problems = []
    missing = set(expected) - set(got)
    extra = set(got) - set(expected)
    if missing:
        problems.append(f"{got_name} lacks {len(missing)} tensor(s) that {expected_name} has: {_short(missing)}")
    if extra:
        problems.append(f"{got_name} has {len(extra)} tensor(s) that {expected_name} does not: {_short(extra)}")
    for name in sorted(set(expected) & set(got)):
        e, g = expected[name], got[name]
        if list(e["shape"]) != list(g["shape"]):
            problems.append(f"{name!r} has shape {tuple(g['shape'])} in {got_name}, "
                            f"{tuple(e['shape'])} in {expected_name}")
        elif e["dtype"] != g["dtype"]:
            problems.append(f"{name!r} has dtype {g['dtype']} in {got_name}, {e['dtype']} in {expected_name}")
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same directory, then rename: never a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- the structure of a compressed graph ---------------------------------------------------------

def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def _module_text(m: nn.Module) -> str:
    """``Conv2d(kernel_size=(3, 3), stride=(1, 1), ...)``: the class and its shape-free geometry."""
    attrs = [f"{a}={getattr(m, a)!r}" for a in _GEOMETRY if a in vars(m) and _plain(getattr(m, a))]
    return f"{type(m).__name__}({', '.join(attrs)})"


def _target_text(target: Any) -> str:
    try:
        return fx.node._get_qualified_name(target)
    except Exception:  # not a plain function: its name, without a memory address
        return re.sub(r" at 0x[0-9a-f]+", "", getattr(target, "__name__", repr(target)))


def _structure(gm: fx.GraphModule) -> list[str]:
    """One line per node: op, target (with a called module's class and geometry) and arguments,
    the nodes numbered by position (names are not compared: they depend on how a node was built)."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(arg(v) for v in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {arg(v)}" for k, v in a.items()) + "}"
        return re.sub(r" at 0x[0-9a-f]+", "", repr(a))

    lines = []
    for n in gm.graph.nodes:
        args = ", ".join([arg(a) for a in n.args] + [f"{k}={arg(v)}" for k, v in n.kwargs.items()])
        if n.op == "placeholder":
            lines.append("placeholder")
        elif n.op == "get_attr":
            lines.append(f"get_attr {n.target}")
        elif n.op == "call_module":
            lines.append(f"call_module {n.target} {_module_text(gm.get_submodule(str(n.target)))}({args})")
        elif n.op == "call_function":
            lines.append(f"call_function {_target_text(n.target)}({args})")
        else:  # call_method, output
            lines.append(f"{n.op} {n.target}({args})" if n.op == "call_method" else f"output({args})")
    return lines


def _structure_differences(saved: list[str], built: list[str]) -> list[str]:
    """The first few nodes where the rebuilt graph departs from the saved one."""
    problems = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, saved, built, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            here = built[j1 + k] if j1 + k < j2 else None
            there = saved[i1 + k] if i1 + k < i2 else None
            if here is not None and there is not None:
                problems.append(f"node {j1 + k} is `{here}` here, `{there}` in the saved model")
            elif here is not None:
                problems.append(f"node {j1 + k} `{here}` is not in the saved model")
            else:
                problems.append(f"the saved model's node {i1 + k} `{there}` is missing here")
    if len(problems) > _SHOW_NODES:
        problems = problems[:_SHOW_NODES] + [f"{len(problems) - _SHOW_NODES} more node difference(s)"]
    return problems


# --- save ----------------------------------------------------------------------------------------

def save(result: CompressionResult, path: PathLike) -> Path:
    """Save ``result`` (from ``tucker_fx.compress`` or ``apply_plan``) to the directory ``path``.

    Writes ``weights.pt`` (the compressed ``state_dict``, tensors only), then ``tucker_fx.json``
    (plan, format version, what the original model and the compressed graph looked like). The
    directory is created if needed. Each file is replaced atomically (written to a temporary file,
    then renamed), the pair is not: if saving over an older save stops between the two, the
    directory holds the new weights with the old manifest, which ``load`` refuses (SHA-256
    mismatch) until ``save`` is run again. Returns the directory.

    The plan written is the one ``result.module`` was built with (``result.built_plan()``): if
    ``result.plan`` was edited since, a :class:`~tucker_fx.errors.PlanEditedWarning` lists the
    edits (apply them with ``tucker_fx.apply_plan(model, result.plan, x)`` and save that result).

    Example:
        >>> import tempfile, torch, torch.nn as nn, tucker_fx
        >>> r = tucker_fx.compress(nn.Linear(16, 16), torch.randn(2, 16),
        ...                        config=tucker_fx.TuckerConfig(rank=2))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tucker_fx.save(r, tmp).joinpath("tucker_fx.json").is_file()
        True
    """
    if not isinstance(result, CompressionResult):
        raise TypeError(f"save expects a tucker_fx.CompressionResult, got {type(result).__name__}")
    if result.source is None or result.config is None:
        raise ValueError(
            "this CompressionResult does not record the model it came from (result.source / result.config "
            "are None); save results returned by tucker_fx.compress or tucker_fx.apply_plan"
        )
    state = result.module.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"the compressed module's state_dict holds non-tensor entries {_short(not_tensors)}; "
                         "expected tensors only")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save: expected a directory path, got the existing file {str(directory)!r}")
    structure = _structure(result.module)
    plan = result.built_plan()
    edits = result.plan_edits()
    if edits:
        warnings.warn(
            "save: result.plan was edited after it was built (" + "; ".join(edits[:_LIST_AT_MOST])
            + (f"; and {len(edits) - _LIST_AT_MOST} more" if len(edits) > _LIST_AT_MOST else "")
            + "); saving the plan result.module was built with. To use the edited plan: "
            "tucker_fx.apply_plan(model, result.plan, x), then save that result",
            PlanEditedWarning, stacklevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach() for k, v in state.items()}
    requires_grad = {k: bool(p.requires_grad) for k, p in result.module.named_parameters(remove_duplicate=False)}
    _write_atomically(directory / WEIGHTS_NAME, lambda tmp: torch.save(weights, tmp))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tucker_fx_version": _package_version(),
        "torch_version": torch.__version__,
        "capture": result.capture,
        "config": {name: getattr(result.config, name) for name in _STRUCTURAL_FIELDS},
        "source": result.source,
        "plan": plan.to_dict(),
        "structure": {"nodes": structure},
        "weights": {
            "file": WEIGHTS_NAME,
            "sha256": _sha256(directory / WEIGHTS_NAME),
            "tensors": {k: {**_describe(v), "requires_grad": requires_grad.get(k, False)} for k, v in weights.items()},
        },
    }
    text = json.dumps(manifest, indent=2)
    _write_atomically(directory / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory


def _package_version() -> str:
    from tucker_fx import __version__

    return __version__


# --- reading and checking the manifest -----------------------------------------------------------
# The checks are tucker_fx.planning.schema's (_Bad is its SchemaError: a manifest field of the wrong
# form, to which _read_manifest adds the file name); the plan's are check_plan_data's.


def _tensor_descriptions(value: Any, where: str, extra: tuple[str, ...] = (), listed: bool = False) -> None:
    """``{name: {"shape": [int, ...], "dtype": str, *extra: bool}}`` (``listed``: a list of the entries)."""
    if listed:
        _need(isinstance(value, list), where, "a list", value)
        entries: dict[Any, Any] = dict(enumerate(value))
    else:
        entries = _object(value, where)
    for name, entry in entries.items():
        at = f"{where}[{name!r}]"
        _object(entry, at, ("shape", "dtype") + extra)
        _need(isinstance(entry["shape"], list) and all(_is_int(s) and s >= 0 for s in entry["shape"]),
              f"{at}.shape", "a list of sizes (ints >= 0)", entry["shape"])
        _need(isinstance(entry["dtype"], str), f"{at}.dtype", "a dtype name (a string)", entry["dtype"])
        for key in extra:
            _need(isinstance(entry[key], bool), f"{at}.{key}", "true or false", entry[key])


def _check_manifest(manifest: dict[str, Any], version: int) -> None:
    """Every field ``load`` reads, with the form it needs: a ``_Bad`` naming the first that is not."""
    keys = ("config", "source", "plan", "weights") + (("structure",) if version >= 2 else ())
    _object(manifest, "the manifest", keys)
    config = _object(manifest["config"], "config", _STRUCTURAL_FIELDS)
    for key in ("fold_bn", "merge"):
        _need(isinstance(config[key], bool), f"config.{key}", "true or false", config[key])
    _need(isinstance(config["lowering"], str), "config.lowering", "a string", config["lowering"])

    source = _object(manifest["source"], "source", ("class", "tensors", "training", "inputs"))
    _need(isinstance(source["class"], str), "source.class", "a class name (a string)", source["class"])
    _tensor_descriptions(source["tensors"], "source.tensors")
    training = _object(source["training"], "source.training")
    for name, flag in training.items():
        _need(isinstance(flag, bool), f"source.training[{name!r}]", "true or false", flag)
    _tensor_descriptions(source["inputs"], "source.inputs", listed=True)

    plan = _object(manifest["plan"], "plan")
    try:
        check_plan_data(plan)
    except _Bad as exc:  # the same message as Plan.load gives, and where it is
        raise _Bad(f"the entry 'plan': {exc}") from None
    capture = manifest.get("capture")
    _need(capture is None or capture in CAPTURES, "capture", f"one of {list(CAPTURES)} or null", capture)

    weights = _object(manifest["weights"], "weights", ("file", "sha256", "tensors"))
    file = weights["file"]
    _need(isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file
          and "/" not in file and "\\" not in file, "weights.file",
          "a file name in the save directory (no directory part, no '..')", file)
    sha = weights["sha256"]
    _need(isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None, "weights.sha256",
          "64 hexadecimal digits", sha)
    _tensor_descriptions(weights["tensors"], "weights.tensors", ("requires_grad",))

    if version >= 2:
        structure = _object(manifest["structure"], "structure", ("nodes",))
        nodes = structure["nodes"]
        _need(isinstance(nodes, list) and all(isinstance(n, str) for n in nodes), "structure.nodes",
              "a list of strings", nodes)


def _read_manifest(directory: Path) -> dict[str, Any]:
    file = directory / MANIFEST_NAME
    if not directory.is_dir() or not file.is_file():
        raise ValueError(
            f"no saved tucker_fx model at {str(directory)!r}: expected a directory written by "
            f"tucker_fx.save, holding {MANIFEST_NAME} and {WEIGHTS_NAME}"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON, the file is truncated or damaged ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a tucker_fx save file (expected \"format\": {FORMAT!r})")
    version = manifest.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ValueError(f"{file}: format version {version!r} is not supported; expected one of "
                         f"{list(READABLE_VERSIONS)} (the file says it was written by tucker_fx "
                         f"{manifest.get('tucker_fx_version')!r}; this is {_package_version()!r})")
    try:
        _check_manifest(manifest, version)
    except _Bad as exc:
        raise ValueError(f"{file}: {exc} (the file was edited or damaged)") from None
    return manifest


def _read_plan(file: Path, data: dict[str, Any]) -> Plan:
    try:
        return Plan.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # another plan version, a bad entry
        raise ValueError(f"{file}: the entry 'plan': {exc}") from exc


def _read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    listed = manifest["weights"]
    file = directory / listed["file"]
    if not file.is_file():
        raise ValueError(f"{file}: the weights file is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, or a pickle that is not plain tensors
        raise ValueError(f"{file}: cannot read the weights (truncated, damaged, or not written by "
                         f"tucker_fx.save): {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{file}: expected a dict of tensor name -> tensor, got {type(state).__name__}")
    problems = _differences(listed["tensors"], {k: _describe(v) for k, v in state.items()},
                            MANIFEST_NAME, file.name)
    if problems:
        raise ValueError(f"{file} does not match {MANIFEST_NAME}: " + "; ".join(problems))
    if listed["sha256"] != _sha256(file):
        raise ValueError(f"{file}: SHA-256 differs from the one in {MANIFEST_NAME}: "
                         "the weights were changed or damaged after saving")
    return state


# --- load ----------------------------------------------------------------------------------------

def _check_model(model: nn.Module, source: dict[str, Any], n_inputs: int) -> None:
    recorded_inputs = source["inputs"]
    if n_inputs != len(recorded_inputs):
        raise ValueError(f"load: the model was saved with {len(recorded_inputs)} example input(s) "
                         f"{[tuple(i['shape']) for i in recorded_inputs]}, got {n_inputs}")
    here = model_signature(model, ())
    problems = _differences(source["tensors"], here["tensors"], "the saved model", "this model")
    if problems:
        raise ValueError(
            f"load: this model ({here['class']}) is not the architecture that was compressed "
            f"({source['class']}): " + "; ".join(problems)
        )


def _unusable(t: torch.Tensor) -> bool:
    """No values the planner can read: on the meta device, or NaN/Inf."""
    return t.is_meta or ((t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()))


def _base_model(model: nn.Module, training: dict[str, bool], example_inputs: tuple) -> nn.Module:
    """What the plan is re-applied to: ``model`` itself, or a copy with the recorded train/eval
    flags and zeros in place of meta or NaN/Inf saved tensors (their values are replaced by the
    saved ones; the planner refuses to read such weights)."""
    for qualname, m in model.named_modules():
        for name in m._non_persistent_buffers_set:
            b = m._buffers.get(name)
            if b is not None and b.is_meta:
                raise ValueError(
                    f"load: the buffer {(qualname + '.' if qualname else '') + name!r} is on the meta device and "
                    "is not saved (persistent=False), so its values must come from the model you pass; "
                    "expected real values there"
                )
    modules = dict(model.named_modules())
    flags_differ = any(modules[name].training != flag for name, flag in training.items() if name in modules)
    stand_in = any(_unusable(t) for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor))
    if not flags_differ and not stand_in:
        return model
    base = copy.deepcopy(model)
    for name, m in base.named_modules():
        if name in training:
            m.training = training[name]
    if stand_in:
        device = next((a.device for a in tree_flatten(example_inputs)[0]
                       if isinstance(a, torch.Tensor) and not a.is_meta), torch.device("cpu"))
        done: dict[int, torch.Tensor] = {}  # tied tensors stay tied
        for m in base.modules():
            for store, skip in ((m._parameters, set()), (m._buffers, m._non_persistent_buffers_set)):
                for name, t in list(store.items()):
                    if t is None or name in skip or not _unusable(t):
                        continue
                    if id(t) not in done:
                        zeros = torch.zeros(t.shape, dtype=t.dtype, device=device if t.is_meta else t.device)
                        done[id(t)] = nn.Parameter(zeros, t.requires_grad) if isinstance(t, nn.Parameter) else zeros
                    store[name] = done[id(t)]
    return base


def _rebuild(base: nn.Module, plan: Plan, example_inputs: tuple, config: TuckerConfig,
             file: Path) -> CompressionResult:
    try:
        return apply_plan(base, copy.deepcopy(plan), *example_inputs, config=config)
    except (ValueError, TypeError):
        raise  # already says what and where
    except Exception as exc:  # a pass failed on what the manifest says
        raise ValueError(f"load: re-applying the plan of {file} to this model failed: {type(exc).__name__}: {exc} "
                         f"(an edited {file.name}, another architecture than the one compressed, or a failure "
                         "inside tucker_fx: the original error is chained below)") from exc


def load(path: PathLike, model: nn.Module, *example_inputs: Any) -> CompressionResult:
    """Rebuild the compressed model saved at ``path`` on ``model``, a fresh instance of the
    original architecture (it is not modified, and its saved tensors' values are not used: they
    may be uninitialised, NaN, or on the meta device; a meta model gives a module on the inputs'
    device, else the CPU).

    The plan is re-applied with ``tucker_fx.apply_plan`` (no validation; each layer's lowering as
    the plan records it; submodules in the training mode they had when compressed), the rebuilt
    graph is compared node by node with the saved one, then the saved weights are loaded
    strictly. ``example_inputs`` as for ``compress``; inputs of the shapes used when saving
    (``source.inputs`` in ``tucker_fx.json``) rebuild the same graph. The model is captured as
    it was when compressed (``capture`` in ``tucker_fx.json``): one that needed ``torch.export``
    is exported again, on these inputs; pass the same architecture as a plain ``nn.Module`` (or,
    for a result of ``compress(ep)``, ``ep.module()``). Returns a
    ``CompressionResult`` with the saved plan and ``validation=None``.

    Raises ``ValueError`` naming the mismatch for another architecture (other tensors, or the same
    tensors in another graph), another format or plan version, a missing, truncated or edited
    file, or missing, extra or mis-shaped tensors.

    Example:
        >>> import tempfile, torch, torch.nn as nn, tucker_fx
        >>> x = torch.randn(2, 16)
        >>> r = tucker_fx.compress(nn.Linear(16, 16), x, config=tucker_fx.TuckerConfig(rank=2))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = tucker_fx.save(r, tmp.name)
        >>> torch.equal(tucker_fx.load(path, nn.Linear(16, 16), x).module(x), r.module(x))
        True
        >>> tucker_fx.load(path, nn.Linear(16, 8), x)
        Traceback (most recent call last):
        ...
        ValueError: load: this model (Linear) is not the architecture that was compressed (Linear): 'bias' has ...
        >>> tmp.cleanup()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load expects the original architecture as a torch.nn.Module, got {type(model).__name__}")
    directory = Path(path)
    manifest = _read_manifest(directory)
    file = directory / MANIFEST_NAME
    plan = _read_plan(file, manifest["plan"])
    if plan.capture is None and manifest.get("capture") is not None:
        plan.capture = manifest["capture"]
    source = manifest["source"]
    _check_model(model, source, len(example_inputs))
    state = _read_weights(directory, manifest)
    cfg = manifest["config"]
    try:
        config = TuckerConfig(**{k: cfg[k] for k in _STRUCTURAL_FIELDS}, validate=False, speed_check=False, tune=False,
                              tuning_cache=False, progress=False, hooi_iters=0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: bad 'config' entry {cfg!r}; expected the fields "
                         f"{list(_STRUCTURAL_FIELDS)} with valid values ({exc})") from exc
    base = _base_model(model, source["training"], example_inputs)
    result = _rebuild(base, plan, example_inputs, config, file)
    gm = result.module
    _check_rebuilt(gm, manifest, type(model).__name__, example_inputs)
    with torch.no_grad():
        gm.load_state_dict(state, strict=True)
    recorded = manifest["weights"]["tensors"]
    for name, p in gm.named_parameters(remove_duplicate=False):
        p.requires_grad_(recorded[name]["requires_grad"] if name in recorded else True)
    gm.meta[PLAN_KEY] = plan
    result.plan, result.validation, result.source = plan, None, source
    result.capture = plan.capture
    result.keep_plan()
    return result


def _check_rebuilt(gm: fx.GraphModule, manifest: dict[str, Any], model_class: str, example_inputs: tuple) -> None:
    """The rebuilt graph has the saved tensors and (format 2) the saved nodes, or a ValueError
    that lists the differences and their likely causes."""
    source = manifest["source"]
    built = {k: _describe(v) for k, v in gm.state_dict().items()}
    problems = _differences(manifest["weights"]["tensors"], built, "the saved model", "the rebuilt graph")
    graph_problems = _structure_differences(manifest["structure"]["nodes"], _structure(gm)) \
        if "structure" in manifest else []
    if not problems and not graph_problems:
        return
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs]
    saved_shapes = [tuple(i["shape"]) for i in source["inputs"]]
    causes = []
    if shapes != saved_shapes:
        causes.append(f"the model was saved with example inputs of shapes {saved_shapes}, got {shapes}: "
                      "pass inputs of the saved shapes")
    if graph_problems:
        causes.append(f"this model ({model_class}) is not the architecture that was compressed "
                      f"({source['class']})")
    saved_by = manifest.get("tucker_fx_version")
    if saved_by != _package_version():
        causes.append(f"the files were written by tucker_fx {saved_by!r}, this is {_package_version()!r}")
    causes.append(f"{MANIFEST_NAME} was edited (its 'config' or 'plan')")
    raise ValueError("load: re-applying the plan did not rebuild the saved structure ("
                     + "; ".join(problems + graph_problems) + "). Possible causes: " + "; or ".join(causes))
