"""Throughput per objective: transitions/s, network evaluations per transition, peak memory, overhead.

    .venv/bin/python benchmarks/throughput.py [--methods dag-db,...] [--batch 8] [--steps 10] [--repeats 2]
                                              [--json benchmarks/out/throughput.json] [--markdown]
                                              [--only-ab] [--ab-methods dag-db,dag-kl|all] [--ab-passes 8]

For every method (and for ``dag-db`` once with ``lookahead: cached`` and once with ``recompute``) this runs
the trainer's epoch structure (DESIGN.md §9) on the digits world, in its own subprocess so peak memory is
per method:

    rollout of B trajectories  ->  terminal reward  ->  objective.prepare  ->  select_transitions
    ->  [cached, objectives that read it: lookahead r(x̂0) of the selected transitions' states]
    ->  micro-batches: objective(...) / backward / AdamW step

**Counting.** Forward hooks on the real modules (the UNet, the VAE decoder) and a wrapper on the reward's
``score`` count the rows each network processes, split by whether autograd was recording (``grad``) or
not (``nograd``). A classifier-free-guided pass counts twice (the UNet sees 2 rows per image). Nothing is
assumed from the method's description.

**Bare cost.** Separately, each network's cost per row is measured at the micro-batch size: no-grad
forward, and forward+backward (backward into the input and the trainable LoRA). The bare cost of a phase is
``Σ_net rows_nograd · c_fwd + rows_grad · c_fwdbwd``; the *overhead ratio* is the measured phase time over
that bare cost (1.0 = nothing but the networks). Rows recorded with grad are charged a full backward even
when only an input gradient is taken, so the ratio is, if anything, optimistic.

**Memory.** ``ru_maxrss`` of the method's subprocess on CPU (includes the loaded models and Python);
``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dag-db", "dag-kl", "nabla-db", "residual-nabla-db", "ddpo", "reward-backprop")


# ----------------------------------------------------------------------------------------------------------
# instrumentation


class NetProbe:
    """Counts rows through watched networks, split by autograd mode."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self._handles: list[Any] = []
        self._restore: list[Any] = []

    def _add(self, name: str, n: int) -> None:
        key = "grad" if torch.is_grad_enabled() else "nograd"
        self.counts.setdefault(name, {"grad": 0, "nograd": 0})[key] += int(n)

    def watch_module(self, name: str, module: torch.nn.Module) -> None:
        def hook(mod, args, kwargs, out):  # noqa: ARG001
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self._add(name, x.shape[0])

        self.counts.setdefault(name, {"grad": 0, "nograd": 0})
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def watch_reward(self, reward: Any, name: str = "reward") -> None:
        """Wrap the reward's ``score`` (what ``Reward.__call__`` runs) on this instance."""
        original = reward.score

        def score(images, prompts):
            self._add(name, images.shape[0])
            return original(images, prompts)

        self.counts.setdefault(name, {"grad": 0, "nograd": 0})
        reward.score = score
        self._restore.append(lambda: delattr(reward, "score"))

    def reset(self) -> None:
        for c in self.counts.values():
            c["grad"] = c["nograd"] = 0

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.counts.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for r in self._restore:
            r()


def find_networks(backbone: Any) -> dict[str, torch.nn.Module]:
    """The backbone's denoiser (UNet or flow transformer) and VAE decoder modules (by diffusers class), for hooks."""
    found: dict[str, torch.nn.Module] = {}
    seen = set()
    candidates = list(vars(backbone).values())
    for attr in ("unet", "vae", "pipe", "_pipe"):
        candidates.append(getattr(backbone, attr, None))
    for obj in candidates:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        mods = [obj] if isinstance(obj, torch.nn.Module) else list(getattr(obj, "components", {}).values())
        for m in mods:
            if not isinstance(m, torch.nn.Module):
                continue
            cls = type(m).__name__
            # the denoiser: a UNet, or the MMDiT of SD3 / FLUX (counted under "unet")
            if ("UNet" in cls or cls.endswith("Transformer2DModel")) and "unet" not in found:
                found["unet"] = m
            elif cls.startswith("Autoencoder") and "decoder" not in found:
                found["decoder"] = m.decoder
    missing = {"unet", "decoder"} - set(found)
    if missing:
        raise RuntimeError(f"throughput: could not find the backbone's {sorted(missing)} module(s) to instrument")
    return found


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


