"""Turn a validated :class:`TrainConfig` into the four things the trainer drives.

``build_components`` loads the backbone (shipped digits model, UNet or flow, a Stable Diffusion 1.x/2.x or SDXL folder / hub
id (the family read from the folder's model_index.json, :mod:`gfnalign.backbones.families`), or any
``module:function`` returning an object with the backbone interface), the reward, the prompt set and the
objective (with heads shaped for the backbone). Keyword options are filtered against each factory's
signature, so factories only receive what they accept.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from gfnalign.training.config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Components:
    backbone: Any  # PolicyModel + encode_prompts / predict_x0 / decode / initial_noise / trainable_* ...
    reward: Any  # reward(images [N,3,H,W] in [0,1], prompts) -> [N]
    prompts: Any  # PromptSet with .sample(n, generator) and a list of prompts
    objective: Any  # objectives.base.Objective


def filter_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts (all of them when it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in sig.parameters}


def import_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"cannot import module {module!r} from {path!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def backbone_kwargs(cfg: TrainConfig, device: torch.device | str) -> dict[str, Any]:
    b = cfg.backbone
    return dict(
        num_inference_steps=cfg.sampling.num_steps,
        guidance_scale=cfg.sampling.guidance_scale,
        eta=cfg.sampling.eta,
        dtype=_DTYPES[b.dtype],
        device=device,
        lora_rank=b.lora_rank,
        lora_alpha=b.lora_alpha,
        lora_targets=list(b.lora_targets),
        full_finetune=b.full_finetune,
        gradient_checkpointing=b.gradient_checkpointing,
        **({} if b.image_size is None else {"image_size": b.image_size}),
        **({} if b.max_sequence_length is None else {"max_sequence_length": b.max_sequence_length}),
    )


def build_backbone(cfg: TrainConfig, device: torch.device | str) -> Any:
    kw = backbone_kwargs(cfg, device)
    kind = cfg.backbone.kind
    if kind == "digits":
        from gfnalign.backbones.digits import load_digits_backbone

        return with_kernel(load_digits_backbone(cfg.backbone.path, **kw), cfg)
    if kind == "digits-flow":
        from gfnalign.backbones.digits_flow import load_digits_flow_backbone

        return with_kernel(load_digits_flow_backbone(cfg.backbone.path, **kw), cfg)
    if kind in ("sd", "sdxl", "sd3", "flux"):
        from gfnalign.backbones.families import backbone_class

        fn = backbone_class(kind, cfg.backbone.path).from_pretrained
        return with_kernel(fn(cfg.backbone.path, **filter_kwargs(fn, kw)), cfg)
    fn = import_object(str(cfg.backbone.path))
    return with_kernel(fn(**filter_kwargs(fn, kw)), cfg)


def with_kernel(backbone: Any, cfg: TrainConfig) -> Any:
    """The backbone sampling with ``sampling.kernel`` when the config names one (else its family's own)."""
    if cfg.sampling.kernel is not None and backbone.schedule.kernel != cfg.sampling.kernel:
        backbone.schedule = backbone.schedule.with_kernel(cfg.sampling.kernel)
    backbone.schedule.check_noise_level(cfg.sampling.eta)
    return backbone


def build_reward(cfg: TrainConfig) -> Any:
    from gfnalign.rewards import build_reward as _build

    return _build(cfg.reward)


def build_prompts(cfg: TrainConfig) -> Any:
    return _load_prompt_spec(cfg.prompts)


def _load_prompt_spec(spec: Any) -> Any:
    """A name / path, a mapping with split options, or ``{"sets": [spec, ...]}`` (concatenated in order,
    each with its own split: the HPSv2 paper's photo + paintings with 10 held out per style)."""
    from gfnalign.rewards.prompts import PromptSet, load_prompts

    if isinstance(spec, dict) and "sets" in spec:
        extra = sorted(set(spec) - {"sets", "name"})
        if extra or not isinstance(spec["sets"], list) or not spec["sets"]:
            raise ValueError(f"prompts={spec!r}: a union is {{'sets': [spec, ...], 'name': optional}} with at least "
                             f"one spec{'; unknown keys: ' + ', '.join(extra) if extra else ''}")
        parts = [_load_prompt_spec(part) for part in spec["sets"]]
        cats = [c for p in parts for c in (p.categories or (None,) * len(p))]
        return PromptSet(spec.get("name") or "+".join(p.name for p in parts), tuple(x for p in parts for x in p.prompts),
                         tuple(cats) if any(c is not None for c in cats) else None)
    if isinstance(spec, dict):  # {"path": FILE, "skip_first_per_category": 2, ...}: the papers' held-out splits
        options = dict(spec)
        source = options.pop("path", None) or options.pop("name", None)
        if source is None:
            raise ValueError(f"prompts={spec!r}: a prompt-set mapping needs 'path' (a file) or 'name' (a built-in)")
        try:
            return load_prompts(source, **options)
        except TypeError as err:
            raise ValueError(
                f"prompts={spec!r}: {err}; allowed keys: path/name, column, skip_first, "
                "skip_first_per_category, exclude_categories"
            ) from None
    return load_prompts(spec)


def _init_parameters(factory: Any) -> set[str]:
    """Keyword names accepted along a class's ``__init__`` chain (or a function's signature)."""
    names: set[str] = set()
    for klass in getattr(factory, "__mro__", (factory,)):
        init = klass.__dict__.get("__init__") if isinstance(factory, type) else klass
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            continue
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    names.discard("self")
    return names


def objective_options(cfg: TrainConfig, backbone: Any) -> dict[str, Any]:
    """The options the trainer passes to every objective (shapes of the backbone, sampling settings).

    ``sampling.log_prob_reduction`` is only how the rollout *records* log P_F (objectives convert it
    exactly); each objective keeps its own reduction default (``sum`` for the GFlowNets, ``mean`` for
    DDPO's tiny PPO clip range) unless ``method.options.log_prob_reduction`` says otherwise.
    """
    options: dict[str, Any] = {"eta": cfg.sampling.eta}
    shape = getattr(backbone, "latent_shape", None)
    if shape is not None:
        options["state_shape"] = tuple(int(s) for s in shape)
    cond_dim = getattr(backbone, "cond_dim", None)
    if cond_dim is None and hasattr(backbone, "encode_prompts"):
        with torch.no_grad():
            c = backbone.encode_prompts([""])
        if isinstance(c, torch.Tensor):
            cond_dim = int(c.shape[-1])
    if cond_dim is not None:
        options["cond_dim"] = int(cond_dim)
    schedule = getattr(backbone, "schedule", None)
    if schedule is not None:
        options["num_train_timesteps"] = int(schedule.alphas_cumprod.shape[0])
    return options


def build_objective(cfg: TrainConfig, backbone: Any) -> Any:
    import gfnalign.objectives  # noqa: F401  (fills the registry)
    from gfnalign.objectives.base import REGISTRY
    from gfnalign.objectives.base import build_objective as _build

    factory = REGISTRY.get(cfg.method.name)
    if factory is None:
        return _build(cfg.method.name)  # raises the named error
    accepted = _init_parameters(factory)
    unknown = sorted(set(cfg.method.options) - accepted) if accepted else []
    if unknown:
        raise ValueError(
            f"method.options.{unknown[0]}={cfg.method.options[unknown[0]]!r} is not an option of method "
            f"{cfg.method.name!r}; it accepts: {', '.join(sorted(accepted))}"
        )
    options = {k: v for k, v in objective_options(cfg, backbone).items() if not accepted or k in accepted}
    options.update(cfg.method.options)
    if cfg.backbone.heads == "backbone":
        for kwarg, maker in (("log_flow_head", "make_log_flow_head"), ("flow_score_head", "make_flow_score_head")):
            if kwarg in accepted and kwarg not in options and hasattr(backbone, maker):
                layout = {"layout": cfg.backbone.log_flow_head} if kwarg == "log_flow_head" else {}
                options[kwarg] = getattr(backbone, maker)(**layout)
    return _build(cfg.method.name, **options)


def build_components(cfg: TrainConfig, device: torch.device | str, *, reward: Any = None,
                     prompts: Any = None) -> Components:
    """Everything model-shaped. Seed the global RNG before calling so head / LoRA inits agree across ranks.

    ``reward`` / ``prompts``: objects built by the caller (the Python API) used instead of the config's specs."""
    backbone = build_backbone(cfg, device)
    reward = build_reward(cfg) if reward is None else reward
    prompts = build_prompts(cfg) if prompts is None else prompts
    objective = build_objective(cfg, backbone)
    return Components(backbone=backbone, reward=reward, prompts=prompts, objective=objective)
