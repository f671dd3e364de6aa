"""Where a measured SNR belongs: a view of a parameter and a subset of the view's dims.

In code these are typed (`ViewLabel`, `SnrKey`, tuples of dims); on disk they are strings, and
this module is the only place that writes or parses them (DESIGN §3, §10):

- the trajectory CSV: column ``shape`` is the parameter's shape (``256x256``), ``view`` the
  view's name and shape (``raw:256x256``, ``heads:4x64x256``, ``q.heads:4x8x32``) and
  ``subset`` the view's dims averaged over (``0,2``);
- plan.json: the keys of a layer's or part's ``"snr"`` are the dims alone for the raw view
  (``0,1``) and ``name:dims`` for any other view (``heads:0``, ``q.heads:0,1``).
"""

from __future__ import annotations

from dataclasses import dataclass


def format_shape(shape: tuple[int, ...]) -> str:
    """``256x256``; ``""`` for a 0-dim tensor."""
    return "x".join(map(str, shape))


def parse_shape(text: str) -> tuple[int, ...]:
    """Inverse of `format_shape`; ValueError naming `text` when it is not one."""
    return _ints(text, "x", "a shape such as '256x256'") if text else ()


def format_subset(dims: tuple[int, ...]) -> str:
    """``0,2``."""
    return ",".join(map(str, dims))


def parse_subset(text: str) -> tuple[int, ...]:
    """Inverse of `format_subset`; ValueError naming `text` when it is not one."""
    return _ints(text, ",", "dims such as '0,2'")


def _ints(text: str, sep: str, expected: str) -> tuple[int, ...]:
    pieces = text.split(sep)
    if not all(p.isascii() and p.isdigit() for p in pieces):
        raise ValueError(f"{text!r} is not {expected}")
    return tuple(int(p) for p in pieces)


@dataclass(frozen=True)
class ViewLabel:
    """A view as the trajectory names it: the view's name and its shape (``heads:4x32x128``)."""

    name: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "ViewLabel":
        """``heads:4x32x128``; ValueError naming `text` otherwise."""
        name, sep, shape = text.rpartition(":")
        try:
            if not (sep and name):
                raise ValueError
            return cls(name, parse_shape(shape))
        except ValueError:
            raise ValueError(f"view {text!r} is not a view name and shape such as 'heads:4x32x128'") from None

    def __str__(self) -> str:
        return f"{self.name}:{format_shape(self.shape)}"


@dataclass(frozen=True)
class SnrKey:
    """A plan's key for one SNR value: the view's name and the dims of the view averaged over."""

    view: str
    subset: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "SnrKey":
        """``0,1`` (the raw view) or ``q.heads:0,1``; ValueError naming `text` otherwise."""
        view, _, dims = text.rpartition(":")
        try:
            return cls(view or "raw", parse_subset(dims))
        except ValueError:
            raise ValueError(f"SNR key {text!r} is not dims ('0,1') or a view and dims ('q.heads:0,2')") from None

    def __str__(self) -> str:
        dims = format_subset(self.subset)
        return dims if self.view == "raw" else f"{self.view}:{dims}"