# ----------------------------------------------------------------------------------------------------------
# one epoch, the trainer's structure


class Harness:
    """Backbone + reward + objective + lookahead built from a config dict, and one timed epoch."""

    def __init__(self, cfg_dict: dict[str, Any], device: torch.device, backbone: Any = None, reward: Any = None):
        from gfnalign.training.build import build_backbone, build_objective, build_reward
        from gfnalign.training.config import TrainConfig
        from gfnalign.training.lookahead import RewardLookahead

        self.cfg = TrainConfig.from_dict(cfg_dict)
        self.device = device
        torch.manual_seed(self.cfg.seed)
        self.backbone = backbone if backbone is not None else build_backbone(self.cfg, device)
        self.reward = reward if reward is not None else build_reward(self.cfg)
        self.objective = build_objective(self.cfg, self.backbone).to(device)
        self.lookahead = RewardLookahead(self.backbone, self.reward, model=self.cfg.lookahead.model,
                                         guided=self.cfg.lookahead.guided,
                                         auto_checkpointing=self.cfg.memory.auto_checkpointing)  # as the trainer
        params = [p for p in self._policy_params()] + [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.training.lr)
        self.probe = NetProbe()
        for name, mod in find_networks(self.backbone).items():
            self.probe.watch_module(name, mod)
        self.heads = {f"head:{k}": m for k, m in self.objective.trainable_modules().items()
                      if any(p.requires_grad for p in m.parameters())}
        for name, mod in self.heads.items():  # the objective's own flow networks
            self.probe.watch_module(name, mod)
        self.probe.watch_reward(self.reward)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        from gfnalign.rewards.prompts import load_prompts

        self.prompts = load_prompts(self.cfg.prompts)
        self.mode = self.cfg.lookahead.mode

    def _policy_params(self) -> list[torch.nn.Parameter]:
        bb = self.backbone
        for attr in ("trainable_parameters", "lora_parameters", "parameters"):
            fn = getattr(bb, attr, None)
            if callable(fn):
                params = [p for p in fn() if p.requires_grad]
                if params:
                    return params
        raise RuntimeError("throughput: the backbone exposes no trainable parameters")

    def initial_noise(self, n: int) -> torch.Tensor:
        shape = (n, *tuple(self.backbone.latent_shape))
        return torch.randn(shape, generator=self.generator).to(self.device)

    def sample(self, batch: int) -> Any:
        """Rollout + terminal reward; returns the prepared trajectory batch."""
        from gfnalign.sampling.rollout import rollout

        s = self.cfg.sampling
        prompts, idx = self.prompts.sample(batch, self.generator)
        cond = self.backbone.encode_prompts(prompts)
        self.lookahead.set_prompts(cond, prompts)
        traj = rollout(self.backbone, cond, self.initial_noise(batch), eta=s.eta, reduction=s.log_prob_reduction,
                       generator=self.generator, prompt_id=idx.to(self.device), prompts=prompts)
        with torch.no_grad():
            r = self.reward(self.backbone.decode(traj.final).float(), prompts)
        traj = replace(traj, reward=torch.as_tensor(r, dtype=torch.float32, device=self.device).reshape(-1))
        return self.objective.prepare(traj)

    def train(self, traj: Any) -> int:
        """Selection, the cached lookahead of the selected states (as the trainer: only when the objective
        reads it), micro-batched objective / backward / step; returns the number of transitions."""
        batch = self.objective.select_transitions(traj, self.generator)
        if self.mode == "cached" and "reward" in self.objective.lookahead_reads:
            batch = self.lookahead.cache_transitions(traj, batch)
        n = len(batch)
        mb = self.cfg.training.micro_batch
        beta = self.cfg.beta.value
        for s in range(0, n, mb):
            idx = torch.arange(s, min(n, s + mb), device=batch.x_t.device)
            out = self.objective(batch.index(idx), self.backbone, self.lookahead, beta=beta)
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return n

    def timed_epoch(self, batch: int) -> dict[str, Any]:
        self.probe.reset()
        sync(self.device)
        t0 = time.perf_counter()
        traj = self.sample(batch)
        sync(self.device)
        t1 = time.perf_counter()
        counts_sample = self.probe.snapshot()
        self.probe.reset()
        n = self.train(traj)
        sync(self.device)
        t2 = time.perf_counter()
        return {"sample_s": t1 - t0, "train_s": t2 - t1, "transitions": n,
                "rows_sample": counts_sample, "rows_train": self.probe.snapshot()}

    # -- bare network costs -------------------------------------------------------------------------------
    def unit_costs(self, n: int, repeats: int = 12) -> dict[str, dict[str, float]]:
        """Seconds per row of each watched network: no-grad forward and forward+backward, at batch n."""
        bb, dev = self.backbone, self.device
        prompts, _ = self.prompts.sample(n, self.generator)
        cond = bb.encode_prompts(prompts)
        x = self.initial_noise(n)
        t = bb.schedule.timesteps[torch.full((n,), bb.schedule.num_steps // 2)].to(dev)
        params = self._policy_params()
        with torch.no_grad():
            images = bb.decode(x).float()

        def unet_f():
            with torch.no_grad():
                bb.eps(x, t, cond)

        def unet_fb():
            xi = x.detach().requires_grad_(True)
            bb.eps(xi, t, cond).square().sum().backward()

        def dec_f():
            with torch.no_grad():
                bb.decode(x)

        def dec_fb():
            xi = x.detach().requires_grad_(True)
            bb.decode(xi).square().sum().backward()

        def rew_f():
            with torch.no_grad():
                self.reward(images, prompts)

        def rew_fb():
            im = images.detach().requires_grad_(True)
            self.reward(im, prompts).sum().backward()

        out: dict[str, dict[str, float]] = {}
        jobs = {"unet": (unet_f, unet_fb), "decoder": (dec_f, dec_fb), "reward": (rew_f, rew_fb)}
        for hname, head in self.heads.items():
            def head_f(head=head):
                with torch.no_grad():
                    head(x, t, cond)

            def head_fb(head=head):
                xi = x.detach().requires_grad_(True)
                head(xi, t, cond).float().square().sum().backward()

            jobs[hname] = (head_f, head_fb)
        for name, (f, fb) in jobs.items():
            costs = {}
            for kind, fn in (("fwd", f), ("fwdbwd", fb)):
                if kind == "fwdbwd" and name == "reward" and not getattr(self.reward, "differentiable", False):
                    costs[kind] = float("nan")
                    continue
                fn()  # warm-up
                times = []
                for _ in range(repeats):  # min over single calls: robust to other processes on the CPU
                    self.probe.reset()
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    times.append(time.perf_counter() - t0)
                rows = sum(self.probe.counts.get(name, {}).values())
                costs[kind] = min(times) / max(rows, 1)
                for p in params + [q for m in self.heads.values() for q in m.parameters()]:
                    p.grad = None
            out[name] = costs
        self.probe.reset()
        return out


def bare_cost(rows: dict[str, dict[str, int]], unit: dict[str, dict[str, float]]) -> float:
    total = 0.0
    for name, c in rows.items():
        u = unit.get(name)
        if u is None:
            continue
        fb = u["fwdbwd"] if u["fwdbwd"] == u["fwdbwd"] else u["fwd"]
        total += c["nograd"] * u["fwd"] + c["grad"] * fb
    return total


# ----------------------------------------------------------------------------------------------------------
# per-method measurement (run in a subprocess)


def accepts_option(method: str, key: str) -> bool:
    """Whether the registered objective ``method`` takes the keyword option ``key``."""
    import gfnalign.objectives  # noqa: F401  (fills the registry)
    from gfnalign.objectives.base import REGISTRY
    from gfnalign.training.build import filter_kwargs

    return method in REGISTRY and key in filter_kwargs(REGISTRY[method], {key: 1})


def digits_config(method: str, lookahead: str, batch: int, steps: int, micro_batch: int, fraction: float | None,
                  reward: str, lookahead_model: str | None = None, pipeline: str | None = None) -> dict[str, Any]:
    """The shipped preset ``configs/digits-<method>.yaml`` with the benchmark's sizes."""
    import yaml

    preset = ROOT / "configs" / f"digits-{method}.yaml"
    base: dict[str, Any] = yaml.safe_load(preset.read_text()) if preset.is_file() else {"method": {"name": method}}
    options: dict[str, Any] = dict((base.get("method") or {}).get("options") or {})
    if fraction is not None and accepts_option(method, "fraction"):
        options["fraction"] = fraction
    if reward.strip().startswith("{"):
        reward = json.loads(reward)  # a reward spec with options, e.g. {"name": "digit-alignment", ...}
    base.update({"seed": 0, "reward": reward, "prompts": "digits", "method": {"name": method, "options": options}})
    base.setdefault("backbone", {})["kind"] = "digits"
    if pipeline:  # any diffusers SD folder instead of the shipped digits model (same code path)
        base["backbone"].update({"kind": "sd", "path": str(pipeline)})
    base["sampling"] = {**base.get("sampling", {}), "num_steps": steps, "batch_size": batch, "batches_per_epoch": 1}
    base["training"] = {**base.get("training", {}), "micro_batch": micro_batch, "max_updates_per_epoch": None}
    base["lookahead"] = {**base.get("lookahead", {}), "mode": lookahead}
    if lookahead_model:
        base["lookahead"]["model"] = lookahead_model
    base["logging"] = {**base.get("logging", {}), "progress": False, "tensorboard": False}
    return base


def _add_rows(dst: dict[str, dict[str, int]], src: dict[str, dict[str, int]]) -> None:
    for k, v in src.items():
        d = dst.setdefault(k, {"grad": 0, "nograd": 0})
        d["grad"] += v["grad"]
        d["nograd"] += v["nograd"]


def measure(cfg: dict[str, Any], device: torch.device, batch: int, repeats: int, unit: dict | None = None,
            harness: Harness | None = None, train_repeats: int = 6) -> dict[str, Any]:
    """Sampling: ``repeats`` timed epochs' rollouts (+ reward, + cached lookahead). Training: ``train_repeats``
    timed passes of select_transitions + micro-batched updates over the sampled trajectories (a step is
    timed many times because one update is short and this CPU is shared). Min over repeats is reported."""
    h = harness or Harness(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    h.timed_epoch(batch)  # warm-up epoch (allocations, lazy init)
    samples, trajs = [], []
    rows_sample: dict[str, dict[str, int]] = {}
    for _ in range(repeats):
        h.probe.reset()
        sync(device)
        t0 = time.perf_counter()
        trajs.append(h.sample(batch))
        sync(device)
        samples.append(time.perf_counter() - t0)
        _add_rows(rows_sample, h.probe.snapshot())
    trains, ns = [], []
    rows_train: dict[str, dict[str, int]] = {}
    for i in range(train_repeats):
        h.probe.reset()
        sync(device)
        t0 = time.perf_counter()
        n = h.train(trajs[i % len(trajs)])
        sync(device)
        trains.append(time.perf_counter() - t0)
        ns.append(n)
        _add_rows(rows_train, h.probe.snapshot())
    n_per_epoch = ns[0]
    unit = unit if unit is not None else h.unit_costs(min(n_per_epoch, h.cfg.training.micro_batch))
    best_train = min(t / n for t, n in zip(trains, ns))  # seconds per transition, least disturbed run
    best_sample = min(samples) / n_per_epoch  # sampling seconds per trained transition
    n_train, n_sample = sum(ns), n_per_epoch * repeats
    rows_train_pt = {k: {g: v / n_train for g, v in c.items()} for k, c in rows_train.items()}
    rows_sample_pt = {k: {g: v / n_sample for g, v in c.items()} for k, c in rows_sample.items()}
    bare_train = bare_cost(rows_train_pt, unit)  # per transition
    bare_sample = bare_cost(rows_sample_pt, unit)
    nfe_train = {k: c["grad"] + c["nograd"] for k, c in rows_train_pt.items()}
    nfe_sample = {k: c["grad"] + c["nograd"] for k, c in rows_sample_pt.items()}
    return {
        "method": h.cfg.method.name,
        "lookahead": h.cfg.lookahead.mode,
        "transitions_per_epoch": n_per_epoch,
        "trajectories_per_epoch": batch,
        "train_s": trains,
        "sample_s": samples,
        "train_transitions_per_s": 1.0 / best_train,
        "epoch_transitions_per_s": 1.0 / (best_train + best_sample),
        "median_train_transitions_per_s": 1.0 / sorted(t / n for t, n in zip(trains, ns))[len(trains) // 2],
        "train_s_per_transition": best_train,
        "epoch_s_per_transition": best_train + best_sample,
        "nfe_per_transition_train": nfe_train,
        "nfe_per_transition_epoch": {k: nfe_train.get(k, 0.0) + nfe_sample.get(k, 0.0) for k in nfe_train},
        "rows_per_transition_train": rows_train_pt,
        "rows_per_transition_sample": rows_sample_pt,
        "unit_costs": unit,
        "bare_train_s_per_transition": bare_train,
        "bare_sample_s_per_transition": bare_sample,
        "train_overhead": best_train / bare_train if bare_train > 0 else float("nan"),
        "sample_overhead": best_sample / bare_sample if bare_sample > 0 else float("nan"),
        "peak_mem_mb": peak_memory_mb(device),
    }


def lookahead_ab(cfg: dict[str, Any], device: torch.device, batch: int, passes: int = 8) -> dict[str, Any]:
    """One method's training phase (selection, lookahead, updates) with ``lookahead: cached`` (the selected
    states scored once, with the policy's recorded x̂0 or one reference pass each, for objectives that read
    it) vs ``recompute`` (per transition), in ONE process on the SAME trajectories, timed alternately so load
    from other processes hits all alike."""
    from gfnalign.sampling.rollout import rollout

    h = Harness(cfg, device)
    s = h.cfg.sampling

    def roll():
        prompts, idx = h.prompts.sample(batch, h.generator)
        cond = h.backbone.encode_prompts(prompts)
        h.lookahead.set_prompts(cond, prompts)
        traj = rollout(h.backbone, cond, h.initial_noise(batch), eta=s.eta, reduction=s.log_prob_reduction,
                       generator=h.generator, prompt_id=idx.to(device), prompts=prompts)
        with torch.no_grad():
            r = h.reward(h.backbone.decode(traj.final).float(), prompts)
        return h.objective.prepare(replace(traj, reward=torch.as_tensor(r, dtype=torch.float32, device=device).reshape(-1)))

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0

    roll()  # warm-up
    trajs, t_roll = [], []
    for _ in range(2):
        traj, dt = timed(roll)
        trajs.append(traj)
        t_roll.append(dt)
    variants = [("cached", "policy"), ("cached", "reference"), ("recompute", "policy"), ("recompute", "reference")]
    t_train: dict[str, list[float]] = {f"{m}/{model}": [] for m, model in variants}
    n = None
    for i in range(passes):
        order = variants if i % 2 == 0 else variants[::-1]
        for mode, model in order:
            h.mode, h.lookahead.model = mode, model
            n, dt = timed(lambda traj=trajs[i % 2]: h.train(traj))
            t_train[f"{mode}/{model}"].append(dt / n)
    med = {k: sorted(v)[len(v) // 2] for k, v in t_train.items()}
    best = {k: min(v) for k, v in t_train.items()}
    roll_pt = min(t_roll) / n
    return {
        "transitions_per_epoch": n, "trajectories_per_epoch": batch,
        "train_s_per_transition": {"median": med, "min": best, "all": t_train},
        "rollout_s_per_transition": roll_pt,
        "epoch_speedup_cached_vs_recompute": {
            model: (roll_pt + med[f"recompute/{model}"]) / (roll_pt + med[f"cached/{model}"])
            for model in ("policy", "reference")},
    }


def _child(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.child_lookahead == "ab":
        cfg = digits_config(args.child_method, "cached", args.batch, args.steps, args.micro_batch, args.fraction,
                            args.reward, None, args.pipeline)
        print("@@RESULT@@" + json.dumps({"method": args.child_method, "lookahead": "ab",
                                          **lookahead_ab(cfg, device, args.batch, passes=args.ab_passes)}))
        return 0
    cfg = digits_config(args.child_method, args.child_lookahead, args.batch, args.steps, args.micro_batch,
                        args.fraction, args.reward, args.child_lookahead_model, args.pipeline)
    try:
        res = measure(cfg, device, args.batch, args.repeats, train_repeats=args.train_repeats)
        res["lookahead_model"] = cfg["lookahead"].get("model", "reference")
    except Exception as err:  # report, do not hide: the parent prints it in the table
        import traceback

        traceback.print_exc()
        res = {"method": args.child_method, "lookahead": args.child_lookahead, "error": f"{type(err).__name__}: {err}"}
    print("@@RESULT@@" + json.dumps(res))
    return 0


def run_child(method: str, lookahead: str, args: argparse.Namespace, model: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child-method", method, "--child-lookahead", lookahead,
           "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--micro-batch", str(args.micro_batch), "--device", args.device, "--reward", args.reward,
           "--train-repeats", str(args.train_repeats), "--ab-passes", str(args.ab_passes)]
    if args.fraction is not None:
        cmd += ["--fraction", str(args.fraction)]
    if model:
        cmd += ["--child-lookahead-model", model]
    if args.pipeline:
        cmd += ["--pipeline", args.pipeline]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    return {"method": method, "lookahead": lookahead, "error": (proc.stderr or proc.stdout)[-2000:]}


def _fmt_nfe(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def markdown(results: list[dict[str, Any]], args: argparse.Namespace,
             ab: dict[str, dict[str, Any]] | None = None) -> str:
    lines = [
        "| method | lookahead (x̂0 model) | train transitions/s | epoch transitions/s | net evals per transition, train step "
        "(epoch incl. sampling) | peak mem (MB) | train time / bare net cost | sampling time / bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['lookahead']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | |")
            continue
        nfe = "; ".join(
            f"{k} {r['nfe_per_transition_train'][k]:.2f} ({r['nfe_per_transition_epoch'][k]:.2f})"
            for k in r["nfe_per_transition_train"]
        )
        lines.append(
            f"| {r['method']} | {r['lookahead']} ({r.get('lookahead_model', 'reference')}) | {r['train_transitions_per_s']:.1f} | "
            f"{r['epoch_transitions_per_s']:.1f} | {nfe} | {r['peak_mem_mb']:.0f} | "
            f"{r['train_overhead']:.2f}× | {r['sample_overhead']:.2f}× |"
        )
    good_ab = {m: r for m, r in (ab or {}).items() if "error" not in r}
    if good_ab:
        variants = list(next(iter(good_ab.values()))["train_s_per_transition"]["median"])
        lines += ["", "Lookahead A/B per method (one process per method, same trajectories, alternating; the "
                  "training phase includes selection and, when cached, scoring the selected states). Seconds per "
                  "trained transition, median:", "",
                  "| method | rollout + terminal reward | " + " | ".join(
                      f"train, {v.replace('/', ', x̂0 ')}" for v in variants)
                  + " | epoch recompute / cached (policy x̂0) | (reference x̂0) |",
                  "|---|---|" + "---|" * len(variants) + "---|---|"]
        for m, r in good_ab.items():
            med, speed = r["train_s_per_transition"]["median"], r["epoch_speedup_cached_vs_recompute"]
            lines.append(f"| {m} | {r['rollout_s_per_transition']:.4f} | "
                         + " | ".join(f"{med[v]:.4f}" for v in variants)
                         + f" | {speed['policy']:.2f}× | {speed['reference']:.2f}× |")
    by = {(r["method"], r["lookahead"], r.get("lookahead_model", "reference")): r for r in results if "error" not in r}
    pairs = []
    for (method, mode, model), c in by.items():
        rc = by.get((method, "recompute", model))
        if mode == "cached" and rc is not None:
            pairs.append(f"| {method} | {model} | {c['epoch_s_per_transition']:.4f} | {rc['epoch_s_per_transition']:.4f} | "
                         f"{rc['epoch_s_per_transition'] / c['epoch_s_per_transition']:.2f} |")
    if pairs:
        lines += ["", "Per-epoch cost per trained transition (sampling, selection, lookahead, updates; separate "
                  "processes, min over repeats):", "",
                  "| method | x̂0 model | cached (s) | recompute (s) | recompute / cached |", "|---|---|---|---|---|",
                  *pairs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=8, help="trajectories per epoch")
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--micro-batch", type=int, default=16, help="transitions per forward/backward")
    p.add_argument("--fraction", type=float, default=None, help="fraction of transitions trained (objective option)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling epochs after one warm-up epoch")
    p.add_argument("--train-repeats", type=int, default=6, help="timed training passes over the sampled batches")
    p.add_argument("--reward", default="digit-alignment")
    p.add_argument("--pipeline", default=None, help="a diffusers SD folder instead of the shipped digits model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "throughput.json")
    p.add_argument("--markdown", action="store_true", help="print the BENCHMARKS.md table")
    p.add_argument("--only-ab", action="store_true", help="only the cached/recompute A/B")
    p.add_argument("--ab-methods", default="dag-db",
                   help="methods whose cached/recompute A/B runs (one process each; 'all': every method in --methods)")
    p.add_argument("--ab-passes", type=int, default=8, help="alternating timed passes per variant in the A/B")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: on a CPU shared with other jobs, 2 threads thrash ~10x slower)")
    p.add_argument("--child-method", help=argparse.SUPPRESS)
    p.add_argument("--child-lookahead", default="cached", help=argparse.SUPPRESS)
    p.add_argument("--child-lookahead-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_method:
        return _child(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # every method with the lookahead cached and recomputed (the authors' DAG code); objectives that never
    # read the lookahead must cost the same in both
    jobs: list[tuple[str, str, str | None]] = [(m, la, None) for m in methods for la in ("cached", "recompute")]
    ab: dict[str, dict[str, Any]] = {}
    ab_methods = methods if args.ab_methods == "all" else [m.strip() for m in args.ab_methods.split(",")
                                                          if m.strip() in methods]
    for m in ab_methods:
        ab[m] = run_child(m, "ab", args)
        if "error" in ab[m]:
            print(f"{m} lookahead A/B failed:", ab[m]["error"][-500:], flush=True)
        else:
            print(f"{m} lookahead A/B (same process, same trajectories): whole epoch recompute/cached "
                  + ", ".join(f"{k} x0_hat {v:.2f}x" for k, v in ab[m]["epoch_speedup_cached_vs_recompute"].items()),
                  flush=True)
    results = []
    for m, la, model in ([] if args.only_ab else jobs):
        t0 = time.perf_counter()
        r = run_child(m, la, args, model)
        r["wall_s"] = time.perf_counter() - t0
        print(f"{m:>18} {la:>9}: " + ("ERROR " + r["error"].splitlines()[-1] if "error" in r else
              f"{r['train_transitions_per_s']:.1f} tr/s train, overhead {r['train_overhead']:.2f}x, "
              f"nfe {_fmt_nfe(r['nfe_per_transition_train'])}"), flush=True)
        results.append(r)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "batch": args.batch, "steps": args.steps, "micro_batch": args.micro_batch, "repeats": args.repeats,
            "train_repeats": args.train_repeats, "fraction": args.fraction, "reward": args.reward,
            "pipeline": args.pipeline}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results, "lookahead_ab": ab}, indent=2) + "\n")
    md = markdown(results, args, ab)
    if args.markdown:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
