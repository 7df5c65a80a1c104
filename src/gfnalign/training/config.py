"""The training configuration: nested dataclasses, YAML loading, ``--set a.b=c`` overrides, validation.

Validation runs before any model loads and every error names the field, the bad value and what is
allowed, e.g. ``sampling.eta=0.0 is not allowed: the forward kernel needs eta > 0 (use 0 < eta <= 1)``.

Layout of a config file (every key optional except ``method.name``; see ``configs/*.yaml``)::

    seed: 0
    backbone: {kind: digits, path: null, dtype: float32, lora_rank: 4, ...}
    reward: digit-alignment            # anything rewards.build_reward accepts
    prompts: digits                    # anything rewards.prompts.load_prompts accepts
    method: {name: residual-nabla-db, options: {...}}   # options go to objectives.build_objective
    beta: {value: 1.0, schedule: constant | linear, warmup_fraction: 0.5}
    sampling: {num_steps, guidance_scale, eta, log_prob_reduction, batch_size, batches_per_epoch}
    training: {epochs, micro_batch, grad_accum, lr, lr_heads, weight_decay, ...}
    lookahead: {mode: cached | recompute, model: policy | reference, guided: true}
    logging: {sample_every, checkpoint_every, keep_checkpoints, tensorboard, progress, ...}
    reliability: {max_nan_streak, on_bad_reward: skip | stop, max_skipped_epoch_fraction, reward_timeout_s,
                  reward_wait_s}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

#: The objectives this trainer knows how to drive (the registry may add more).
KNOWN_METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "reward-backprop")
BACKBONE_KINDS = ("digits", "sd", "sdxl", "python")
BETA_SCHEDULES = ("constant", "linear")
LOOKAHEAD_MODES = ("cached", "recompute")
LOOKAHEAD_MODELS = ("policy", "reference")
MIXED_PRECISION = ("no", "bf16", "fp16")
SAMPLING_STARTS = ("noise", "tilted")
DTYPES = ("float32", "bfloat16", "float16")
REDUCTIONS = ("sum", "mean")
ON_BAD_REWARD = ("skip", "stop")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field, the value and the fix."""


@dataclass
class BackboneConfig:
    kind: str = "digits"  # digits (shipped) | sd (diffusers folder / hub id; SDXL folders detected) | sdxl | python
    path: str | None = None  # sd: folder or hub id; python: "module:function" returning a backbone
    dtype: str = "float32"  # dtype of the frozen weights
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    full_finetune: bool = False
    gradient_checkpointing: bool = False
    heads: str = "generic"  # generic: the objective builds its heads from state_shape; backbone: backbone.make_*_head()
    image_size: int | None = None  # pixels per side; None: the model's native size (UNet sample_size x VAE factor)


@dataclass
class MethodConfig:
    name: str = "residual-nabla-db"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BetaConfig:
    value: float = 1.0  # inverse temperature: log R = beta * r
    schedule: str = "constant"  # constant | linear (DAG: beta_e = beta * min(1, e / (fraction * E)))
    warmup_fraction: float = 0.5


@dataclass
class SamplingConfig:
    num_steps: int = 20
    guidance_scale: float = 1.0
    eta: float = 1.0
    log_prob_reduction: str = "sum"
    batch_size: int = 8  # trajectories per sampling batch, per process
    batches_per_epoch: int = 2
    # "noise": x_start ~ N(0, I); "tilted": x_start ∝ N(0, I)·G(x_start) by resampling start_candidates proposals
    # with the objective's learned start value (removes the value-function bias; gfnalign.sampling.start)
    start: str = "noise"
    start_candidates: int = 8


@dataclass
class TrainingConfig:
    epochs: int = 10
    micro_batch: int = 16  # transitions per forward/backward (rounded down to whole trajectories, at least one, for rtb)
    grad_accum: int = 1  # micro-batches per optimiser update
    lr: float = 1e-3  # policy (LoRA) learning rate
    lr_heads: float = 1e-3
    weight_decay: float = 1e-4
    weight_decay_heads: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    clip_norm: float = 1.0  # per parameter group; <= 0 disables clipping
    mixed_precision: str = "no"
    max_updates_per_epoch: int | None = None  # cap on optimiser updates per epoch (None: all transitions)


@dataclass
class LookaheadConfig:
    mode: str = "cached"  # cached: r(x0_hat) of every state once at sampling; recompute: per transition
    model: str = "reference"  # which network predicts x0_hat for the forward-looking reward
    guided: bool = True  # use the CFG-guided x0_hat


@dataclass
class LoggingConfig:
    log_every: int = 1  # updates between metrics.jsonl lines
    sample_every: int = 5  # epochs between sample grids (0: only before/after)
    grid_prompts: int = 8  # images in each sample grid
    checkpoint_every: int = 5  # epochs between checkpoints (the last epoch is always saved)
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    report: bool = True
    eval_samples: int = 32  # images before/after training for report.md


