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
    sampling: {num_steps, guidance_scale, eta, kernel: ddim | flow_sde | cps, log_prob_reduction, batch_size, ...}
    training: {epochs, micro_batch, grad_accum, lr, lr_heads, weight_decay, ...}
    lookahead: {mode: cached | recompute, model: policy | reference, guided: true}
    memory: {budget_gb: null, checkpoint_decoder: false, checkpoint_reward: false, auto_checkpointing: true}
    logging: {sample_every, checkpoint_every, keep_checkpoints, tensorboard, progress, ...,
              wandb: {project, entity, mode}}
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
KNOWN_METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "rtb", "ddpo", "grpo", "reward-backprop")
#: the shipped digits worlds (UNet and flow): their classifier gives the features and class masses. The one
#: list of them: the API, the CLI and the benchmarks import it from here.
DIGITS_KINDS = ("digits", "digits-flow")
BACKBONE_KINDS = (*DIGITS_KINDS, "sd", "sdxl", "sd3", "flux", "python")
#: backbone kinds whose folders are diffusers pipelines (resolved by gfnalign.backbones.families)
PIPELINE_KINDS = ("sd", "sdxl", "sd3", "flux")
#: kinds whose models are rectified-flow transformers (default kernel flow_sde; T5 max_sequence_length)
FLOW_KINDS = ("sd3", "flux", "digits-flow")
SAMPLER_KERNELS = ("ddim", "flow_sde", "cps")
BETA_SCHEDULES = ("constant", "linear")
LOOKAHEAD_MODES = ("cached", "recompute")
LOOKAHEAD_MODELS = ("policy", "reference")
MIXED_PRECISION = ("no", "bf16", "fp16")
SAMPLING_STARTS = ("noise", "tilted")
DTYPES = ("float32", "bfloat16", "float16")
REDUCTIONS = ("sum", "mean")
ON_BAD_REWARD = ("skip", "stop")
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field, the value and the fix."""


@dataclass
class BackboneConfig:
    # digits (shipped) | digits-flow (shipped, SD3-style) | sd (diffusers folder / hub id; SDXL, SD3, FLUX folders detected) | sdxl | sd3 | flux | python
    kind: str = "digits"
    path: str | None = None  # sd: folder or hub id; python: "module:function" returning a backbone
    dtype: str = "float32"  # dtype of the frozen weights
    lora_rank: int = 4  # LoRA rank of the trained adapters
    lora_alpha: float = 4.0  # LoRA scale numerator (scale = alpha / rank)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # module names given LoRA
    full_finetune: bool = False  # train every denoiser weight instead of LoRA adapters
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    heads: str = "generic"  # generic: the objective builds its heads from state_shape; backbone: backbone.make_*_head()
    image_size: int | None = None  # pixels per side; None: the model's native size (UNet sample_size x VAE factor)
    # sd3 / flux: T5 tokens per prompt; None: the family's default (SD3 256, FLUX 512)
    max_sequence_length: int | None = None
    log_flow_head: str = "compact"  # with heads: backbone: compact (ours, ~0.3 M) | dag (the DAG authors' ~6.5 M net)


@dataclass
class MethodConfig:
    name: str = "residual-nabla-db"  # a registered objective (`gfnalign list methods`)
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the objective (see the list below)


@dataclass
class BetaConfig:
    value: float = 1.0  # inverse temperature: log R = beta * r
    schedule: str = "constant"  # constant | linear (DAG: beta_e = beta * min(1, e / (fraction * E)))
    warmup_fraction: float = 0.5  # linear schedule: share of the epochs over which beta ramps up


@dataclass
class SamplingConfig:
    num_steps: int = 20  # denoising steps per trajectory
    guidance_scale: float = 1.0  # classifier-free guidance scale inside eps (1: no guidance)
    eta: float = 1.0  # noise level of the kernel (DDIM eta; Flow-GRPO's / CPS's a)
    # ddim | flow_sde | cps; None: the family's own (ddim for VP models, flow_sde for SD3/FLUX)
    kernel: str | None = None
    log_prob_reduction: str = "sum"  # how the rollout records log P_F: sum | mean over the latent
    batch_size: int = 8  # trajectories per sampling batch, per process
    batches_per_epoch: int = 2  # sampling batches per epoch and process
    # each drawn prompt is sampled this many times in a row within the epoch's trajectories of a process (the
    # group of grpo's per-prompt advantages; Flow-GRPO: 24); must divide batch_size * batches_per_epoch
    images_per_prompt: int = 1
    # "noise": x_start ~ N(0, I); "tilted": x_start ∝ N(0, I)·G(x_start) by resampling start_candidates proposals
    # with the objective's learned start value (removes the value-function bias; gfnalign.sampling.start)
    start: str = "noise"  # noise | tilted (see the comment above; tilted needs a learned start value)
    start_candidates: int = 8  # proposals per sample for the tilted start


@dataclass
class TrainingConfig:
    epochs: int = 10  # one epoch: sample, then train on the selected transitions
    micro_batch: int = 16  # transitions per forward/backward (rounded down to whole trajectories, at least one, for rtb)
    grad_accum: int = 1  # micro-batches per optimiser update
    lr: float = 1e-3  # policy (LoRA) learning rate
    lr_heads: float = 1e-3  # learning rate of the objective's heads (flow networks)
    weight_decay: float = 1e-4  # AdamW weight decay of the policy
    weight_decay_heads: float = 1e-4  # AdamW weight decay of the heads
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas, two numbers in [0, 1)
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_norm: float = 1.0  # per parameter group; <= 0 disables clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's autocast)
    max_updates_per_epoch: int | None = None  # cap on optimiser updates per epoch (None: all transitions)


@dataclass
class LookaheadConfig:
    mode: str = "cached"  # cached: r(x0_hat) of every state once at sampling; recompute: per transition
    model: str = "reference"  # which network predicts x0_hat for the forward-looking reward
    guided: bool = True  # use the CFG-guided x0_hat


@dataclass
class MemoryConfig:
    # activation memory one batched pass may use (lookahead x0_hat / decode / reward chunks, the terminal
    # decode); null: half of the memory free when training starts. Chunk sizes are derived from it and the
    # networks' measured bytes per row (gfnalign.training.memory).
    budget_gb: float | None = None
    checkpoint_decoder: bool = False  # recompute the VAE decoder's blocks in backward passes (∇r, reward-backprop)
    checkpoint_reward: bool = False  # the same for the reward's networks
    # turn on the denoiser's gradient checkpointing when one update part (a single transition, or a micro-batch
    # of an objective that is never cut) would need more activation memory than the budget
    auto_checkpointing: bool = True


@dataclass
class WandbConfig:
    project: str | None = None  # a W&B project enables tracking (needs the `wandb` extra); null: off
    entity: str | None = None  # W&B user or team (default: the logged-in user's)
    mode: str | None = None  # online | offline | disabled (null: wandb's default, e.g. $WANDB_MODE)


@dataclass
class LoggingConfig:
    log_every: int = 1  # updates between metrics.jsonl lines
    sample_every: int = 5  # epochs between sample grids (0: only before/after)
    grid_prompts: int = 8  # images in each sample grid
    checkpoint_every: int = 5  # epochs between checkpoints (the last epoch is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    tensorboard: bool = True  # TensorBoard events in RUN/tb
    progress: bool = True  # progress bars (main process only)
    report: bool = True  # before/after evaluation and report.md
    eval_samples: int = 32  # images before/after training for report.md
    wandb: WandbConfig = field(default_factory=WandbConfig)  # optional Weights & Biases mirror


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
    seed: int = 0  # seeds model/head init, sampling noise and transition selection (per rank, per epoch)
    run_name: str = "run"  # default run directory runs/<run_name>; shown in reports and W&B
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    reward: Any = "digit-alignment"  # a registered name, {name: ..., options}, 'module:function' or composite (docs/rewards.md)
    prompts: Any = "digits"  # digits | digits-all | animals | a txt/json/csv file | a list | {path: FILE, split options}
    method: MethodConfig = field(default_factory=MethodConfig)
    beta: BetaConfig = field(default_factory=BetaConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
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
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            reason = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{at} ({reason}); fix the file") from None
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
# Three layers, all before any model loads, each error one line naming the field, the value and the fix:
#   1. types, from the dataclass annotations (a new option gets its type check for free; floats finite);
#   2. per-field value rules (FIELD_RULES; extend with register_rule);
#   3. cross-field checks (CHECKS; extend with register_check): method and its options (built on a dummy
#      shape by the objective's own constructor), the reward spec (importable, callable, options known);
#   4. resources (RESOURCE_CHECKS, run by `gfnalign train` before any model loads, not by TrainConfig.load, so
#      presets that name files still load elsewhere): prompt files readable and non-empty, backbone folders.
# Allowed names come from the registries (objectives, rewards, prompt sets), never from fixed lists.


@dataclass(frozen=True)
class Rule:
    ok: Any  # Callable[[value], bool]
    allowed: str  # what is allowed, in words ("a number > 0")


FIELD_RULES: dict[str, Rule] = {}
CHECKS: list[Any] = []  # Callable[[TrainConfig], None], raising ConfigError
RESOURCE_CHECKS: list[Any] = []  # the same, for checks that read files


def register_rule(path: str, ok: Any, allowed: str) -> None:
    """Add (or replace) the value rule of field ``path`` (e.g. ``"sampling.num_steps"``)."""
    FIELD_RULES[path] = Rule(ok, allowed)


def register_check(check: Any) -> Any:
    """Add a whole-config check ``check(cfg)`` raising :class:`ConfigError`; usable as a decorator."""
    CHECKS.append(check)
    return check


def register_resource_check(check: Any) -> Any:
    """Add a check that reads files (prompt files, model folders); run by :func:`check_resources`."""
    RESOURCE_CHECKS.append(check)
    return check


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; use one of: {', '.join(allowed)}")


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} is not allowed; it must be a finite number {bound}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:400] + ("..." if len(text) > 400 else "")


# 1. types ------------------------------------------------------------------------------------------------
def _type_error(path: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{path}={value!r} is not allowed; it must be {want}")


def _check_value_type(path: str, value: Any, hint: Any) -> None:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        real = [h for h in options if h is not type(None)]
        if len(real) == 1:
            return _check_value_type(path, value, real[0])
        return  # a free-form union (Any-like): checked by its own rules
    if hint is Any or hint is object:
        return
    if value is None:
        raise _type_error(path, value, f"set ({_type_name(hint)}); null is not allowed here")
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(path, value, "true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, value, "an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, value, "a number")
        if not math.isfinite(value):
            raise _type_error(path, value, "a finite number (not NaN or infinity)")
    elif hint is str:
        if not isinstance(value, str):
            raise _type_error(path, value, "a string")
    elif origin is list:
        if not isinstance(value, list):
            raise _type_error(path, value, "a list")
        (item,) = typing.get_args(hint) or (Any,)
        for i, v in enumerate(value):
            _check_value_type(f"{path}[{i}]", v, item)
    elif origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, "a mapping")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _check_types(obj: Any, prefix: str) -> None:
    import typing

    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if path in _FREEFORM:
            continue
        if dataclasses.is_dataclass(value):
            _check_types(value, path + ".")
        else:
            _check_value_type(path, value, hints[f.name])


# 2. per-field value rules --------------------------------------------------------------------------------
def _gt0(v: Any) -> bool:
    return v > 0


def _ge0(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 <= v <= 1


for _path in ("backbone.lora_alpha", "sampling.num_steps", "sampling.guidance_scale", "sampling.batch_size",
              "sampling.batches_per_epoch", "training.epochs", "training.micro_batch", "training.grad_accum",
              "training.lr", "training.lr_heads", "training.adam_eps", "training.max_updates_per_epoch",
              "logging.log_every", "logging.grid_prompts", "logging.checkpoint_every", "logging.keep_checkpoints",
              "reliability.max_nan_streak", "reliability.reward_timeout_s"):
    register_rule(_path, _gt0, "> 0")
for _path in ("beta.value", "training.weight_decay", "training.weight_decay_heads", "logging.sample_every",
              "logging.eval_samples", "reliability.reward_wait_s"):
    register_rule(_path, _ge0, ">= 0")
register_rule("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)")
register_rule("run_name", lambda v: bool(v) and "/" not in v and "\\" not in v and v not in (".", ".."),
              "a non-empty name without slashes (it names the folder runs/<run_name>)")
register_rule("backbone.kind", lambda v: v in BACKBONE_KINDS, f"one of: {', '.join(BACKBONE_KINDS)}")
register_rule("backbone.dtype", lambda v: v in DTYPES, f"one of: {', '.join(DTYPES)}")
register_rule("backbone.heads", lambda v: v in ("backbone", "generic"), "one of: backbone, generic")
register_rule("backbone.max_sequence_length", lambda v: 0 < v <= 512, "an int in 1..512 (T5 tokens) or null")
register_rule("backbone.log_flow_head", lambda v: v in ("compact", "dag"),
              "one of: compact (ours, ~0.3 M), dag (the DAG authors' ~6.5 M net)")
register_rule("backbone.lora_rank", _ge0, ">= 0 (> 0 unless backbone.full_finetune: true)")
register_rule("backbone.lora_targets", lambda v: all(isinstance(x, str) and x.strip() for x in v),
              "a list of module names such as [to_q, to_k, to_v, to_out.0]")
register_rule("method.name", lambda v: bool(v), "a method name (see `gfnalign list`)")
register_rule("beta.schedule", lambda v: v in BETA_SCHEDULES, f"one of: {', '.join(BETA_SCHEDULES)}")
register_rule("beta.warmup_fraction", lambda v: 0 < v <= 1, "a number with 0 < fraction <= 1")
register_rule("sampling.eta", _gt0, "> 0 (ddim / cps: 0 < eta <= 1, 1 is DDPM's posterior; flow_sde: Flow-GRPO's a, "
              "e.g. 0.7)")
register_rule("sampling.kernel", lambda v: v in SAMPLER_KERNELS,
              f"one of: {', '.join(SAMPLER_KERNELS)}, or null for the model family's own")
register_rule("sampling.log_prob_reduction", lambda v: v in REDUCTIONS, f"one of: {', '.join(REDUCTIONS)}")
register_rule("sampling.start", lambda v: v in SAMPLING_STARTS, f"one of: {', '.join(SAMPLING_STARTS)}")
register_rule("sampling.start_candidates", _gt0, "> 0")
register_rule("sampling.images_per_prompt", _gt0, "> 0 (1: every trajectory draws its own prompt)")
register_rule("training.adam_betas", lambda v: len(v) == 2 and all(0 <= x < 1 for x in v),
              "two numbers in [0, 1), e.g. [0.9, 0.999]")
register_rule("training.mixed_precision", lambda v: v in MIXED_PRECISION, f"one of: {', '.join(MIXED_PRECISION)}")
register_rule("lookahead.mode", lambda v: v in LOOKAHEAD_MODES, f"one of: {', '.join(LOOKAHEAD_MODES)}")
register_rule("lookahead.model", lambda v: v in LOOKAHEAD_MODELS, f"one of: {', '.join(LOOKAHEAD_MODELS)}")
register_rule("reliability.on_bad_reward", lambda v: v in ON_BAD_REWARD, f"one of: {', '.join(ON_BAD_REWARD)}")
register_rule("logging.wandb.mode", lambda v: v in WANDB_MODES, f"one of: {', '.join(WANDB_MODES)} (or null)")
register_rule("reliability.max_skipped_epoch_fraction", _fraction,
              "a number in [0, 1] (the share of epochs that may be skipped for bad rewards)")


def _get(cfg: Any, path: str) -> tuple[bool, Any]:
    node = cfg
    for part in path.split("."):
        if not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def _check_rules(cfg: TrainConfig) -> None:
    for path, rule in FIELD_RULES.items():
        found, value = _get(cfg, path)
        if not found or value is None:
            continue
        try:
            ok = bool(rule.ok(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{path}={value!r} is not allowed; use {rule.allowed}")


# 3. whole-config checks ----------------------------------------------------------------------------------
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


@register_check
def _check_wandb(cfg: TrainConfig) -> None:
    w = cfg.logging.wandb
    for name in ("project", "entity"):
        value = getattr(w, name)
        if value is not None and not value.strip():
            raise ConfigError(f"logging.wandb.{name}={value!r} is not allowed; give a non-empty string or null")
    if w.project and w.mode != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:  # checked without importing it
            raise ConfigError(f"logging.wandb.project={w.project!r} needs the wandb package; "
                              "pip install 'gfnalign[wandb]' (or set logging.wandb.project: null)")


@register_check
def _check_backbone(cfg: TrainConfig) -> None:
    b = cfg.backbone
    if (b.kind in PIPELINE_KINDS or b.kind == "python") and not b.path:
        what = "'module:function'" if b.kind == "python" else "a diffusers folder or hub id"
        raise ConfigError(f"backbone.path={b.path!r} is not allowed for backbone.kind={b.kind}; give {what}")
    if b.kind in PIPELINE_KINDS:
        from gfnalign.backbones.families import resolve_family

        try:
            resolve_family(b.kind, b.path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if b.kind == "python" and ":" not in str(b.path):
        raise ConfigError(f"backbone.path={b.path!r} must look like 'package.module:function' for kind python")
    if b.image_size is not None and (isinstance(b.image_size, bool) or not isinstance(b.image_size, int)
                                     or b.image_size <= 0):
        raise ConfigError(f"backbone.image_size={b.image_size!r} must be a positive int (e.g. 1024 for SDXL) or null")
    if b.max_sequence_length is not None:
        family = b.kind
        if b.kind in PIPELINE_KINDS:
            from gfnalign.backbones.families import resolve_family

            family = resolve_family(b.kind, b.path)
        if family not in FLOW_KINDS + ("python",):
            raise ConfigError(f"backbone.max_sequence_length={b.max_sequence_length!r} is not allowed for "
                              f"backbone.kind={b.kind}: it sets the T5 prompt length of {' / '.join(FLOW_KINDS)}; "
                              "remove it")
    if b.log_flow_head != "compact" and b.heads != "backbone":
        raise ConfigError(f"backbone.log_flow_head={b.log_flow_head!r} sizes the backbone's head; it needs "
                          f"backbone.heads: backbone (got {b.heads!r})")
    if not b.full_finetune:
        if b.lora_rank <= 0:
            raise ConfigError(f"backbone.lora_rank={b.lora_rank!r} is not allowed; use > 0, or set "
                              "backbone.full_finetune: true")
        if not b.lora_targets:
            raise ConfigError("backbone.lora_targets=[] is not allowed; list module names such as to_q, to_k, "
                              "to_v, to_out.0")


@register_check
def _check_method(cfg: TrainConfig) -> None:
    methods = known_methods()
    if cfg.method.name not in methods:
        raise ConfigError(f"method.name={cfg.method.name!r} is not allowed; use one of: {', '.join(methods)}")
    accepted = _method_options(cfg.method.name)
    for key in cfg.method.options:
        if not isinstance(key, str):
            raise ConfigError(f"method.options key {key!r} must be a string (an option name)")
        if accepted and key not in accepted:
            raise ConfigError(f"method.options.{key}={cfg.method.options[key]!r} is not an option of method "
                              f"{cfg.method.name!r}; allowed: {', '.join(sorted(accepted))}")
    for key, value in cfg.method.options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"method.options.{key}={value!r} is not allowed; use a finite number")
    _try_build_objective(cfg)


def _try_build_objective(cfg: TrainConfig) -> None:
    """Construct the objective on a small dummy latent shape: its own constructor checks the option values."""
    try:
        import gfnalign.objectives  # noqa: F401
        from gfnalign.objectives.base import REGISTRY
        from gfnalign.objectives.base import build_objective as _build
        from gfnalign.training.build import _init_parameters
    except Exception:  # noqa: BLE001 - objectives not importable: the names were checked above
        return
    factory = REGISTRY.get(cfg.method.name)
    if factory is None:
        return
    accepted = _init_parameters(factory)
    dummy = {"eta": cfg.sampling.eta, "state_shape": (4, 4, 4), "cond_dim": 8, "num_train_timesteps": 1000}
    options = {k: v for k, v in dummy.items() if not accepted or k in accepted}
    options.update(cfg.method.options)
    try:
        _build(cfg.method.name, **options)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"method.options={dict(cfg.method.options)!r} rejected by method {cfg.method.name!r}: "
                          f"{_one_line(err)}") from None


@register_check
def _check_prompt_groups(cfg: TrainConfig) -> None:
    s = cfg.sampling
    per_epoch = s.batch_size * s.batches_per_epoch
    if s.images_per_prompt > 1 and per_epoch % s.images_per_prompt:
        raise ConfigError(f"sampling.images_per_prompt={s.images_per_prompt} does not divide the {per_epoch} trajectories "
                          f"of an epoch (sampling.batch_size {s.batch_size} x batches_per_epoch {s.batches_per_epoch}); "
                          "use a divisor or change the batch sizes")


@register_check
def _check_sampling_kernel(cfg: TrainConfig) -> None:
    """The noise level's range depends on the kernel; Flow-GRPO's SDE needs a rectified-flow model."""
    s, kind = cfg.sampling, cfg.backbone.kind
    if kind in PIPELINE_KINDS:  # "sd" detects the family from the folder's model_index.json
        try:
            from gfnalign.backbones.families import resolve_family

            kind = resolve_family(kind, cfg.backbone.path)
        except (ImportError, ValueError):
            pass
    kernel = s.kernel or ("flow_sde" if kind in FLOW_KINDS else "ddim")
    if kernel == "flow_sde" and kind not in FLOW_KINDS + ("python",):
        raise ConfigError(
            f"sampling.kernel='flow_sde' is not allowed with backbone.kind={kind}: Flow-GRPO's SDE is for "
            f"rectified-flow models ({', '.join(FLOW_KINDS)}); use ddim or cps"
        )
    if kernel == "flow_sde":
        if not s.eta > 0:
            raise ConfigError(f"sampling.eta={s.eta!r} is not allowed for the flow_sde kernel: use a noise level a > 0 "
                              "(Flow-GRPO: 0.7)")
    elif not 0 < s.eta <= 1:
        raise ConfigError(f"sampling.eta={s.eta!r} is not allowed for the {kernel} kernel: use 0 < eta <= 1 (the "
                          "forward kernel needs a density; 1 is DDPM's posterior)")


@register_check
def _check_memory(cfg: TrainConfig) -> None:
    mb = cfg.memory.budget_gb
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int | float) or not mb > 0):
        raise ConfigError(f"memory.budget_gb={mb!r} is not allowed; use a positive number of GB (e.g. 8) or null "
                          "(half of the free memory)")


@register_check
def _check_reward(cfg: TrainConfig) -> None:
    if cfg.reward in (None, ""):
        raise ConfigError("reward=None is not allowed; name a reward (see `gfnalign list`)")
    try:
        from gfnalign.rewards.registry import check_reward_spec
    except Exception:  # noqa: BLE001 - the rewards package is not importable: build_reward will say why
        return
    try:
        check_reward_spec(cfg.reward)
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"reward={cfg.reward!r} is not allowed: {_one_line(err)}") from None


@register_resource_check
def _check_backbone_path(cfg: TrainConfig) -> None:
    b = cfg.backbone
    if b.kind in DIGITS_KINDS and b.path is not None and not (Path(b.path).expanduser() / "model_index.json").is_file():
        raise ConfigError(f"backbone.path={b.path!r} is not a diffusers pipeline folder (no model_index.json); "
                          f"leave it null for the shipped {b.kind} model")
    if b.kind in PIPELINE_KINDS and b.path and (b.path.startswith((".", "/", "~")) or Path(b.path).expanduser().exists()):
        if not (Path(b.path).expanduser() / "model_index.json").is_file():
            raise ConfigError(f"backbone.path={b.path!r} is not a diffusers pipeline folder (no model_index.json); "
                              "give a folder saved with save_pretrained or a hub id")


@register_resource_check
def _check_prompts(cfg: TrainConfig) -> None:
    spec = cfg.prompts
    if spec in (None, ""):
        raise ConfigError("prompts=None is not allowed; name a prompt set or a prompt file (see `gfnalign list`)")
    if not isinstance(spec, str | dict | list):
        raise ConfigError(f"prompts={spec!r} is not allowed; give a prompt-set name, a file path or "
                          "{path: FILE, ...}")
    if isinstance(spec, list) and not all(isinstance(p, str) and p.strip() for p in spec):
        raise ConfigError(f"prompts={spec!r} is not allowed; a list of prompts must hold non-empty strings")
    try:
        from gfnalign.training.build import build_prompts

        prompt_set = build_prompts(cfg)
        n = len(list(getattr(prompt_set, "prompts", None) or prompt_set))
    except ImportError:
        return
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise ConfigError(f"prompts={spec!r} is not usable: {_one_line(err)}") from None
    if n == 0:
        raise ConfigError(f"prompts={spec!r} holds no prompts; give a file with at least one prompt")


def validate(cfg: TrainConfig) -> None:
    """Check every value that can be checked without loading a model. Raises :class:`ConfigError`."""
    _check_types(cfg, "")
    _check_rules(cfg)
    for check in CHECKS:
        check(cfg)


def check_resources(cfg: TrainConfig) -> None:
    """The file checks (prompt files, model folders): run before any model loads. Raises :class:`ConfigError`."""
    for check in RESOURCE_CHECKS:
        check(cfg)
