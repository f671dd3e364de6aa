"""Load a task from ``model.py[:factory]`` or a built-in example (the contract of DESIGN §7)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from lowmem.examples import EXAMPLES
from lowmem.probe import Task, TaskError

REQUIRED = ("build_model", "get_batch", "loss_fn")
OPTIONAL = ("build_optimizer", "get_val_batch")
DEFAULT_KEYS = {"steps": int, "lr": float, "every": int}


class UsageError(ValueError):
    """The command line itself is wrong (exit code 2)."""


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, [c for c in candidates if not c.startswith("__")], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_example(name: str) -> Task:
    if name not in EXAMPLES:
        raise UsageError(f"unknown example {name!r}; built-in examples: {', '.join(EXAMPLES)}.{_did_you_mean(name, EXAMPLES)}")
    module = importlib.import_module(EXAMPLES[name])
    return _task_from(module, f"example {name!r}")


def load_task(target: str) -> Task:
    """Import ``model.py`` (not as ``__main__``) and read the contract from it or its factory."""
    path_text, _, factory = target.partition(":")
    path = Path(path_text)
    if not path.exists():
        hint = _did_you_mean(path.name, [p.name for p in path.parent.glob("*.py")]) if path.parent.is_dir() else ""
        raise UsageError(f"{path_text}: no such file.{hint}")
    if path.is_dir():
        raise UsageError(f"{path_text}: is a folder; give the Python file that defines build_model, get_batch and loss_fn")
    module_name = f"_lowmem_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path_text}: cannot be imported as a Python file (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise TaskError(f"{path_text}: line {e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        import traceback
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path.resolve()) or f.filename == str(path)]
        where = "".join(traceback.format_list(frames[-2:])).rstrip()
        raise TaskError(f"importing {path_text} raised {type(e).__name__}: {e}\n{where}".rstrip()) from e
    source = str(path_text)
    if factory:
        fn = getattr(module, factory, None)
        if fn is None:
            names = [n for n in vars(module) if callable(getattr(module, n))]
            raise TaskError(f"{path_text} has no function {factory!r}.{_did_you_mean(factory, names)}")
        if not callable(fn):
            raise TaskError(f"{path_text}:{factory} is a {type(fn).__name__}, expected a function returning the task")
        try:
            obj = fn()
        except Exception as e:
            raise TaskError(f"{path_text}:{factory}() raised {type(e).__name__}: {e}") from e
        return _task_from(obj, f"{path_text}:{factory}")
    return _task_from(module, source)


def _task_from(obj, source: str) -> Task:
    names = dir(obj)
    missing = [n for n in REQUIRED if not callable(getattr(obj, n, None))]
    if missing:
        lines = []
        for n in missing:
            found = getattr(obj, n, None)
            what = f"found a {type(found).__name__}, expected a function" if found is not None else "not found"
            lines.append(f"  {n}: {what}.{_did_you_mean(n, names)}")
        raise TaskError(f"{source} does not follow the model.py contract:\n" + "\n".join(lines) +
                        "\nIt must define build_model() -> nn.Module, get_batch(step) and loss_fn(model, batch) -> scalar tensor.")
    build_optimizer = getattr(obj, "build_optimizer", None)
    if build_optimizer is not None and not callable(build_optimizer):
        raise TaskError(f"{source}: build_optimizer is a {type(build_optimizer).__name__}, expected a function")
    defaults = getattr(obj, "LOWMEM", None) or {}
    if not isinstance(defaults, dict):
        raise TaskError(f"{source}: LOWMEM must be a dict like {{'steps': 500, 'lr': 3e-4, 'every': 10}}, "
                        f"found {type(defaults).__name__}")
    for k, v in defaults.items():
        if k not in DEFAULT_KEYS:
            raise TaskError(f"{source}: LOWMEM has unknown key {k!r}; known: {', '.join(DEFAULT_KEYS)}.{_did_you_mean(str(k), DEFAULT_KEYS)}")
        typ = DEFAULT_KEYS[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and not float(v).is_integer()):
            raise TaskError(f"{source}: LOWMEM[{k!r}] must be {'an integer' if typ is int else 'a number'}, found {v!r}")
    return Task(obj.build_model, obj.get_batch, obj.loss_fn, build_optimizer,
                {k: DEFAULT_KEYS[k](v) for k, v in defaults.items()}, source, _val_batches(obj, source))


def _val_batches(obj, source: str):
    """Held-out batches: ``get_val_batch(i)`` when defined, else ``get_batch(i, split="val")``
    when `get_batch` takes a ``split`` argument (as the built-in examples do), else None."""
    fn = getattr(obj, "get_val_batch", None)
    if fn is not None:
        if not callable(fn):
            raise TaskError(f"{source}: get_val_batch is a {type(fn).__name__}, expected a function")
        return fn
    try:
        params = inspect.signature(obj.get_batch).parameters
    except (TypeError, ValueError):
        return None
    if "split" in params:
        get_batch = obj.get_batch
        return lambda i: get_batch(i, split="val")
    return None
