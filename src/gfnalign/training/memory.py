"""How many rows a batched network pass may take: a memory budget over the networks' measured cost per row.

A pass's memory is its weights (already resident) plus its activations, which grow with the rows it takes.
:class:`MemoryBudget` measures the activations of one row of each pass the first time the pass is asked for
(``per_row``) and answers ``rows(name, total)`` = ⌊budget / bytes per row⌋, at least 1 and at most ``total``.

**Bytes per row** are the bytes of the tensors autograd saves for the backward of a one-row forward with a
graph (:func:`saved_bytes`), distinct storages counted once and the networks' own weights left out. That is
what a pass with gradient keeps until its backward, and it bounds a no-grad pass too (which holds a few of
those activations at a time). The probe is one real row at the real size, the smallest chunk the pass
would take anyway, so it never needs more memory than the pass itself.

**Gradient checkpointing** (:func:`enable_block_checkpointing`) wraps the blocks of a network (the members of
its outermost ``nn.ModuleList`` s: the VAE decoder's up-blocks, a ViT's layers) so that, when autograd
records, each block keeps only its input and recomputes the rest in the backward. The chunk sizes stay
derived from the un-checkpointed cost (an upper bound), so checkpointing only lowers the real peak.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: share of the free device memory used when no budget is configured
AUTO_BUDGET_FRACTION = 0.5


def resident_modules(*owners: Any) -> list[nn.Module]:
    """The networks whose weights stay resident (left out of activation bytes): each owner that is an
    ``nn.Module`` (backbone, objective) and the modules a reward exposes through ``modules()``."""
    found: list[nn.Module] = []
    for owner in owners:
        if isinstance(owner, nn.Module):
            found.append(owner)
        modules = getattr(owner, "modules", None)
        if callable(modules) and not isinstance(owner, nn.Module):
            found += [m for m in modules().values() if isinstance(m, nn.Module)]
    return found


class _Saved:
    """A tensor autograd saved during :func:`saved_bytes`; gives its storage's count back when the graph frees it."""

    __slots__ = ("tensor", "owner", "key")

    def __init__(self, tensor: torch.Tensor, owner: _LiveSaved, key: Any) -> None:
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self) -> None:
        self.owner.release(self.key)


class _LiveSaved:
    """Bytes of the distinct storages that live graphs hold now, and their peak."""

    def __init__(self, resident: set[int]) -> None:
        self.resident = resident
        self.refs: dict[Any, int] = {}
        self.sizes: dict[Any, int] = {}
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() in self.resident:
                return t.detach()
            key, size = (storage.data_ptr(), t.device), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse)
            key, size = (id(t), t.device), t.numel() * t.element_size()
        if self.refs.get(key, 0) == 0:
            self.sizes[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
        self.refs[key] = self.refs.get(key, 0) + 1
        # detached: a node that saves its own output (exp, softmax, attention) would otherwise hold a tensor
        # whose grad_fn is that node, a reference cycle through autograd that no garbage collection breaks,
        # and the probed graph would stay in memory for good (5.5 GB at 512 px)
        return _Saved(t.detach(), self, key)

    @staticmethod
    def unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: Any) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.sizes.pop(key)


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[nn.Module] = ()) -> int:
    """Peak bytes of the distinct storages that autograd graphs hold while ``fn()`` runs (a forward with a
    graph, which may itself take VJPs through transient graphs: those count while they are alive), leaving out
    the parameters and buffers of the modules in ``exclude`` (resident weights, not activations). The graphs
    are freed when ``fn``'s result is dropped."""
    live = _LiveSaved({t.untyped_storage().data_ptr() for m in exclude for t in (*m.parameters(), *m.buffers())})
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
        out = fn()
    del out
    return int(live.peak)


