"""What every diffusers latent-diffusion backbone shares: the base class and its loading helpers.

:class:`LatentDiffusionBackbone` is a :class:`gfnalign.core.protocols.PolicyModel` over a denoiser
(``self.unet``), an ``AutoencoderKL`` and one or more frozen text encoders. It owns everything that does
not depend on how a family conditions its denoiser:

* the noise schedule from the scheduler *config* (:func:`schedule_from_scheduler_config`), image/latent
  sizes, dtype placement (frozen base weights in fp32/bf16/fp16, LoRA in float32; a float16 VAE whose config
  says ``force_upcast`` runs in float32, because SDXL's VAE overflows in float16);
* LoRA through peft on the denoiser, ``reference()`` (adapters disabled, or a frozen copy for
  ``full_finetune``), gradient checkpointing;
* the guided ``eps`` (classifier-free guidance: one denoiser call over the uncond and cond rows), ``cond_eps``,
  ``predict_x0``, ``decode`` (latents → images in [0, 1], honouring ``shift_factor`` and
  ``latents_mean``/``latents_std``), ``initial_noise``;
* trainable state for checkpoints and the diffusers LoRA format (``save_adapter`` / ``load_adapter``
  through the family's pipeline class, so ``<Pipeline>.load_lora_weights(dir)`` reads it);
* the learnable heads sized by ``cond_dim`` (:mod:`gfnalign.backbones.latent_heads`).

A family subclass (:mod:`~gfnalign.backbones.sd`, :mod:`~gfnalign.backbones.sdxl`) supplies the text side
and the denoiser call: ``_encode(prompts) -> cond [B, L, D]``, ``_negative_cond() -> [1, L, D]``,
``_unet_out(unet, x, t, cond) -> model output`` (``guidance=`` too for ``embedded_guidance`` families),
``cond_dim``, ``pipeline()``, and for loading
``pipeline_class_name`` / ``_pipeline_parts`` / ``_components(pipe)``.

Shapes: ``x`` ``[N, C, h, w]`` latents (float32 in, float32 out), ``t`` ``[N]`` int64 diffusion timesteps,
``cond`` ``[N, L, D]`` from :meth:`encode_prompts`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from gfnalign.core.parametrization import model_output_to_eps
from gfnalign.core.schedule import NoiseSchedule, alphas_cumprod_from_config, lands_on_alpha_bar_one

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class _AdapterState:
    """A reusable context (a retained graph is recomputed once per backward through it) that sets a backbone's
    peft adapters on or off and restores them after."""

    def __init__(self, backbone: LatentDiffusionBackbone, on: bool) -> None:
        self.backbone, self.on = backbone, on
        self._active: list[contextlib.AbstractContextManager] = []

    def __enter__(self) -> None:
        ctx = self.backbone._adapters_set(self.on)
        ctx.__enter__()
        self._active.append(ctx)

    def __exit__(self, *exc: Any) -> None:
        self._active.pop().__exit__(*exc)


class _BlockBytes:
    """Bytes the checkpointed blocks would save for backward un-checkpointed (see ``checkpointed_activations``)."""

    def __init__(self) -> None:
        self.bytes = 0

    def count(self, block: nn.Module, args: tuple[Any, ...]) -> None:
        weights = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *block.buffers())}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> None:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            # dropped: this graph is never differentiated, so the probe holds one block's tensors at a time

        def unpack(_: Any) -> torch.Tensor:
            raise RuntimeError("the memory probe's counting pass cannot be differentiated")

        inputs = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            block(*inputs)
        self.bytes += sum(seen.values())


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; use one of fp32, bf16, fp16 (or the torch dtypes)")


def move_module(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Move a module, casting only when its dtype differs (diffusers warns on redundant casts)."""
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def looks_like_local_path(p: str | Path) -> bool:
    if isinstance(p, Path):
        return True
    s = str(p)
    return s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") != 1


