"""Save a compressed model and load it back: the plan as JSON, the weights as plain tensors.

A saved model is a directory with two files:

- ``tucker_fx.json``: the format version, the plan, the config fields that shape the compressed
  graph (``fold_bn``, ``lowering``, ``merge``), a description of the original model (its
  tensors' names, shapes and dtypes, and which submodules were in training mode), the example
  inputs' shapes, and the list of weight tensors with the SHA-256 of the weights file;
- ``weights.pt``: the compressed module's ``state_dict``, written by ``torch.save`` and read
  with ``torch.load(weights_only=True)``: tensors only, no pickled code.

Nothing executable is stored: :func:`load` rebuilds the compressed graph by re-applying the plan
to a fresh instance of the original architecture (``tucker_fx.apply_plan``, no validation, the
lowering the plan records) and then loads the weights strictly. The model passed to ``load`` is
never modified; any mismatch (another architecture, another format or plan version, a truncated
or edited weights file, missing, extra or mis-shaped tensors) raises a ``ValueError`` that says
what does not match, before anything is built.

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
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from tucker_fx.api import PLAN_META_KEY, CompressionResult, apply_plan, model_signature
from tucker_fx.config import TuckerConfig
from tucker_fx.planning.plan import Plan

__all__ = ["save", "load", "FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME"]

FORMAT = "tucker_fx.compressed"
FORMAT_VERSION = 1
MANIFEST_NAME = "tucker_fx.json"
WEIGHTS_NAME = "weights.pt"
_STRUCTURAL_FIELDS = ("fold_bn", "lowering", "merge")
_LIST_AT_MOST = 8

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


def _write_atomically(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: never a half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- save ----------------------------------------------------------------------------------------

def save(result: CompressionResult, path: PathLike) -> Path:
    """Save ``result`` (from ``tucker_fx.compress`` or ``apply_plan``) to the directory ``path``.

    Writes ``tucker_fx.json`` (plan, format version, what the original model looked like) and
    ``weights.pt`` (the compressed ``state_dict``, tensors only). The directory is created if
    needed; the two files in it are replaced atomically. Returns the directory.

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
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach() for k, v in state.items()}
    requires_grad = {k: bool(p.requires_grad) for k, p in result.module.named_parameters(remove_duplicate=False)}
    _write_atomically(directory / WEIGHTS_NAME, lambda tmp: torch.save(weights, tmp))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tucker_fx_version": _package_version(),
        "torch_version": torch.__version__,
        "config": {name: getattr(result.config, name) for name in _STRUCTURAL_FIELDS},
        "source": result.source,
        "plan": result.plan.to_dict(),
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


# --- load ----------------------------------------------------------------------------------------

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
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {version!r} is not supported; expected {FORMAT_VERSION}")
    for key in ("config", "source", "plan", "weights"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"{file}: the entry {key!r} is missing or not an object")
    return manifest


def _read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    listed = manifest["weights"]
    file = directory / str(listed.get("file", WEIGHTS_NAME))
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
    problems = _differences(listed.get("tensors", {}), {k: _describe(v) for k, v in state.items()},
                            MANIFEST_NAME, WEIGHTS_NAME)
    if problems:
        raise ValueError(f"{file} does not match {MANIFEST_NAME}: " + "; ".join(problems))
    if listed.get("sha256") != _sha256(file):
        raise ValueError(f"{file}: SHA-256 differs from the one in {MANIFEST_NAME}: "
                         "the weights were changed or damaged after saving")
    return state


def _check_model(model: nn.Module, source: dict[str, Any], n_inputs: int) -> None:
    recorded_inputs = source.get("inputs", [])
    if n_inputs != len(recorded_inputs):
        raise ValueError(f"load: the model was saved with {len(recorded_inputs)} example input(s) "
                         f"{[tuple(i['shape']) for i in recorded_inputs]}, got {n_inputs}")
    here = model_signature(model, ())
    problems = _differences(source.get("tensors", {}), here["tensors"], "the saved model", "this model")
    if problems:
        raise ValueError(
            f"load: this model ({here['class']}) is not the architecture that was compressed "
            f"({source.get('class')}): " + "; ".join(problems)
        )


def load(path: PathLike, model: nn.Module, *example_inputs: Any) -> CompressionResult:
    """Rebuild the compressed model saved at ``path`` on ``model``, a fresh instance of the
    original architecture (its weights are not used and it is not modified).

    The plan is re-applied with ``tucker_fx.apply_plan`` (no validation; each layer's lowering as
    the plan records it; submodules in the training mode they had when compressed), then the saved
    weights are loaded strictly. ``example_inputs`` as for ``compress``; inputs of the shapes used
    when saving (``source.inputs`` in ``tucker_fx.json``) rebuild the same graph. Returns a
    ``CompressionResult`` with the saved plan and ``validation=None``.

    Raises ``ValueError`` naming the mismatch for another architecture, another format or plan
    version, a missing, truncated or edited file, or missing, extra or mis-shaped tensors.

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
    plan = Plan.from_dict(manifest["plan"])  # ValueError for another plan version or a bad entry
    source = manifest["source"]
    _check_model(model, source, len(example_inputs))
    state = _read_weights(directory, manifest)
    cfg = manifest["config"]
    try:
        config = TuckerConfig(**{k: cfg[k] for k in _STRUCTURAL_FIELDS}, validate=False, tune=False,
                              tuning_cache=False, progress=False, hooi_iters=0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{directory / MANIFEST_NAME}: bad 'config' entry {cfg!r}; expected the fields "
                         f"{list(_STRUCTURAL_FIELDS)} with valid values ({exc})") from exc
    base = _with_training_flags(model, source.get("training", {}))
    result = apply_plan(base, copy.deepcopy(plan), *example_inputs, config=config)
    gm = result.module
    built = {k: _describe(v) for k, v in gm.state_dict().items()}
    problems = _differences(manifest["weights"]["tensors"], built, "the saved model", "the rebuilt graph")
    if problems:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs]
        saved_shapes = [tuple(i["shape"]) for i in source.get("inputs", [])]
        raise ValueError(
            "load: re-applying the plan did not rebuild the saved structure (" + "; ".join(problems) + "). "
            f"The model was saved with example inputs of shapes {saved_shapes}, got {shapes}; "
            "pass inputs of the saved shapes"
        )
    with torch.no_grad():
        gm.load_state_dict(state, strict=True)
    recorded = manifest["weights"]["tensors"]
    for name, p in gm.named_parameters(remove_duplicate=False):
        p.requires_grad_(bool(recorded.get(name, {}).get("requires_grad", True)))
    gm.meta[PLAN_META_KEY] = plan
    result.plan, result.validation, result.source = plan, None, source
    return result


def _with_training_flags(model: nn.Module, training: dict[str, bool]) -> nn.Module:
    """``model`` itself when its submodules' train/eval flags are as recorded, else a copy set so."""
    modules = dict(model.named_modules())
    if all(modules[name].training == flag for name, flag in training.items() if name in modules):
        return model
    model = copy.deepcopy(model)
    for name, m in model.named_modules():
        if name in training:
            m.training = bool(training[name])
    return model