def available_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: CUDA's free memory, else the host's MemAvailable (Linux) or total RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class MemoryBudget:
    """Activation memory one batched pass may use, and the rows that fit (see the module docstring).

    ``budget_gb=None`` takes :data:`AUTO_BUDGET_FRACTION` of the memory free on ``device`` when the budget is
    first needed (after the models are loaded). A budget smaller than one row still gives chunks of 1.
    """

    def __init__(self, budget_gb: float | None = None, device: torch.device | str = "cpu") -> None:
        if budget_gb is not None and not (isinstance(budget_gb, int | float) and budget_gb > 0):
            raise ValueError(f"memory.budget_gb={budget_gb!r} must be a positive number of GB (or null: automatic)")
        self.budget_gb = budget_gb
        self.device = torch.device(device)
        self._budget: int | None = None if budget_gb is None else int(budget_gb * 2**30)
        self._per_row: dict[str, float] = {}

    @property
    def budget_bytes(self) -> int:
        if self._budget is None:
            self._budget = int(AUTO_BUDGET_FRACTION * available_bytes(self.device))
        return self._budget

    def per_row(self, name: str, measure: Callable[[], float]) -> float:
        """Bytes per row of pass ``name``, measured once with ``measure()``."""
        if name not in self._per_row:
            self._per_row[name] = max(1.0, float(measure()))
        return self._per_row[name]

    def known(self, name: str) -> bool:
        return name in self._per_row

    def forget(self, *names: str) -> None:
        """Drop measurements that no longer hold (e.g. after turning on checkpointing)."""
        for name in names:
            self._per_row.pop(name, None)

    def remember(self, name: str, nbytes: float) -> None:
        """Record the bytes per row of pass ``name`` (measured by the caller)."""
        self._per_row[name] = max(1.0, float(nbytes))

    def rows(self, name: str, total: int, measure: Callable[[], float]) -> int:
        """Rows of pass ``name`` per chunk: ⌊budget / bytes per row⌋, clamped to [1, total]."""
        if total <= 1:
            return max(total, 1)
        fit = math.floor(self.budget_bytes / self.per_row(name, measure))
        return int(min(total, max(1, fit)))

    def describe(self) -> dict[str, float]:
        """Budget and measured bytes per row (GB), for logs and benchmarks."""
        out = {"budget_gb": self.budget_bytes / 2**30}
        out.update({f"per_row_gb/{k}": v / 2**30 for k, v in self._per_row.items()})
        return out


def chunked(fn: Callable[..., torch.Tensor], rows: int, *tensors: Any) -> torch.Tensor:
    """``fn`` over slices of ``rows`` rows of every tensor argument (``None`` passes through), concatenated."""
    n = next(t.shape[0] for t in tensors if isinstance(t, torch.Tensor))
    outs = []
    for s in range(0, n, rows):
        outs.append(fn(*(t[s:s + rows] if isinstance(t, torch.Tensor) else t for t in tensors)))
    return torch.cat(outs) if outs else torch.zeros(0)


# -- gradient checkpointing ------------------------------------------------------------------------------------


def _outer_blocks(module: nn.Module) -> list[nn.Module]:
    """Members of the outermost ``nn.ModuleList`` s below ``module`` (breadth first, not inside a list)."""
    blocks, queue = [], list(module.children())
    while queue:
        m = queue.pop(0)
        if isinstance(m, nn.ModuleList):
            blocks.extend(m)
        else:
            queue.extend(m.children())
    return blocks


