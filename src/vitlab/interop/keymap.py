"""The declarative key map: one table per foreign format, read forwards to import, backwards to export.

An ``Entry`` ties one or more vitlab keys to one or more foreign keys with a pair of exact
tensor transforms (transpose, reshape, permute, concat/split). Nothing else is done to the
weights, so an import followed by an export gives back the same arrays bit for bit (one
exception: GroupNorm vectors read as (1, 1, 1, C) are written back as (C,), see ``norm_vector``).
An entry with no foreign keys computes its tensor (big_vision's fixed sin-cos table) and
writes nothing.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
Fn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Entry:
    """vitlab keys ``ours`` <-> foreign keys ``theirs``; ``to_ours``/``to_theirs`` map the tensor lists."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], list[Tensor]]
    to_theirs: Callable[[list[Tensor]], list[Tensor]]


def _identity(t: Tensor) -> Tensor:
    return t


def one(ours: str, theirs: str, fwd: Fn = _identity, inv: Fn = _identity) -> Entry:
    """A one-to-one entry: ``ours = fwd(theirs)`` and ``theirs = inv(ours)``."""
    return Entry((ours,), (theirs,), lambda ts: [fwd(ts[0])], lambda ts: [inv(ts[0])])


def fused(ours: str, theirs: Sequence[str], fwd: Fn = _identity, inv: Fn = _identity) -> Entry:
    """Our fused tensor (rows q, then k, then v) <-> separate foreign tensors, each mapped by ``fwd``/``inv``."""
    n = len(theirs)
    return Entry(
        (ours,), tuple(theirs),
        lambda ts: [torch.cat([fwd(t) for t in ts], dim=0)],
        lambda ts: [inv(t) for t in ts[0].chunk(n, dim=0)],
    )


# Per-tensor transforms (forward: foreign -> vitlab). Each is exact.
def dense(t: Tensor) -> Tensor:
    """Flax Dense kernel (in, out) <-> torch Linear weight (out, in); its own inverse."""
    return t.T


def conv_from_hwio(t: Tensor) -> Tensor:
    """Flax Conv kernel (H, W, in, out) -> torch Conv2d weight (out, in, H, W)."""
    return t.permute(3, 2, 0, 1)


def conv_to_hwio(t: Tensor) -> Tensor:
    """torch Conv2d weight (out, in, H, W) -> Flax Conv kernel (H, W, in, out)."""
    return t.permute(2, 3, 1, 0)


def flatten(t: Tensor) -> Tensor:
    """DenseGeneral bias (heads, head_dim) -> (heads * head_dim,)."""
    return t.reshape(-1)


def unflatten(*shape: int) -> Fn:
    """(heads * head_dim,) -> ``shape``, the inverse of ``flatten``."""
    return lambda t: t.reshape(shape)


def qkv_kernel_in(t: Tensor) -> Tensor:
    """DenseGeneral q/k/v kernel (D, heads, head_dim) -> Linear weight (heads * head_dim, D)."""
    return t.reshape(t.shape[0], -1).T


def qkv_kernel_out(heads: int) -> Fn:
    """Linear weight (heads * head_dim, D) -> DenseGeneral kernel (D, heads, head_dim)."""
    return lambda w: w.T.reshape(w.shape[1], heads, -1)


def out_kernel_in(t: Tensor) -> Tensor:
    """DenseGeneral out kernel (heads, head_dim, D) -> Linear weight (D, heads * head_dim)."""
    return t.reshape(-1, t.shape[-1]).T


def out_kernel_out(heads: int) -> Fn:
    """Linear weight (D, heads * head_dim) -> DenseGeneral kernel (heads, head_dim, D)."""
    return lambda w: w.T.reshape(heads, -1, w.shape[0])


def norm_vector(t: Tensor) -> Tensor:
    """A norm scale or bias stored as (1, 1, 1, C) (old ``flax.nn`` GroupNorm: the released hybrid
    files) or (C,) -> (C,); other shapes pass through to the shape check."""
    return t.reshape(-1) if t.ndim > 1 and set(t.shape[:-1]) == {1} else t


def units_per_stage(keys: Iterable[str], pattern: str, source: str, first: int = 0) -> tuple[int, ...]:
    """ResNet units per stage from the keys matching ``pattern`` (groups: stage, unit; numbered from ``first``)."""
    units: dict[int, int] = {}
    for key in keys:
        if m := re.match(pattern, key):
            stage, unit = int(m.group(1)) - first, int(m.group(2)) - first
            units[stage] = max(units.get(stage, 0), unit + 1)
    if sorted(units) != list(range(len(units))):
        raise ValueError(f"{source}: the ResNet stages are not numbered {first}, {first + 1}, ... "
                         f"(found {[s + first for s in sorted(units)]})")
    return tuple(units[s] for s in sorted(units))


@dataclass
class ImportReport:
    """What an import did: the format, the keys it mapped, and the differences it could explain."""

    format: str
    source: str
    num_tensors: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # foreign key -> why it is not needed
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    architecture: str = ""  # a one-line summary of the imported config

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.format} checkpoint, {self.num_tensors} tensors mapped, "
                 f"0 missing, 0 unexpected, {len(self.ignored)} ignored"]
        lines += [f"  {self.architecture}"] if self.architecture else []
        lines += [f"  ignored {k}: {why}" for k, why in self.ignored.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _shorten(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def import_state(entries: list[Entry], foreign: dict[str, Tensor], expected: dict[str, Tensor],
                 report: ImportReport, ignore: Callable[[str], str | None] = lambda key: None) -> dict[str, Tensor]:
    """Foreign tensors -> a vitlab state dict, shape-checked against ``expected``.

    Raises ``ValueError`` on the first tensor whose shape differs (naming both keys and both
    shapes), and on any missing or unexpected key that ``ignore`` cannot explain.
    """
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in entries:
        absent = [k for k in entry.theirs if k not in foreign]
        if absent:
            missing += absent
            continue
        used.update(entry.theirs)
        for key, value in zip(entry.ours, entry.to_ours([foreign[k] for k in entry.theirs])):
            want = tuple(expected[key].shape)
            if tuple(value.shape) != want:
                src = "" if entry.theirs == (key,) else f" (from {', '.join(entry.theirs)})"
                raise ValueError(
                    f"{report.source} does not fit this model: {key}{src} has shape {tuple(value.shape)} "
                    f"in the {report.format} checkpoint but {want} in the model; is it a checkpoint of another "
                    f"architecture?"
                )
            state[key] = value.to(expected[key].dtype).contiguous()
    unexpected = []
    for key in foreign:
        if key in used:
            continue
        why = ignore(key)
        if why is None:
            unexpected.append(key)
        else:
            report.ignored[key] = why
    not_filled = sorted(set(expected) - set(state))
    if missing or unexpected or not_filled:
        raise ValueError(
            f"{report.source} is not a {report.format} checkpoint of this model: missing keys [{_shorten(missing)}], "
            f"unexpected keys [{_shorten(unexpected)}]"
            + (f", unfilled model keys [{_shorten(not_filled)}]" if not_filled and not missing else "")
            + "; pick the right format with --from, or check the checkpoint's architecture (ViT, hybrid or BiT)"
        )
    report.num_tensors = len(state)
    return state


def export_state(entries: list[Entry], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A vitlab state dict -> foreign tensors (the key map read backwards); every key must be mapped."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for entry in entries:
        used.update(entry.ours)
        for key, value in zip(entry.theirs, entry.to_theirs([state[k] for k in entry.ours])):
            out[key] = value.detach().cpu().contiguous()
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"cannot export: no foreign key for {_shorten(left)}")
    return out
