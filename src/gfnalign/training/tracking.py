"""Optional experiment tracking: Weights & Biases, enabled by ``logging.wandb.project``.

The trainer always writes ``metrics.jsonl``, TensorBoard events, ``samples/*.png`` and ``report.md``; a
tracker mirrors the same things elsewhere. :func:`open_tracker` returns a no-op tracker unless
``logging.wandb.project`` is set, and ``wandb`` is imported only then (``pip install 'gfnalign[wandb]'``).

What a W&B run receives: the resolved config; every ``metrics.jsonl`` row (same keys, ``step`` as the W&B
step); each sample grid as an image under ``samples/<name>`` with its prompts and rewards as the caption;
the before/after evaluation as summary values (``eval/before/reward_mean`` ...) and ``report.md`` (with
its plots) as run files. ``mode: offline`` (or ``WANDB_MODE=offline``) writes everything under
``RUN/wandb/`` for a later ``wandb sync``. The W&B run id is kept in ``RUN/wandb_run_id.txt`` so that
``--resume`` continues the same W&B run (rows W&B already has are not logged twice).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any


class NullTracker:
    """Tracking disabled: every call does nothing."""

    def log_metrics(self, row: dict[str, Any]) -> None:
        pass

    def log_grid(self, name: str, path: Path, caption: str, step: int) -> None:
        pass

    def log_report(self, run_dir: Path, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        pass

    def finish(self) -> None:
        pass


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


class WandbTracker(NullTracker):
    """Mirrors metrics, grids and the final report to a W&B run (see the module docstring)."""

    def __init__(self, cfg: Any, run_dir: Path):
        try:
            import wandb
        except ImportError as err:  # validated before models load; kept for direct use
            raise ImportError("logging.wandb.project is set but the wandb package is not installed; "
                              "pip install 'gfnalign[wandb]' (or remove logging.wandb)") from err
        self._wandb = wandb
        w = cfg.logging.wandb
        id_file = Path(run_dir) / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        kwargs: dict[str, Any] = dict(project=w.project, entity=w.entity, name=cfg.run_name, id=run_id,
                                      resume="allow", dir=str(run_dir), config=cfg.to_dict())
        if w.mode is not None:
            kwargs["mode"] = w.mode
        self.run = wandb.init(**kwargs)
        self._last_step = -1

    def log_metrics(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        values = _scalars({k: v for k, v in row.items() if k != "step"})
        self.run.log(values, step=step)
        self._last_step = max(self._last_step, step)

    def log_grid(self, name: str, path: Path, caption: str, step: int) -> None:
        step = max(int(step), self._last_step)  # W&B drops rows whose step goes backwards
        self.run.log({f"samples/{name}": self._wandb.Image(str(path), caption=caption)}, step=step)
        self._last_step = step

    def log_report(self, run_dir: Path, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        self.run.summary.update({**_scalars(before or {}, "eval/before/"), **_scalars(after or {}, "eval/after/")})
        for name in ("report.md", "reward_curve.png", "eval_before.json", "eval_after.json"):
            path = Path(run_dir) / name
            if path.is_file():
                self.run.save(str(path), base_path=str(run_dir), policy="now")

    def finish(self) -> None:
        self.run.finish()


def open_tracker(cfg: Any, run_dir: Path, *, is_main: bool = True) -> NullTracker:
    """A :class:`WandbTracker` when ``logging.wandb.project`` is set (main process only), else a no-op."""
    w = getattr(cfg.logging, "wandb", None)
    if not is_main or w is None or not w.project or w.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, run_dir)