def enable_block_checkpointing(module: nn.Module) -> int:
    """Recompute each block of ``module`` in the backward instead of storing its activations (only while
    autograd records; no-grad passes are unchanged). Returns the number of blocks wrapped; idempotent."""
    count = 0
    for block in _outer_blocks(module):
        if getattr(block, "_gfnalign_checkpointed", False):
            count += 1
            continue
        forward = block.forward

        def wrapped(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = wrapped  # type: ignore[method-assign]
        block._gfnalign_checkpointed = True  # type: ignore[attr-defined]
        count += 1
    return count


# -- the update pass -------------------------------------------------------------------------------------------


#: :func:`update_rows` of an objective that is never cut
WHOLE = 2**62


def denoiser_checkpointing(backbone: Any) -> bool:
    """Whether ``backbone``'s denoiser recomputes its blocks in backward passes now."""
    return bool(getattr(backbone, "gradient_checkpointing_on", False))


def _probe(budget: MemoryBudget, name: str, loss_of: Callable[[Any], torch.Tensor], part: Any,
           resident: list[nn.Module], backbone: Any) -> float:
    """Saved bytes of ``loss_of(part)`` as the update will run it: with the denoiser checkpointed when the
    backbone is, else without. Both figures come from one probe, measured once per budget: a backbone that
    offers ``checkpointed_activations`` runs the probe checkpointed (so the probe itself stays small at any
    model size) and counts what its blocks would have kept without checkpointing."""
    key = f"{name}/checkpointed" if denoiser_checkpointing(backbone) else name
    if not budget.known(key):
        counting = getattr(backbone, "checkpointed_activations", None)
        if callable(counting):
            with counting() as blocks:
                with_ckpt = float(saved_bytes(lambda: loss_of(part), resident))
            budget.remember(name, with_ckpt + blocks.bytes)
            budget.remember(f"{name}/checkpointed", with_ckpt)
        else:
            plain = float(saved_bytes(lambda: loss_of(part), resident))
            budget.remember(name, plain)
            budget.remember(f"{name}/checkpointed", plain)
    return budget.per_row(key, lambda: 0.0)


def update_rows(objective: nn.Module, batch: Any, loss_of: Callable[[Any], torch.Tensor], budget: MemoryBudget,
                resident: Iterable[nn.Module] = (), *, capacity: int | None = None, backbone: Any = None) -> int:
    """Transitions per backward of an update within ``budget``: the micro-batch ``batch`` is cut into parts of
    this many transitions, each part's mean loss weighted by its share and backpropagated before the next
    part runs, so only one part's graph is alive at a time.

    Only objectives that declare ``transition_separable`` (their loss is the mean of independent
    per-transition terms, so the weighted part means sum to the micro-batch's loss and its gradient exactly)
    are cut; any other objective (leave-one-out groups, trajectory balance) takes the micro-batch whole
    (:data:`WHOLE`).
    ``loss_of(part)`` runs the objective on a part; the probe is one transition's forward with a graph
    (:func:`saved_bytes`, the resident weights left out), measured once per budget, with or without the
    ``backbone``'s denoiser checkpointing as it is set now (:func:`_probe`). The answer is not capped by
    ``len(batch)`` (later micro-batches may be longer); ``capacity`` caps it when given."""
    n = len(batch)
    if not getattr(objective, "transition_separable", False):
        return WHOLE
    if n <= 1:
        return 1
    first = batch.index(torch.arange(1))
    resident = list(resident)
    per_transition = _probe(budget, "update/transition", loss_of, first, resident, backbone)
    return int(min(capacity or WHOLE, max(1, math.floor(budget.budget_bytes / per_transition))))


def parts(batch: Any, rows: int) -> list[Any]:
    """``batch`` cut into consecutive parts of ``rows`` transitions (the last may be shorter)."""
    n = len(batch)
    if rows >= n:  # no cut: the micro-batch itself, untouched
        return [batch]
    return [batch.index(torch.arange(s, min(s + rows, n))) for s in range(0, n, rows)]


def update_need(objective: nn.Module, batch: Any, loss_of: Callable[[Any], torch.Tensor], budget: MemoryBudget,
                resident: Iterable[nn.Module], rows: int, *, backbone: Any = None) -> float:
    """Activation bytes of the largest part of ``batch`` cut into ``rows`` transitions: one transition's probe
    (shared with :func:`update_rows`) times the part size, or, for an objective that is never cut, the whole
    micro-batch measured as it is (a transition alone may not be a valid loss there)."""
    n = len(batch)
    if n == 0:
        return 0.0
    resident = list(resident)
    if getattr(objective, "transition_separable", False):
        one = batch.index(torch.arange(1))
        return _probe(budget, "update/transition", loss_of, one, resident, backbone) * min(rows, n)
    return _probe(budget, "update/micro-batch", loss_of, batch, resident, backbone)
