"""The training loop: one code path for every family and phase, single-process and Ray.

``Trainer`` owns the network (and, for adversarial phases, the discriminators), their
optimizers and schedulers; ``fit`` runs steps and calls hooks to report metrics and save
checkpoints. The family supplies the network, the phase's outputs (its ``forward``) and
the losses; Ray Train supplies other hooks and a ``wrap`` (DDP). The loop itself knows
neither the family nor where it runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.engine.exports import Weights, load_model, weights_mismatch
from fusion.errors import FusionError
from fusion.models import losses
from fusion.models.layers import two_scale
from fusion.params import Params


def _cosine(total: int, floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        progress = min(step / max(total, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass
class Hooks:
    """What the loop calls: ``report(step, metrics)`` every ``log_every`` steps and
    ``save(step, state)`` every ``checkpoint_every`` steps and at the end."""

    report: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    save: Callable[[int, dict[str, Any]], None] = lambda step, state: None


class Trainer:
    """One phase of the active family's recipe (``params.model.family``)."""

    def __init__(self, params: Params, phase: int, device: torch.device | str = "cpu",
                 init: Weights | None = None,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        family = params.family
        self.spec = family.phase(phase)
        self.code = family.network_module()
        self.objectives = family.loss_module()
        self.params, self.phase = params, phase
        self.weights = family.loss(params.config, phase)
        self.device = torch.device(device)
        t = params.train
        torch.manual_seed(t.seed)
        self.model = self.code.build(params.config.net)
        self.critic = self.code.build_critic(params.config.net) if self.spec.adversarial else None
        if init is not None:  # the previous phase's export, or a warm start
            net_sd, critic_sd = init
            mismatch = weights_mismatch(self.model.state_dict(), net_sd)
            if mismatch:
                raise FusionError(f"{family.name} phase {phase}: the starting weights do not fit "
                                  f"the network of model.{family.name}.net ({mismatch})")
            self.model.load_state_dict(net_sd)
            if self.critic is not None and critic_sd is not None:
                self.critic.load_state_dict(critic_sd)
        children = dict(self.model.named_children())
        # the recipe's frozen parts, and parts this configuration leaves unused (e.g. an
        # optional head): both must get no gradient, or DDP would wait for one
        idle = getattr(self.model, "idle", lambda phase: ())(phase)
        frozen = set(self.spec.frozen) | set(idle)
        unknown = {n for n in frozen if n not in children and getattr(self.model, n, 0) is not None}
        if unknown:
            raise ValueError(f"{family.name} phase {phase}: no parts named {sorted(unknown)}")
        for name, module in children.items():
            module.requires_grad_(name not in frozen)
        self.model.to(self.device)
        self.net = wrap(self.model)
        self.steps = t.steps[phase - 1]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(trainable, lr=t.lr)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(
            self.opt_g, _cosine(self.steps, t.lr_min_ratio))
        if self.critic is not None:
            self.critic.to(self.device)
            self.cnet = wrap(self.critic)
            self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=t.d_lr)
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(
                self.opt_d, _cosine(self.steps, t.lr_min_ratio))
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.resumes: list[int] = []  # steps this run was resumed at (crash / restart audit)
        self.amp = t.amp and self.device.type == "cuda"
        self.teacher = self._teacher()

    def _teacher(self) -> nn.Module | None:
        """The model whose fused images this phase also learns (``train.teacher``, at weight
        ``w_distill``): a family whose own gains do not carry beyond its training set may
        learn from one whose do (what that bought: docs/quality.md, "Distillation")."""
        if not getattr(self.weights, "w_distill", 0.0):  # (a weight needs a teacher: Params)
            return None
        teacher = load_model(self.params.train.teacher, str(self.device))
        teacher.requires_grad_(False)
        return teacher

    # -- state ------------------------------------------------------------------------
    def _stateful(self) -> dict[str, Any]:
        parts = {"model": self.model, "opt_g": self.opt_g, "sched_g": self.sched_g}
        if self.critic is not None:
            parts.update(critic=self.critic, opt_d=self.opt_d, sched_d=self.sched_d)
        return parts

    def state(self) -> dict[str, Any]:
        state = {"family": self.params.model.family, "phase": self.phase, "step": self.step,
                 **{k: v.state_dict() for k, v in self._stateful().items()},
                 "curve": list(self.curve), "resumes": list(self.resumes),
                 "rng_torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load(self, state: dict[str, Any]) -> None:
        if (state.get("family"), state["phase"]) != (self.params.model.family, self.phase):
            raise ValueError(f"checkpoint is for {state.get('family')} phase {state['phase']}, "
                             f"not {self.params.model.family} phase {self.phase}")
        for key, part in self._stateful().items():
            part.load_state_dict(state[key])
        self.step, self.curve = state["step"], list(state["curve"])
        self.resumes = [*state.get("resumes", []), self.step]
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    # -- one step ---------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                 self.params.train.grad_clip)
        opt.step()

    def _losses(self, a: torch.Tensor, b: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        d_fake = self.cnet(*out["fakes"]) if self.critic is not None else None
        terms = self.objectives.losses_for(self.phase, a, b, out, self.weights, d_fake)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher.fuse(a, b)
            terms["distill"] = F.l1_loss(out["fused"], target.to(out["fused"].dtype))
            terms["loss"] = terms["loss"] + self.weights.w_distill * terms["distill"]
        return terms

    def _forward(self, a: torch.Tensor, b: torch.Tensor) -> dict:
        """The phase's outputs; with ``noise`` (the fusion phase's sensor noise) from noisy
        inputs, the rule they are scored against recomputed on the clean sources."""
        sigma = getattr(self.weights, "noise", 0.0)
        if not sigma:
            return self.net(a, b, self.phase)
        out = self.net(*((x + sigma * torch.randn_like(x)).clamp(0, 1) for x in (a, b)),
                       self.phase)
        p = self.model.params
        return {**out, "reference": two_scale(a, b, p.prior_sigma, p.halo_limit)}

    def train_step(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        a, b = a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)
        self.net.train()
        metrics: dict[str, float] = {}
        with self._autocast():
            out = self._forward(a, b)
        if self.critic is not None:  # discriminators first, on detached fakes
            self.cnet.train()
            with self._autocast():
                fake_a, fake_b = (f.detach() for f in out["fakes"])
                n = a.shape[0]
                d1, d2 = self.cnet(torch.cat([a, fake_a]), torch.cat([b, fake_b]))
                d_loss = losses.discriminator_loss(d1[:n], d1[n:], d2[:n], d2[n:])
            self._update(self.opt_d, d_loss)
            self.sched_d.step()
            metrics["d_loss"] = float(d_loss.detach())
        with self._autocast():
            g = self._losses(a, b, out)
        self._update(self.opt_g, g["loss"])
        self.sched_g.step()
        self.step += 1
        return {**metrics, **{k: float(v.detach()) for k, v in g.items()},
                "lr": self.sched_g.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        """The phase's losses on a fixed batch, in eval mode (for validation and tests)."""
        a, b = a.to(self.device), b.to(self.device)
        self.net.eval()
        if self.critic is not None:
            self.cnet.eval()
        return {k: float(v) for k, v in self._losses(a, b, self.net(a, b, self.phase)).items()}

    # -- the loop -----------------------------------------------------------------------
    def fit(self, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
            hooks: Hooks | None = None, until: int | None = None) -> None:
        """Train from the current step to ``until`` (default: the phase's step count)."""
        hooks = hooks or Hooks()
        t = self.params.train
        end = min(until if until is not None else self.steps, self.steps)
        while self.step < end:
            metrics = self.train_step(*batches(self.step))
            if self.step % t.log_every == 0 or self.step == self.steps:
                self.curve.append({"step": self.step, **metrics, "time": time.time()})
                hooks.report(self.step, metrics)
            if self.step % t.checkpoint_every == 0 or self.step == end:
                hooks.save(self.step, self.state())

    def weights_cpu(self) -> Weights:
        """The trained weights on the CPU (the next phase's ``init``)."""
        def cpu(module: nn.Module | None):
            return None if module is None else {k: v.cpu() for k, v in
                                                module.state_dict().items()}
        return cpu(self.model), cpu(self.critic)