def vae_dtype_for(vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """float32 when a float16 VAE's config asks for ``force_upcast`` (SDXL's VAE overflows in float16, as
    diffusers' pipelines handle by upcasting at decode time); otherwise ``dtype``. A VAE fixed for float16
    (e.g. madebyollin/sdxl-vae-fp16-fix, ``force_upcast: false``) keeps float16."""
    if dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return dtype


def is_flow_match_config(config: Any) -> bool:
    """A ``FlowMatchEulerDiscreteScheduler`` (SD3, FLUX) object or config dict (by class name, or a dict with
    ``shift`` and no beta schedule)."""
    cfg = dict(getattr(config, "config", config))
    cls_name = str(cfg.get("_class_name") or (type(config).__name__ if hasattr(config, "config") else ""))
    return "FlowMatch" in cls_name or ("shift" in cfg and "beta_schedule" not in cfg and "beta_start" not in cfg)


def schedule_from_scheduler_config(
    config: Any, num_inference_steps: int, *, kernel: str | None = None, **flow_grid: Any
) -> NoiseSchedule:
    """The backbone's :class:`NoiseSchedule` from a scheduler object or its config dict (a dict needs
    ``_class_name`` to be recognised as DDPM).

    Flow-match configs (SD3, FLUX) give a rectified-flow schedule
    (:meth:`NoiseSchedule.from_flow_match_config`; ``flow_grid`` passes ``sigmas`` / ``mu`` /
    ``image_seq_len``), sampled with ``kernel`` (default ``flow_sde``, Flow-GRPO's SDE); its grid is a chain
    by construction. VP configs are sampled with ``kernel`` (default ``ddim``).

    Final alpha-bar (what the last sampling step lands on): ``alphas_cumprod[0]`` (Stable Diffusion's DDIM
    configs say ``set_alpha_to_one=False``, which is exactly this). A **DDPM** config, or a DDIM config with
    ``set_alpha_to_one=True``, steps to alpha-bar 1 in diffusers (a deterministic last step with zero
    variance, which has no density); here its last step lands on ``alphas_cumprod[0]`` instead (noise std
    ≈ 0.03 for SD's schedule), so every transition has a Gaussian log-probability. This differs from
    diffusers' ``step`` only in the last step. Each step lands on the next grid point (see
    :mod:`gfnalign.core.schedule`). Grids that cannot form a chain of Gaussian steps are rejected by
    :class:`NoiseSchedule` with the reason and the setting to use instead: a grid ending at timestep 0
    (``linspace`` always; use ``steps_offset=1`` as in SD's configs, or ``timestep_spacing="trailing"``) and a
    zero-terminal-SNR grid point (alpha-bar 0).
    """
    if is_flow_match_config(config):
        return NoiseSchedule.from_flow_match_config(config, num_inference_steps, kernel=kernel or "flow_sde",
                                                    **flow_grid)
    final = float(alphas_cumprod_from_config(config)[0]) if lands_on_alpha_bar_one(config) else None
    sched = NoiseSchedule.from_config(config, num_inference_steps, final_alpha_cumprod=final)
    return sched if kernel is None else sched.with_kernel(kernel)


def resolve_pipeline_source(path_or_id: str | Path, parts: Sequence[str], family: str, writer: str) -> str:
    """A local pipeline folder (checked to hold ``model_index.json`` and ``parts``) or a hub id, as a str.

    A local path that does not exist raises ``FileNotFoundError`` naming it; ``writer`` names the diffusers
    class whose ``save_pretrained`` writes such a folder (for the error messages).
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{local} is a file; pass the pipeline folder that holds model_index.json")
        for need in ("model_index.json", *parts):
            if not (local / need).exists():
                raise FileNotFoundError(
                    f"{local / need} not found: {local} is not a {family} pipeline folder "
                    f"(write one with {writer}.save_pretrained)"
                )
        return str(local)
    if looks_like_local_path(path_or_id):
        raise FileNotFoundError(
            f"pipeline folder not found: {local} (given {str(path_or_id)!r}); pass an existing folder written by "
            f"{writer}.save_pretrained, or a hub id like 'org/model'"
        )
    return str(path_or_id)


class LatentDiffusionBackbone(nn.Module):
    """Base of the diffusers latent-diffusion backbones (see the module docstring).

    Attributes: ``schedule``, ``latent_shape`` ``(C, h, w)``, ``image_size``, ``device``, ``guidance_scale``,
    ``eta``, ``num_inference_steps``, ``cond_dim``, the diffusers modules ``unet``, ``vae``, ``scheduler`` and
    the family's text encoders / tokenizers.
    """

    #: human name of the family, for messages
    family = "latent diffusion"
    #: the diffusers pipeline class (in ``diffusers``) that loads this family's folders and LoRA files
    pipeline_class_name = "StableDiffusionPipeline"
    #: subfolders a local pipeline folder must hold
    _pipeline_parts: tuple[str, ...] = ("unet", "vae", "scheduler")
    #: the denoiser's name in the family's LoRA files (``unet`` for SD/SDXL, ``transformer`` for SD3/FLUX)
    _lora_prefix = "unet"
    #: guidance-distilled families (FLUX.1) take the guidance scale as an input of one denoiser pass instead of
    #: classifier-free guidance over two; their ``_unet_out`` then receives ``guidance=`` (a float)
    embedded_guidance = False

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        text_encoders: dict[str, nn.Module],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
        full_finetune: bool = False,
        gradient_checkpointing: bool = False,
        image_size: int | None = None,
        sampler_kernel: str | None = None,
    ) -> None:
        super().__init__()
        defaults = self.sampler_defaults
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        eta = defaults["eta"] if eta is None else eta
        dtype = resolve_dtype(dtype)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int (e.g. 20 or 50)")
        self._check_guidance(guidance_scale)
        if not float(eta) > 0:
            raise ValueError(f"eta={eta!r} must be > 0: the policy needs a stochastic (DDIM eta>0 / DDPM) kernel")
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank!r} must be an int >= 0 (0 = no adapter)")
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        for name, module in text_encoders.items():
            setattr(self, name, module)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.dtype = dtype
        self.full_finetune = bool(full_finetune)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size is None:
            image_size = int(unet.config.sample_size) * self.vae_scale_factor
        if not isinstance(image_size, int) or image_size <= 0 or image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size={image_size!r} must be a positive multiple of the VAE factor {self.vae_scale_factor} "
                f"(e.g. {max(1, round(int(image_size or 1) / self.vae_scale_factor)) * self.vae_scale_factor})"
            )
        unet_factor = self._latent_multiple(unet)
        h = image_size // self.vae_scale_factor
        if h % unet_factor:
            raise ValueError(
                f"image_size={image_size} gives {h}×{h} latents, which the denoiser cannot divide into its "
                f"{unet_factor}×{unet_factor} cells; use a multiple of {self.vae_scale_factor * unet_factor}"
            )
        self.image_size = image_size
        self.latent_shape = (self._latent_channels(unet), h, h)
        self.schedule = schedule_from_scheduler_config(scheduler, num_inference_steps, kernel=sampler_kernel,
                                                       **self._flow_grid(num_inference_steps))
        self.schedule.check_noise_level(eta)
        # The kernels run in the interpolant's own parametrisation (VP or rectified flow) whatever scheduler
        # class the folder names, so x_T ~ N(0, I); Euler-type schedulers' init_noise_sigma (≈ 14.6 for SDXL's
        # config) is for their sigma space and does not apply.
        self.init_noise_sigma = 1.0

        # frozen base weights in `dtype` (the VAE in float32 where float16 would overflow)
        move_module(vae.requires_grad_(False).eval(), device, vae_dtype_for(vae, dtype))
        for m in text_encoders.values():
            move_module(m.requires_grad_(False).eval(), device, dtype)
        unet.requires_grad_(False).eval()
        self._reference_unet: nn.Module | None = None
        self.lora_config: dict[str, Any] | None = None
        self._adapters_on = True  # False inside reference() (peft adapters disabled)
        self._block_bytes: _BlockBytes | None = None  # set by checkpointed_activations()
        if self.full_finetune:
            # the trained copy keeps float32 master weights; the reference is the frozen base in `dtype`
            self._reference_unet = move_module(copy.deepcopy(unet), device, dtype).requires_grad_(False)
            move_module(unet, device, torch.float32).requires_grad_(True)
        else:
            move_module(unet, device, dtype)
            if lora_rank > 0:
                self.lora_config = add_lora(unet, lora_rank, lora_alpha, lora_targets)
        self._uncond: torch.Tensor | None = None
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute the denoiser's blocks in backward passes (diffusers' checkpointing; values and gradients are
        unchanged). Returns True when it is on. The trainer calls it when one transition's update would not fit
        its memory budget."""
        if not getattr(self.unet, "_supports_gradient_checkpointing", False):
            return False
        if not self.unet.is_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint_block)
        return True

    def _checkpoint_block(self, block: nn.Module, *args: Any) -> Any:
        """One checkpointed denoiser block whose recomputation runs with the adapters as they were in its
        forward pass. A reference pass (adapters off) can be differentiated after ``reference()`` has exited
        (the ∇-objectives' reverse score and shared reward-gradient pass do); recomputed with the adapters on,
        it would be another network's activations: torch's ``CheckpointError`` at best, a silently wrong
        gradient where the shapes happened to agree."""
        if self._block_bytes is not None:
            self._block_bytes.count(block, args)
        recompute = _AdapterState(self, self._adapters_on)
        return torch.utils.checkpoint.checkpoint(
            block.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute)
        )

    @property
    def gradient_checkpointing_on(self) -> bool:
        return bool(getattr(self.unet, "is_gradient_checkpointing", False))

    @contextlib.contextmanager
    def checkpointed_activations(self) -> Iterator[_BlockBytes]:
        """For a memory probe: the denoiser runs checkpointed for the duration (turned back off after if it was
        off), so a probe of a large model stays small, and each block's forward also runs once more on detached
        inputs with its saved tensors counted and dropped at once: ``.bytes`` is what the blocks would have kept
        for backward without checkpointing (the probe's own figure plus it is the un-checkpointed need)."""
        counter = _BlockBytes()
        was_on = self.gradient_checkpointing_on
        if not self.enable_gradient_checkpointing():
            yield counter  # nothing to checkpoint: the probe's own figure is the whole need
            return
        self._block_bytes = counter
        try:
            yield counter
        finally:
            self._block_bytes = None
            if not was_on:
                self.unet.disable_gradient_checkpointing()

    @contextlib.contextmanager
    def _adapters_set(self, on: bool) -> Iterator[None]:
        """The peft adapters on or off for the block, restored after (``requires_grad`` flags included, which
        peft's enable/disable rewrites)."""
        if self.lora_config is None or on == self._adapters_on:
            yield
            return
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        previous = self._adapters_on
        (self.unet.enable_adapters if on else self.unet.disable_adapters)()
        self._adapters_on = on
        try:
            yield
        finally:
            (self.unet.enable_adapters if previous else self.unet.disable_adapters)()
            self._adapters_on = previous
            for p, f in flags:
                p.requires_grad_(f)

    # -- family hooks ----------------------------------------------------------------------------------
    @staticmethod
    def _latent_channels(unet: nn.Module) -> int:
        """Channels of the VAE latents the policy's states hold (the denoiser's input channels by default)."""
        return int(unet.config.in_channels)

    @staticmethod
    def _latent_multiple(unet: nn.Module) -> int:
        """The latent side must be a multiple of this (a UNet halves it once per resolution level)."""
        return 2 ** (len(unet.config.block_out_channels) - 1)

    def _flow_grid(self, num_inference_steps: int) -> dict[str, Any]:
        """Extra arguments of a flow-match grid (FLUX: its sigmas and resolution shift); none for the rest."""
        return {}

    def _encode(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        """Conditioning rows ``[B, L, D]`` (float32, no grad) for validated prompts."""
        raise NotImplementedError

    def _negative_cond(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The unconditional (negative) row ``[1, L, D]`` used by classifier-free guidance."""
        raise NotImplementedError

    def _unet_out(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def cond_dim(self) -> int:  # pragma: no cover - abstract
        """Width ``D`` of the conditioning rows (the heads' cross-attention width)."""
        raise NotImplementedError

    @classmethod
    def _pipeline_class(cls) -> Any:
        """The diffusers pipeline class named by ``pipeline_class_name``."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def _components(cls, pipe: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        """Constructor keywords taken from a loaded pipeline."""
        raise NotImplementedError

    # -- construction ----------------------------------------------------------------------------------
    #: the family's sampler when the caller names none (its pipeline's usual steps and guidance; η of the kernel)
    sampler_defaults: dict[str, Any] = {"num_inference_steps": 50, "guidance_scale": 7.5, "eta": 1.0}
    #: keyword arguments every load of the family's pipeline passes (e.g. SD's ``safety_checker=None``)
    _load_options: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, revision: str | None = None, variant: str | None = None,
                        pipeline_options: dict[str, Any] | None = None, **kwargs: Any) -> LatentDiffusionBackbone:
        """Load the family's pipeline folder (``save_pretrained`` layout) or hub id and build the backbone from
        its components; ``kwargs`` are the constructor's (``num_inference_steps``, ``dtype``, ``lora_rank``, ...
        and the family's own). A local path that does not exist raises ``FileNotFoundError`` naming it; hub ids
        obey ``HF_HUB_OFFLINE`` (only cached models load offline). The scheduler config defines the schedule."""
        options = {**cls._load_options, **(pipeline_options or {})}
        pipe = cls._load_pipeline(path_or_id, kwargs.get("dtype", torch.float32), revision, variant, **options)
        return cls(**cls._components(pipe), **kwargs)

    @classmethod
    def _load_pipeline(
        cls, path_or_id: str | Path, dtype: torch.dtype | str, revision: str | None, variant: str | None,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Load the family's pipeline folder (``save_pretrained`` layout) or hub id in ``dtype``.

        Hub ids obey ``HF_HUB_OFFLINE`` (only cached models load offline).
        """
        pipeline_class = cls._pipeline_class()
        source = resolve_pipeline_source(path_or_id, cls._pipeline_parts, cls.family, pipeline_class.__name__)
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), **pipeline_kwargs}
        if revision:
            kwargs["revision"] = revision
        if variant:
            kwargs["variant"] = variant
        try:
            return pipeline_class.from_pretrained(source, **kwargs)
        except OSError as e:
            raise OSError(
                f"could not load {cls.family} pipeline {source!r}: {e}. With HF_HUB_OFFLINE=1 a hub id must "
                "already be in the local cache; otherwise pass a local folder"
            ) from e

    @property
    def device(self) -> torch.device:
        return self.vae.device

    # -- text ------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Conditional embeddings ``[B, L, D]`` (float32, no grad), as the family's pipeline computes them."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(
                f"prompts must be a list of str, got {type(prompts).__name__}"
                + (f" ({prompts!r}); wrap a single prompt as [prompt]" if isinstance(prompts, str) else "")
            )
        bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must all be str; items (index, type) {bad[:5]} are not")
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        return self._encode(list(prompts))

    @property
    def uncond_embedding(self) -> torch.Tensor:
        """The negative-prompt embedding ``[1, L, D]``, computed once and cached."""
        if self._uncond is None or self._uncond.device != self.device:
            self._uncond = self._negative_cond()
        return self._uncond

    # -- denoiser -------------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, t: Any, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be latents [N, {', '.join(map(str, self.latent_shape))}], got {shape}")
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        flow = self.schedule.interpolant == "rectified_flow"
        if t.dtype == torch.bool or (t.is_floating_point() and not flow):
            raise TypeError(f"t must hold integer diffusion timesteps, got dtype {t.dtype}")
        # flow timesteps are sigma * T (floats), as the transformer takes them
        t = (t.to(torch.float32) if flow else t.long()).reshape(-1)
        if t.numel() == 1 and n != 1:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape [N]=[{n}] (or be a scalar), got {tuple(t.shape)}")
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
            raise ValueError(
                "cond must be text embeddings [N, L, D] from encode_prompts, got "
                f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}"
            )
        if cond.shape[0] != n:
            raise ValueError(f"cond has {cond.shape[0]} rows but x has {n}; repeat the embeddings per row")
        return t, cond

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """Context in which ``self.unet``'s answer is the pretrained model's (adapters disabled).

        Yields the UNet to call. Trainable parameters keep their ``requires_grad`` flags.
        """
        if self._reference_unet is not None:
            yield self._reference_unet
            return
        with self._adapters_set(False):
            yield self.unet

    def _eps(self, x, t, cond, *, reference: bool, guidance: float) -> torch.Tensor:
        t, cond = self._check(x, t, cond)
        # The reference's weights are frozen, so no parameter gets a gradient from it; it still runs with
        # autograd on so that ∇_x of its log P_F (residual ∇-DB's reverse score) can be taken.
        with (self.reference() if reference else contextlib.nullcontext(self.unet)) as unet:
            if self.embedded_guidance:
                out = self._unet_out(unet, x, t, cond, guidance=guidance)
            elif guidance == 1.0:
                out = self._unet_out(unet, x, t, cond)
            else:
                n = x.shape[0]
                unc = self.uncond_embedding.to(cond.device).expand(n, -1, -1)
                both = self._unet_out(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([unc, cond.to(unc.dtype)]))
                out_u, out_c = both.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            if self.schedule.prediction_type == "flow":
                return out  # the velocity: the schedule's kernels read it directly
            ab = self.schedule.alpha_bar_of_timestep(t, dtype=x.dtype)
            return model_output_to_eps(out, x, ab, self.schedule.prediction_type)

    def eps(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, reference: bool = False,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Guided ε like ``x``: ``ε_u + w (ε_c − ε_u)`` with ``w = guidance_scale`` (default: the backbone's);
        for a flow-match family the guided velocity instead (``schedule.policy_output == "flow"``).

        ``w = 1`` runs the conditional branch only. ``reference=True``: pretrained model (frozen; differentiable in ``x`` only).
        """
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        self._check_guidance(w)
        return self._eps(x, t, cond, reference=reference, guidance=w)

    def cond_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
        """Unguided conditional ε (one UNet pass), like ``x``. A guidance-distilled family has no unguided
        prediction: its one pass at the backbone's guidance scale."""
        return self._eps(x, t, cond, reference=reference, guidance=self.guidance_scale if self.embedded_guidance else 1.0)

    def _check_guidance(self, w: Any) -> None:
        if self.embedded_guidance:
            if not (isinstance(w, int | float) and math.isfinite(float(w)) and float(w) >= 0):
                raise ValueError(f"guidance_scale={w!r} must be a finite number >= 0 (the {self.family} guidance "
                                 "embedding; FLUX.1-dev uses 3.5, models without the embedding ignore it)")
        elif not (isinstance(w, int | float) and float(w) >= 1.0):
            raise ValueError(f"guidance_scale={w!r} must be >= 1 (1 disables classifier-free guidance)")

    def predict_x0(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *, reference: bool = False, guided: bool = True
    ) -> torch.Tensor:
        """Tweedie's clean-latent estimate from the guided (or conditional) ε (or velocity)."""
        e = self.eps(x, t, cond, reference=reference) if guided else self.cond_eps(x, t, cond, reference=reference)
        t, _ = self._check(x, t, cond)
        return x0_from_output(self.schedule, x, e, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` → images ``[N, 3, H, W]`` float32 in [0, 1], differentiable.

        Undoes the VAE's latent normalisation as diffusers' pipelines do (``latents_mean``/``latents_std``
        when the config has both, else ``scaling_factor`` and ``shift_factor``). The VAE output in [-1, 1]
        is mapped to [0, 1] and clamped; the clamp passes no gradient for pixels outside the range (as
        every SD pipeline's post-processing does).
        """
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [N, {', '.join(map(str, self.latent_shape))}], got {shape}")
        cfg = self.vae.config
        z = latents.to(self.vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(view)
            std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(view)
            z = z * std_t / cfg.scaling_factor + mean_t
        else:
            z = z / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None):
                z = z + cfg.shift_factor
        img = self.vae.decode(z).sample
        img = img.to(torch.promote_types(img.dtype, torch.float32))  # fp32 at least (fp64 VAEs stay fp64)
        return (img / 2 + 0.5).clamp(0, 1)

    def initial_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Starting latents ``[B, C, h, w]`` (float32, on ``self.device``), drawn on the generator's device."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        dev = generator.device if generator is not None else self.device
        z = torch.randn((batch_size, *self.latent_shape), generator=generator, device=dev, dtype=torch.float32)
        return z.to(self.device) * self.init_noise_sigma

    # -- trainable state --------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module | None:
        """The module that holds every trainable parameter (the UNet with its LoRA, or the fully trained UNet);
        the trainer hands it to the distributed engine. None when nothing is trainable."""
        return self.unet if self.trainable_parameters() else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (LoRA or full UNet), detached copies on CPU, keyed by UNet parameter name."""
        return {n: p.detach().cpu().clone() for n, p in self.named_trainable_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; keys and shapes must match exactly."""
        own = dict(self.named_trainable_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"trainable state does not match this backbone: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}); was it saved with the same lora_rank/targets?"
            )
        with torch.no_grad():
            for n, p in own.items():
                if state[n].shape != p.shape:
                    raise ValueError(f"trainable tensor {n}: shape {tuple(state[n].shape)} != {tuple(p.shape)}")
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))

    # -- diffusers LoRA format ------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path) -> Path:
        """Write the LoRA as ``directory/pytorch_lora_weights.safetensors`` (diffusers' format, with the
        LoRA config as metadata) so the family pipeline's ``load_lora_weights(directory)`` loads it.
        With ``full_finetune`` the UNet is written with ``save_pretrained`` to ``directory/unet`` instead."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.full_finetune:
            self.unet.save_pretrained(d / "unet")
            return d / "unet"
        if self.lora_config is None:
            raise ValueError("this backbone has no adapter (lora_rank=0); nothing to save")
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
        # sets (target_modules) are sorted: their iteration order follows the per-process string hash seed,
        # which would make the file's bytes differ between identical runs
        meta = {k: sorted(v) if isinstance(v, set | frozenset) else v
                for k, v in self.unet.peft_config["default"].to_dict().items()}
        prefix = self._lora_prefix
        self._pipeline_class().save_lora_weights(
            d, **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": meta}, safe_serialization=True
        )
        _sort_safetensors_metadata(d / LORA_WEIGHT_NAME)
        (d / "gfnalign_lora.json").write_text(json.dumps(self.lora_config, indent=2) + "\n")
        return d / LORA_WEIGHT_NAME

    def load_adapter(self, directory: str | Path) -> None:
        """Load a LoRA written by :meth:`save_adapter` (or any diffusers-format UNet LoRA with the same
        rank and targets) into this backbone's adapter."""
        d = Path(directory)
        f = d / LORA_WEIGHT_NAME
        if self.full_finetune:
            if not (d / "unet").is_dir():
                raise FileNotFoundError(f"full fine-tune weights not found: {d / 'unet'}")
            src = type(self.unet).from_pretrained(d / "unet")
            self.unet.load_state_dict(src.state_dict())
            return
        if self.lora_config is None:
            raise ValueError("this backbone has no adapter (lora_rank=0); build it with lora_rank>0 to load one")
        if not f.is_file():
            raise FileNotFoundError(f"LoRA weights not found: {f}")
        from diffusers.utils import convert_unet_state_dict_to_peft

        sd = self._pipeline_class().lora_state_dict(d)
        sd = sd[0] if isinstance(sd, tuple) else sd
        prefix = self._lora_prefix + "."
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = convert_unet_state_dict_to_peft(sd)
        state = {}
        for n, _ in self.named_trainable_parameters():
            key = re.sub(r"\.default(?=\.)", "", n)
            if key not in sd:
                raise KeyError(f"{f} has no tensor for {key}; the LoRA was saved with other rank/targets")
            state[n] = sd.pop(key)
        if sd:
            raise KeyError(f"{f} has {len(sd)} tensors this backbone's adapter lacks, e.g. {sorted(sd)[:3]}")
        self.load_trainable_state_dict(state)

    # -- heads ----------------------------------------------------------------------------------------------------
    def make_log_flow_head(self, channels: Sequence[int] = (32, 64), layout: str = "compact") -> nn.Module:
        """A scalar log-flow head ``f(x [N,C,h,w], t [N], cond [N,L,D]) -> [N]`` (float32 output). ``layout``:
        ``"compact"`` (ours, output starts at 0) or ``"dag"`` (the DAG authors' ≈6.5 M network); see
        :class:`~gfnalign.backbones.latent_heads.LogFlowHead`."""
        from gfnalign.backbones.latent_heads import LogFlowHead

        return LogFlowHead(self.latent_shape, self.cond_dim, tuple(channels), layout=layout).to(self.device)

    def make_flow_score_head(self, channels: Sequence[int] = (32, 64)) -> nn.Module:
        """A flow-score head ``g(x, t, cond) -> like x`` (a small conditional UNet, output conv zero-initialised)."""
        from gfnalign.backbones.latent_heads import FlowScoreHead

        return FlowScoreHead(self.latent_shape, self.cond_dim, tuple(channels)).to(self.device)


def x0_from_output(schedule: NoiseSchedule, x: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0 from the policy's output at timesteps ``t`` ([N]): Tweedie from ε (VP), ``x − σ·v`` (flow)."""
    if schedule.prediction_type == "flow":
        sigma = schedule.sigma_of_timestep(t).to(device=x.device, dtype=x.dtype)
        return x - sigma.reshape(-1, *([1] * (x.dim() - 1))) * output
    ab = schedule.alpha_bar_of_timestep(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (x - (1 - ab).sqrt() * output) / ab.sqrt()


def add_lora(
    module: nn.Module, rank: int, alpha: float | None, targets: Sequence[str],
    known_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
) -> dict[str, Any]:
    """Add a peft LoRA (gaussian init) to a diffusers model, its weights in float32 on top of the frozen
    (possibly low-precision) base; returns ``{"r", "lora_alpha", "target_modules"}``."""
    from peft import LoraConfig

    alpha = float(rank if alpha is None else alpha)
    targets = list(targets)
    if not targets or not all(isinstance(s, str) and s for s in targets):
        raise ValueError(f"lora_targets={targets!r} must be a non-empty list of module names")
    try:
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    except ValueError as e:
        raise ValueError(
            f"lora_targets={targets} did not match the model's modules ({e}); the attention projections are "
            f"{list(known_targets)}"
        ) from e
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets}


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes the metadata from a hash map whose order changes between processes, so two
    identical runs wrote files whose bytes differed. Reordering keys keeps the header's length, so the
    tensor data and its offsets are untouched.
    """
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if not isinstance(header.get("__metadata__"), dict):
        return
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    if len(text) > n:  # never expected (same content); keep the original rather than corrupt the file
        return
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])
