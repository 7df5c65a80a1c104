"""The Python API: the same objects the ``gfnalign`` command line drives, callable from user code.

::

    import gfnalign

    cfg = gfnalign.load_config("digits-dag-db", {"training.epochs": 2})   # a preset, a YAML file or a dict
    result = gfnalign.train(cfg, out="runs/dag")                            # -> TrainResult(run_dir, metrics, ...)
    samples = gfnalign.sample(result.run_dir, prompts=["a handwritten digit seven"], n=4)
    report = gfnalign.evaluate(result.run_dir, samples=8)                  # reward, diversity, prior drift

Custom pieces plug in from Python: ``train(cfg, reward=my_reward, prompts=[...])`` takes any reward object
or ``f(images, prompts) -> scores`` and any list of prompts; :func:`register_objective` and
:func:`register_reward` make a new method or reward usable by name (``method.name`` / ``reward`` in a
config), exactly like the built-ins. :func:`train_toy` proves an objective on the analytic toy world.

Layering: this module sits above ``training/`` and ``evaluation/`` and below ``cli/`` (the CLI commands
parse arguments and call these functions). Heavy imports happen inside the functions, so ``import
gfnalign`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import torch

    from gfnalign.training.config import TrainConfig

_PACKAGE = Path(__file__).resolve().parent
PACKAGED_CONFIGS = _PACKAGE / "configs"
REPO_CONFIGS = _PACKAGE.parents[1] / "configs"


# ---------------------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------------------
class ArgumentError(ValueError):
    """A bad argument of :func:`sample` / :func:`evaluate` / :func:`train`, raised before any model loads.

    ``name`` is the Python argument (``batch_size``); the command line reports the same error under its flag
    (``--batch-size``) with :meth:`named`.
    """

    def __init__(self, name: str, value: Any, fix: str):
        self.name, self.value, self.fix = name, value, fix
        super().__init__(self.named(name))

    def named(self, label: str) -> str:
        return f"{label}={self.value!r} is not allowed; {self.fix}"


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be None or an integer >= ``minimum`` (a bool is not a count)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ArgumentError(name, value, f"use an integer >= {minimum}")


# ---------------------------------------------------------------------------------------------------------
# configs and presets
# ---------------------------------------------------------------------------------------------------------
def preset_dirs() -> list[Path]:
    """Folders searched for presets: the package's own copies first, then a source checkout's ``configs/``
    and ``./configs``."""
    return [d for d in (PACKAGED_CONFIGS, REPO_CONFIGS, Path.cwd() / "configs") if d.is_dir()]


def list_presets() -> dict[str, Path]:
    """Every shipped preset, name -> YAML file (``gfnalign list presets``)."""
    out: dict[str, Path] = {}
    for d in preset_dirs():
        for f in sorted(d.glob("*.yaml")):
            out.setdefault(f.stem, f)
    return out


def find_preset(name: str) -> Path | None:
    """A preset's file by name (``digits-dag-db``) or file name (``digits-dag-db.yaml``); None if unknown."""
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith(".yaml") else stem
    return list_presets().get(stem)