@dataclass
class ReliabilityConfig:
    max_nan_streak: int = 3  # stop after this many non-finite losses in a row
    on_bad_reward: str = "skip"  # skip | stop, for NaN/inf rewards or a reward error
    # the run fails (no export) once more than this share of its epochs was skipped for bad rewards
    max_skipped_epoch_fraction: float = 0.5
    reward_timeout_s: float | None = 600.0  # per reward call; a call that takes longer is a bad reward (null: none)
    reward_wait_s: float = 300.0  # how long to wait (with backoff) for an unreachable reward service, then stop


@dataclass
class TrainConfig:
    seed: int = 0
    run_name: str = "run"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    reward: Any = "digit-alignment"
    prompts: Any = "digits"
    method: MethodConfig = field(default_factory=MethodConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)

    # -- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = _build(cls, data or {}, "")
        validate(cfg)
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config with a YAML file "
                              "(see `gfnalign list` for the shipped presets)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(apply_overrides(data, overrides or []))


# -- building dataclasses from plain dicts ---------------------------------------------------------------
_FREEFORM = {"reward", "prompts", "method.options"}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        f = known[name]
        path = f"{prefix}{name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and path not in _FREEFORM:
            kwargs[name] = _build(type(default), value if value is not None else {}, path + ".")
        else:
            kwargs[name] = _coerce(path, value, default)
    return cls(**kwargs)


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Light type checking against the default's type (YAML gives ints for floats, strings for 1e-3)."""
    if path in _FREEFORM or value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if isinstance(default, int | float):
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be a number")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be a number") from None
        if isinstance(default, int) and not isinstance(default, bool):
            if num != int(num):
                raise ConfigError(f"{path}={value!r} must be an integer")
            return int(num)
        return num
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}={value!r} must be a list")
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} must be a mapping")
        return dict(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML: ``1e-3``, ``true``, ``[1, 2]``) to a plain dict."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key.path=value, e.g. --set training.epochs=3")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 does not read "1e-3" as a float; do it here so numbers behave as users expect.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in "e.") and _is_float(value) else value
            except ValueError:
                pass
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else _raise_not_mapping(key, part, node[part])
            node = node[part]
        node[parts[-1]] = value
    return data


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _raise_not_mapping(key: str, part: str, value: Any) -> Any:
    raise ConfigError(f"--set {key}: {part!r} holds {value!r}, not a mapping; set {part} itself instead")


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


# -- validation ------------------------------------------------------------------------------------------
def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; use one of: {', '.join(allowed)}")


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} is not allowed; it must be a finite number {bound}")


def known_methods() -> tuple[str, ...]:
    """The static method list plus whatever the objectives registry has (when it imports)."""
    names = set(KNOWN_METHODS)
    try:
        import gfnalign.objectives  # noqa: F401
        from gfnalign.objectives.base import REGISTRY

        names |= set(REGISTRY)
    except Exception:  # objectives not importable yet: the static list is the contract
        pass
    return tuple(sorted(names))


def _method_options(name: str) -> set[str]:
    try:
        import gfnalign.objectives  # noqa: F401
        from gfnalign.objectives.base import REGISTRY
        from gfnalign.training.build import _init_parameters

        return _init_parameters(REGISTRY[name]) if name in REGISTRY else set()
    except Exception:
        return set()


def _known_rewards() -> tuple[str, ...] | None:
    try:
        from gfnalign.rewards import list_rewards  # type: ignore[attr-defined]

        names = list_rewards()
        return tuple(n if isinstance(n, str) else getattr(n, "name", str(n)) for n in names)
    except Exception:
        return None