def _override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def load_config(
    source: str | Path | Mapping[str, Any] | TrainConfig | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> TrainConfig:
    """Build and validate a :class:`~gfnalign.training.config.TrainConfig`.

    Args:
        source: ``None`` (every default), ``"demo"`` (the embedded config of ``gfnalign demo``), a preset
            name (``"digits-dag-db"``, see :func:`list_presets`), a YAML file, a nested dict with the
            layout of a config file, or an existing ``TrainConfig`` (copied).
        overrides: dotted keys applied on top, either ``{"training.epochs": 2, "method.options.fraction":
            0.5}`` (values used as given) or ``["training.epochs=2"]`` strings (values parsed as YAML, as
            ``--set`` does).

    Raises:
        ConfigError: a bad value, naming the field, the value and what is allowed (before any model loads).
    """
    from gfnalign.training.config import ConfigError, TrainConfig, apply_overrides

    items = _override_list(overrides)
    if isinstance(source, TrainConfig):
        return TrainConfig.from_dict(apply_overrides(source.to_dict(), items))
    if source is None:
        return TrainConfig.from_dict(apply_overrides({}, items))
    if isinstance(source, Mapping):
        return TrainConfig.from_dict(apply_overrides(dict(source), items))
    if str(source) == "demo":
        from gfnalign.training.presets import DEMO

        return TrainConfig.from_dict(apply_overrides(DEMO, items))
    path = Path(source)
    if not path.is_file():
        preset = find_preset(str(source))
        if preset is None:
            raise ConfigError(f"config {str(source)!r} is neither a YAML file nor a preset name; presets: "
                              f"demo, {', '.join(list_presets())}")
        path = preset
    return TrainConfig.load(path, items)


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------
def register_objective(name: str, factory: Callable[..., Any] | None = None) -> Any:
    """Make an objective usable as ``method.name: NAME`` (also as a class decorator).

    ``factory(**options)`` must return a :class:`gfnalign.objectives.Objective`; it receives the entries of
    ``method.options`` plus those of ``state_shape``, ``cond_dim``, ``num_train_timesteps`` and ``eta``
    that its signature accepts (see docs/writing-an-objective.md for the contract and the toy proof)::

        @gfnalign.register_objective("my-db")
        class MyDB(TransitionObjective): ...
    """
    from gfnalign.objectives.base import REGISTRY, register

    if not isinstance(name, str) or not name:
        raise ValueError(f"objective name must be a non-empty string, got {name!r}")

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise TypeError(f"register_objective({name!r}): expected a class or factory function, got {f!r}")
        existing = REGISTRY.get(name)
        if existing is not None and existing is not f and getattr(existing, "__module__", "").startswith("gfnalign."):
            raise ValueError(f"objective name {name!r} is a built-in method; choose another name")
        return register(name)(f)

    return deco if factory is None else deco(factory)


def register_reward(
    name: str,
    target: Any = None,
    *,
    differentiable: bool,
    inputs: str = "image",
    description: str = "",
    overwrite: bool = False,
) -> Any:
    """Make a reward usable as ``reward: NAME`` (also as a class decorator).

    ``target`` is a :class:`gfnalign.rewards.Reward` subclass (options in a config mapping go to its
    constructor), any factory returning a ``Reward``, or a ``"module:attr"`` string. ``inputs`` is
    ``"image"`` or ``"image+prompt"``. See docs/writing-a-reward.md.
    """
    from gfnalign.rewards import register_reward as _register

    def deco(t: Any) -> Any:
        _register(name, t, differentiable=differentiable, inputs=inputs, description=description,
                  overwrite=overwrite)
        return t

    return deco if target is None else deco(target)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
class RunExistsError(ValueError):
    """The run directory already holds checkpoints and no resume was asked for."""


def check_output_dir(run_dir: Path) -> None:
    """``run_dir`` must be a folder we can create and write (checked before any model loads)."""
    import os

    from gfnalign.training.config import ConfigError

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a folder; choose another --out")
    parent = run_dir if run_dir.exists() else next((p for p in run_dir.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(run_dir)!r} cannot be created or written here (no write permission on "
                          f"{str(parent)!r}); choose another --out")


def check_run(config: TrainConfig, out: str | Path | None = None) -> Path:
    """The checks that read the file system, before any model loads: the config's files (prompt files, model
    folders; :func:`~gfnalign.training.config.check_resources`) and the run directory. Returns the run
    directory (``out``, default ``runs/<run_name>``). ``gfnalign train --validate-only`` runs exactly this.

    Raises:
        ConfigError: naming the field or ``--out``, the value and the fix.
    """
    from gfnalign.training.config import check_resources

    check_resources(config)
    run_dir = Path(out) if out is not None else Path("runs") / config.run_name
    check_output_dir(run_dir)
    return run_dir


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run directory (``config.yaml``, ``metrics.jsonl``, ``samples/``, ``checkpoints/``,
            ``final/``, ``report.md``).
        metrics: the last row of ``metrics.jsonl`` (``step``, ``reward/mean``, ``loss/total``, ...); empty
            when no update ran.
        before / after: the before/after evaluation written for ``report.md`` (``reward_mean``,
            ``reward_std``, ``diversity``, ``prior_drift``, ...); None when ``logging.report`` is off.
        final_dir: ``run_dir / "final"`` (the diffusers-loadable LoRA) when training finished, else None.
        interrupted: True when training stopped early with a checkpoint (signal or ``stop_after_updates``).
    """

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    final_dir: Path | None = None
    interrupted: bool = False


def reward_spec_of(reward: Any) -> str:
    """The name a reward object (a :class:`~gfnalign.rewards.Reward` or a function) is recorded under in a
    run's ``config.yaml``: its import path ``module:qualname`` (of its class, for an instance).

    A function or class that imports back to itself is recorded as is. Anything else (an instance, whose
    options a path cannot carry, or a class defined in a notebook cell, an ``exec``'d snippet or a function
    body) is also registered under that path in this process's reward registry, so a config naming it
    validates and builds the very same object here. In another process the path builds the class with its
    default arguments when it is importable; otherwise give the reward again (``evaluate(run, reward=...)``).
    """
    from gfnalign.rewards import build_reward
    from gfnalign.rewards.registry import _import_target, register_reward

    target = reward if isinstance(reward, type) or not isinstance(reward, _reward_base()) and hasattr(
        reward, "__qualname__") else type(reward)
    spec = f"{getattr(target, '__module__', None) or 'python'}:{getattr(target, '__qualname__', type(reward).__name__)}"
    if target is reward:
        try:
            if _import_target(spec, "reward") is reward:
                return spec
        except ValueError:
            pass
    built = build_reward(reward)
    register_reward(spec, lambda: built, differentiable=bool(getattr(built, "differentiable", False)),
                    inputs=getattr(built, "inputs", "image"), description="a reward object given in Python",
                    overwrite=True)
    return spec


def _reward_base() -> type:
    from gfnalign.rewards.base import Reward

    return Reward


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def last_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The last row of ``RUN/metrics.jsonl`` ({} when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def train(
    config: str | Path | Mapping[str, Any] | TrainConfig,
    *,
    reward: Any = None,
    prompts: Any = None,
    out: str | Path | None = None,
    resume: str | None = None,
    stop_after_updates: int | None = None,
) -> TrainResult:
    """Train one run and return where it went and how it ended.

    Args:
        config: anything :func:`load_config` accepts.
        reward: overrides ``config.reward`` with a :class:`gfnalign.rewards.Reward`, any
            ``f(images [N,3,H,W] in [0,1], prompts) -> [N]`` (wrapped, non-differentiable), or a spec
            (a name, a mapping, ``"module:function"``). ``config.yaml`` records an object's import path.
        prompts: overrides ``config.prompts`` with a list of strings, a
            :class:`gfnalign.rewards.PromptSet` or a spec (``"digits"``, a txt/json/csv file).
        out: the run directory (default ``runs/<run_name>``).
        resume: ``"latest"`` or a checkpoint folder, to continue an interrupted run.
        stop_after_updates: stop (with a checkpoint) after this many optimiser updates.

    Raises:
        ConfigError: a bad config value, an unreadable prompt file or model folder, an unwritable ``out``
            (before any model loads).
        ArgumentError: a bad ``stop_after_updates``.
        RunExistsError: ``out`` already holds checkpoints and ``resume`` is not given.
        CheckpointError: the checkpoint to resume from is unreadable or of another model.
        NanLossError / BadRewardError / TrainingFailedError: the run stopped on non-finite losses or bad
            rewards (``reliability.*``), or trained nothing; the last checkpoint is intact.
        RewardUnavailableError: the reward service stayed unreachable longer than
            ``reliability.reward_wait_s``; a checkpoint was saved, ``resume="latest"`` continues.
    """
    from gfnalign.training.config import TrainConfig

    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    cfg = load_config(cfg)  # a private, validated copy: the caller's object is never mutated
    reward_obj = prompts_obj = None
    if reward is not None:
        if isinstance(reward, str | Mapping):
            cfg.reward = reward if isinstance(reward, str) else dict(reward)
        elif isinstance(reward, type):  # a Reward class: built from its path, like a name in a config
            cfg.reward = reward_spec_of(reward)
        else:
            from gfnalign.rewards import build_reward

            reward_obj = build_reward(reward)
            cfg.reward = reward_spec_of(reward)
    if prompts is not None:
        if isinstance(prompts, str | Path | Mapping):
            cfg.prompts = str(prompts) if isinstance(prompts, Path) else prompts
        else:
            from gfnalign.rewards.prompts import load_prompts

            prompts_obj = load_prompts(prompts)
            cfg.prompts = [str(p) for p in prompts_obj]
    cfg = load_config(cfg)  # validate what the overrides made
    check_count("stop_after_updates", stop_after_updates)

    run_dir = check_run(cfg, out)
    from gfnalign.training import checkpoint as ckpt

    if not resume and ckpt.latest_checkpoint(run_dir / "checkpoints") is not None:
        raise RunExistsError(f"{run_dir} already holds checkpoints; pass --resume latest (resume=\"latest\") to "
                             "continue it or choose another --out")

    from gfnalign.training.build import build_components
    from gfnalign.training.trainer import Trainer

    def components(c: TrainConfig, device: Any) -> Any:
        return build_components(c, device, reward=reward_obj, prompts=prompts_obj)

    trainer = Trainer(cfg, run_dir, components=components, resume=resume, stop_after_updates=stop_after_updates)
    trainer.train()
    final = run_dir / "final"
    finished = trainer.epoch >= cfg.training.epochs
    return TrainResult(
        run_dir=run_dir,
        metrics=last_metrics(run_dir),
        before=_read_json(run_dir / "eval_before.json"),
        after=_read_json(run_dir / "eval_after.json") if finished else None,
        final_dir=final if finished and final.is_dir() else None,
        interrupted=not finished,
    )


# ---------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    """``images``: [N,3,H,W] float in [0,1] (CPU); ``prompts``: the N prompts in the same order;
    ``files``: the PNG files written (empty without ``out``)."""

    images: torch.Tensor
    prompts: list[str]
    files: list[Path] = field(default_factory=list)


def _adapter_file(folder: Path) -> Path:
    return folder / "pytorch_lora_weights.safetensors"


def sample(
    run: str | Path | None = None,
    *,
    lora: str | Path | None = None,
    base: str | None = None,
    pretrained: bool = False,
    prompts: Sequence[str] | str | None = None,
    n: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    out: str | Path | None = None,
    device: str | None = None,
) -> SampleResult:
    """Sample images from a run (its ``config.yaml`` and ``final/`` LoRA) or from a LoRA folder.

    Args:
        run: a run directory written by :func:`train` / ``gfnalign train``.
        lora: instead of ``run``, a LoRA folder (``final/`` of a run or any diffusers LoRA folder); its
            ``training_config.yaml`` gives the base model when present, else ``base`` or the digits model.
        base: base pipeline (folder or hub id) for a ``lora`` without ``training_config.yaml``.
        pretrained: sample the base model (adapters off).
        prompts: a list of prompts, or a prompt set / file spec (default: the run's prompts, each once).
        n: images per prompt. steps / guidance: override the run's sampling settings.
        out: when given, write one PNG per image and ``grid.png`` there.
        device: ``cpu``, ``cuda`` ... (default: cuda when available).

    Raises (all before any model loads, except the weights checks, which run when the LoRA is read):
        ArgumentError: a bad count, guidance, prompt or ``out``.
        FileNotFoundError: the run's config or the LoRA file is missing.
        WeightsError: the LoRA file is truncated, corrupt, of another model or holds NaN/inf weights.
        ConfigError: the run's ``config.yaml`` is not a valid config.
    """
    import math

    import torch

    from gfnalign.sampling import rollout
    from gfnalign.training.build import build_backbone
    from gfnalign.training.config import TrainConfig
    from gfnalign.training.trainer import prompt_list
    from gfnalign.training.weights import load_into

    if (run is None) == (lora is None):
        raise ArgumentError("run", run, "pass exactly one of run (a run directory) or lora (a LoRA folder)")
    check_count("n", n)
    check_count("batch_size", batch_size)
    check_count("steps", steps)
    check_count("seed", seed, minimum=0)
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, int | float)
                                 or not (math.isfinite(guidance) and guidance > 0)):
        raise ArgumentError("guidance", guidance, "use a finite number > 0")
    if isinstance(prompts, list | tuple):
        if not prompts:
            raise ArgumentError("prompts", prompts, "give at least one prompt (or None for the run's prompts)")
        bad = next((p for p in prompts if not isinstance(p, str) or not p.strip()), None)
        if bad is not None:
            raise ArgumentError("prompts", bad, "give a non-empty prompt")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ArgumentError("out", str(out), "it is a file; give a folder")
    if run is not None:
        cfg_file, adapter = Path(run) / "config.yaml", Path(run) / "final"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found; --run must be a gfnalign run directory")
        cfg = _config_for_sampling(cfg_file)
    else:
        adapter = Path(lora)
        if not _adapter_file(adapter).is_file() and not pretrained:
            raise FileNotFoundError(f"{_adapter_file(adapter)} not found")
        cfg_file = adapter / "training_config.yaml"
        cfg = _config_for_sampling(cfg_file) if cfg_file.is_file() else TrainConfig()
        if base:
            cfg.backbone.kind, cfg.backbone.path = "sd", base
    if steps is not None:
        cfg.sampling.num_steps = steps
    if guidance is not None:
        cfg.sampling.guidance_scale = guidance
    if isinstance(prompts, list | tuple):
        texts = [str(p) for p in prompts]
    else:
        from gfnalign.rewards.prompts import load_prompts

        texts = list(dict.fromkeys(prompt_list(load_prompts(prompts or cfg.prompts))))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build_backbone(cfg, device)
    if not pretrained:
        if not _adapter_file(adapter).is_file():
            raise FileNotFoundError(f"no LoRA at {adapter} (train first, or pass --pretrained)")
        load_into(backbone, adapter)
    gen = torch.Generator(device=device).manual_seed(seed)
    todo = [p for p in texts for _ in range(n)]
    images = []
    with torch.no_grad():
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            cond = backbone.encode_prompts(chunk)
            traj = rollout(backbone, cond, backbone.initial_noise(len(chunk), gen), eta=cfg.sampling.eta,
                           generator=gen)
            images.append(backbone.decode(traj.final).float().cpu())
    result = SampleResult(torch.cat(images), todo)
    if out is not None:
        result.files = save_images(result.images, todo, out, cols=n)
    return result


def _config_for_sampling(path: Path) -> TrainConfig:
    """A run's config, read for sampling: sampling never scores, so the run's reward is set aside (a reward
    object that exists only in the training process would otherwise fail the config's checks here)."""
    from gfnalign.training.config import TrainConfig

    return TrainConfig.load(path, [f"reward={json.dumps(TrainConfig().reward)}"])


def save_images(images: torch.Tensor, prompts: Sequence[str], out: str | Path, *, cols: int = 4) -> list[Path]:
    """Write ``images`` [N,3,H,W] in [0,1] as numbered PNG files named after their prompts, plus
    ``grid.png`` (``cols`` per row, prompts as captions); returns the PNG files."""
    from PIL import Image

    from gfnalign.training.report import save_grid, to_uint8

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (arr, p) in enumerate(zip(to_uint8(images), prompts)):
        slug = "".join(c if c.isalnum() else "_" for c in p)[:40]
        path = folder / f"{i:04d}_{slug}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
    save_grid(images, list(prompts), folder / "grid.png", cols=cols)
    return files


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def prompt_texts(prompt_set: Any) -> list[str]:
    """The prompts of a prompt set (``load_prompts``' result), a list, or any iterable of strings, in order."""
    for attr in ("prompts", "texts"):
        value = getattr(prompt_set, attr, None)
        if isinstance(value, list | tuple) and value:
            return [str(v) for v in value]
    if isinstance(prompt_set, list | tuple):
        return [str(v) for v in prompt_set]
    try:
        return [str(v) for v in list(prompt_set)]
    except TypeError as err:
        raise ValueError(f"cannot list the prompts of {prompt_set!r}; pass --prompts with a file or set name") from err


def load_weights(backbone: Any, folder: str | Path) -> None:
    """Load a diffusers-format LoRA folder (``final/``) or a trainer checkpoint (``checkpoints/step_N``).

    Raises:
        WeightsError: the folder is missing, a file is truncated or corrupt, the weights are of another model
            (rank, targets, architecture) or not finite. Nothing in a file is executed (safetensors, and
            ``torch.load(weights_only=True)`` for checkpoints).
        CheckpointError: a checkpoint's ``trainable.pt`` is not a plain tensor file.
    """
    from gfnalign.training.weights import load_into

    load_into(backbone, Path(folder))


def _auto_features(kind: str) -> str:
    from gfnalign.evaluation.features import dreamsim_available
    from gfnalign.training.config import DIGITS_KINDS

    if kind in DIGITS_KINDS:  # the shipped digits worlds share the classifier's features
        return "digits"
    if dreamsim_available():
        return "dreamsim"
    print("note: no local CLIP/DreamSim weights given; measuring diversity and drift in pixel space "
          "(pass --features clip:PATH for a semantic feature space)")
    return "pixels:16"


def evaluate(
    run: str | Path | None = None,
    *,
    config: str | Path | Mapping[str, Any] | TrainConfig | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    lora: str | Path | None = None,
    samples: int = 16,
    prompts: Any = None,
    max_prompts: int | None = None,
    reward: Any = None,
    extra_rewards: Sequence[Any] = (),
    features: str = "auto",
    metric: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    floor: bool = True,
) -> dict[str, Any]:
    """Reward, diversity and prior drift of a fine-tuned model against its pretrained model.

    Samples ``samples`` images per prompt with the fine-tuned and the pretrained model from the same noise.
    Returns the dict documented in :mod:`gfnalign.evaluation.evaluate` (``reward_mean``, ``reward_std``,
    ``diversity``, ``prior_drift``, ``pretrained``, ``rewards`` ...) plus ``run``, ``lora``, ``method``,
    ``backbone``, ``num_steps`` and ``guidance_scale``. :func:`markdown_report` formats it.

    Args:
        run: a run directory (its ``config.yaml``; the LoRA in ``run/final`` unless ``lora`` says otherwise).
        config: a config instead of ``run/config.yaml`` (anything :func:`load_config` accepts).
        overrides: dotted overrides of the config, as in :func:`load_config`.
        lora: an adapter folder or trainer checkpoint; ``"none"`` evaluates the pretrained model alone.
        prompts: a prompt list or spec (default: the config's); ``max_prompts`` keeps the first K.
        reward: replaces the config's reward (an object or a spec); ``extra_rewards`` are also reported.
        features: ``auto``, ``digits``, ``clip:PATH``, ``dreamsim[:CACHE]``, ``pixels[:S]``.
        metric: ``cosine`` or ``l2`` (default: the feature space's own).
        floor: also measure the pretrained-vs-pretrained drift floor.

    Raises (before any model loads, except the weights checks):
        ArgumentError: a bad count, or a ``lora`` folder that does not exist.
        FileNotFoundError: ``run`` holds no ``config.yaml``.
        ConfigError: a bad config or override.
        WeightsError / CheckpointError: see :func:`load_weights`.
    """
    import torch

    from gfnalign.evaluation.evaluate import evaluate_backbone
    from gfnalign.evaluation.features import build_features
    from gfnalign.rewards import build_reward as build_any_reward
    from gfnalign.rewards.prompts import load_prompts
    from gfnalign.training.build import build_backbone, build_reward
    from gfnalign.training.config import TrainConfig

    if run is None and config is None:
        raise ArgumentError("run", run, "pass a run directory (or a config together with a lora folder)")
    check_count("samples", samples, minimum=2)  # diversity needs pairs
    check_count("batch_size", batch_size)
    check_count("max_prompts", max_prompts)
    check_count("seed", seed, minimum=0)
    if lora is not None and str(lora) != "none" and not Path(lora).is_dir():
        raise ArgumentError("lora", str(lora), "the folder does not exist; pass RUN/final, RUN/checkpoints/step_N "
                                               "or none")
    items = _override_list(overrides)
    if reward is not None:  # replaces the run's reward before its config is checked (it may not import here)
        spec = reward if isinstance(reward, str | Mapping) else reward_spec_of(reward)
        items.append(f"reward={json.dumps(spec if isinstance(spec, str) else dict(spec))}")
    if config is None:
        cfg_path = Path(run) / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found; --run must be a directory written by `gfnalign train`")
        cfg = TrainConfig.load(cfg_path, items)
    else:
        cfg = load_config(config, items)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    adapter = lora if lora is not None else (Path(run) / "final" if run is not None else None)
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, dev)
    if adapter is not None and str(adapter) != "none":
        load_weights(backbone, Path(adapter))

    main_reward = build_any_reward(reward) if reward is not None and not isinstance(reward, type) else build_reward(cfg)
    rewards = [main_reward] + [build_any_reward(spec) for spec in extra_rewards]
    texts = prompt_texts(load_prompts(prompts if prompts is not None else cfg.prompts))
    texts = list(dict.fromkeys(texts))
    if max_prompts is not None:
        texts = texts[:max_prompts]
    feat_spec = _auto_features(cfg.backbone.kind) if features == "auto" else features
    feature_fn = build_features(feat_spec, device=dev)

    result = evaluate_backbone(
        backbone, texts, rewards, feature_fn, samples_per_prompt=samples, seed=seed,
        batch_size=batch_size, eta=cfg.sampling.eta, metric=metric, floor=floor,
    )
    result.update({
        "run": str(run) if run is not None else None,
        "lora": None if adapter is None else str(adapter),
        "method": cfg.method.name,
        "backbone": cfg.backbone.kind,
        "num_steps": cfg.sampling.num_steps,
        "guidance_scale": cfg.sampling.guidance_scale,
    })
    return result


def markdown_report(result: Mapping[str, Any], title: str = "Evaluation") -> str:
    """The markdown section ``gfnalign eval`` prints for an :func:`evaluate` result."""
    from gfnalign.evaluation.evaluate import markdown_report as _markdown

    return _markdown(dict(result), title=title)


# ---------------------------------------------------------------------------------------------------------
# the analytic toy world
# ---------------------------------------------------------------------------------------------------------
def train_toy(
    method: str,
    *,
    mixture: Mapping[str, Any],
    reward: Mapping[str, Any],
    beta: float,
    steps: int | None = None,
    seed: int = 0,
    samples: int = 100_000,
    options: Mapping[str, Any] | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the analytic Gaussian-mixture world with ``method`` and compare it with the exact target.

    The Python form of ``gfnalign toy`` (DESIGN.md §6); works for registered custom objectives too.

    Args:
        method: a built-in or registered objective.
        mixture: ``{"weights": [...], "means": [[...], ...], "stds": [...]}`` (or ``"covs"``).
        reward: ``{"type": "linear", "a": [...]}``, ``{"type": "quadratic", "center": [...], "scale": s}``
            or ``{"type": "log_ratio", "target": MIXTURE}``.
        beta: inverse temperature, target ∝ p(x)·exp(β·r(x)).
        steps: training updates (default: the method's default).
        samples: evaluation samples per distribution.
        options: loop options (``lr``, ``batch_size``, ``prior_in_reward`` ...) and ``{"objective": {...}}``.

    Returns:
        the OUT.json dict: ``mode_mass_tv``, ``energy_distance``, ``energy_distance_floor``, ``mode_mass``,
        ``reward_mean``, the ``*_oracle`` floor of the tilted problem, ``train_seconds`` ...
    """
    from gfnalign.toy.mixture import GaussianMixture
    from gfnalign.toy.rewards import reward_from_spec
    from gfnalign.toy.train import run_toy

    mix = GaussianMixture.from_spec(dict(mixture), source="mixture")
    toy_reward = reward_from_spec(dict(reward), mix.dim, source="reward")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be a positive number")
    return run_toy(method, mix, toy_reward, float(beta), steps=steps, seed=seed, samples=samples,
                   config=dict(options or {}), log=log)