def validate(cfg: TrainConfig) -> None:
    """Check every value that can be checked without loading a model. Raises :class:`ConfigError`."""
    b = cfg.backbone
    _choice("backbone.kind", b.kind, BACKBONE_KINDS)
    if b.kind in ("sd", "sdxl", "python") and not b.path:
        what = "'module:function'" if b.kind == "python" else "a diffusers folder or hub id"
        raise ConfigError(f"backbone.path={b.path!r} is not allowed for backbone.kind={b.kind}; give {what}")
    if b.kind in ("sd", "sdxl"):
        from gfnalign.backbones.families import resolve_family

        try:
            resolve_family(b.kind, b.path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if b.kind == "python" and ":" not in str(b.path):
        raise ConfigError(f"backbone.path={b.path!r} must look like 'package.module:function' for kind python")
    _choice("backbone.dtype", b.dtype, DTYPES)
    _choice("backbone.heads", b.heads, ("backbone", "generic"))
    if b.image_size is not None and (isinstance(b.image_size, bool) or not isinstance(b.image_size, int)
                                     or b.image_size <= 0):
        raise ConfigError(f"backbone.image_size={b.image_size!r} must be a positive int (e.g. 1024 for SDXL) or null")
    if not b.full_finetune:
        _positive("backbone.lora_rank", b.lora_rank)
        _positive("backbone.lora_alpha", b.lora_alpha)
        if not b.lora_targets:
            raise ConfigError("backbone.lora_targets=[] is not allowed; list module names such as to_q, to_k, to_v, to_out.0")

    methods = known_methods()
    if cfg.method.name not in methods:
        raise ConfigError(f"method.name={cfg.method.name!r} is not allowed; use one of: {', '.join(methods)}")
    if not isinstance(cfg.method.options, dict):
        raise ConfigError(f"method.options={cfg.method.options!r} must be a mapping")
    accepted = _method_options(cfg.method.name)
    for key in cfg.method.options:
        if accepted and key not in accepted:
            raise ConfigError(f"method.options.{key}={cfg.method.options[key]!r} is not an option of method "
                              f"{cfg.method.name!r}; allowed: {', '.join(sorted(accepted))}")

    _positive("beta.value", cfg.beta.value, allow_zero=True)
    _choice("beta.schedule", cfg.beta.schedule, BETA_SCHEDULES)
    if not 0 < cfg.beta.warmup_fraction <= 1:
        raise ConfigError(f"beta.warmup_fraction={cfg.beta.warmup_fraction!r} is not allowed; use 0 < fraction <= 1")

    s = cfg.sampling
    _positive("sampling.num_steps", s.num_steps)
    _positive("sampling.guidance_scale", s.guidance_scale)
    if not 0 < s.eta <= 1:
        raise ConfigError(
            f"sampling.eta={s.eta!r} is not allowed: the forward kernel needs a density (use 0 < eta <= 1; "
            "1 is DDPM's posterior)"
        )
    _choice("sampling.log_prob_reduction", s.log_prob_reduction, REDUCTIONS)
    _choice("sampling.start", s.start, SAMPLING_STARTS)
    _positive("sampling.start_candidates", s.start_candidates)
    _positive("sampling.batch_size", s.batch_size)
    _positive("sampling.batches_per_epoch", s.batches_per_epoch)

    t = cfg.training
    _positive("training.epochs", t.epochs)
    _positive("training.micro_batch", t.micro_batch)
    _positive("training.grad_accum", t.grad_accum)
    _positive("training.lr", t.lr)
    _positive("training.lr_heads", t.lr_heads)
    _positive("training.weight_decay", t.weight_decay, allow_zero=True)
    _positive("training.weight_decay_heads", t.weight_decay_heads, allow_zero=True)
    if len(t.adam_betas) != 2 or not all(0 <= float(x) < 1 for x in t.adam_betas):
        raise ConfigError(f"training.adam_betas={t.adam_betas!r} is not allowed; use two numbers in [0, 1), e.g. [0.9, 0.999]")
    _positive("training.adam_eps", t.adam_eps)
    _choice("training.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    if t.max_updates_per_epoch is not None:
        _positive("training.max_updates_per_epoch", t.max_updates_per_epoch)

    _choice("lookahead.mode", cfg.lookahead.mode, LOOKAHEAD_MODES)
    _choice("lookahead.model", cfg.lookahead.model, LOOKAHEAD_MODELS)

    lg = cfg.logging
    _positive("logging.log_every", lg.log_every)
    _positive("logging.sample_every", lg.sample_every, allow_zero=True)
    _positive("logging.grid_prompts", lg.grid_prompts)
    _positive("logging.checkpoint_every", lg.checkpoint_every)
    _positive("logging.keep_checkpoints", lg.keep_checkpoints)
    _positive("logging.eval_samples", lg.eval_samples, allow_zero=True)

    _positive("reliability.max_nan_streak", cfg.reliability.max_nan_streak)
    _choice("reliability.on_bad_reward", cfg.reliability.on_bad_reward, ON_BAD_REWARD)
    f = cfg.reliability.max_skipped_epoch_fraction
    if not (math.isfinite(f) and 0 <= f <= 1):
        raise ConfigError(f"reliability.max_skipped_epoch_fraction={f!r} is not allowed; use a number in [0, 1] "
                          "(the share of epochs that may be skipped for bad rewards)")

    if isinstance(cfg.reward, str) and cfg.reward and ":" not in cfg.reward and "/" not in cfg.reward \
            and not cfg.reward.startswith(("http", "composite")):
        names = _known_rewards()
        if names is not None and cfg.reward not in names:
            raise ConfigError(f"reward={cfg.reward!r} is not allowed; use one of: {', '.join(names)} "
                              "(or a mapping / 'module:function' for custom rewards)")
    if cfg.reward in (None, ""):
        raise ConfigError("reward=None is not allowed; name a reward (see `gfnalign list`)")
    if cfg.prompts in (None, ""):
        raise ConfigError("prompts=None is not allowed; name a prompt set or a prompt file (see `gfnalign list`)")
