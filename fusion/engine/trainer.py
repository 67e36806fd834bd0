"""The DAE-Fuse training loop for both phases: one code path for single-process and Ray runs.

``Trainer`` owns models, optimizers and schedulers; ``fit`` runs steps and calls hooks to
report metrics and save checkpoints. Ray Train supplies other hooks and a ``wrap`` (DDP);
the loop itself does not know where it runs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion import losses
from fusion.checkpoint import Weights, load_weights
from fusion.model import DAEFuse, Discriminator
from fusion.params import Params


class Discriminators(nn.Module):
    """DM1 (source A) and DM2 (source B) as one module, so DDP wraps them together."""

    def __init__(self, p) -> None:
        super().__init__()
        self.d1, self.d2 = Discriminator(p), Discriminator(p)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d1(a), self.d2(b)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    def __init__(self, params: Params, phase: int, device: torch.device | str = "cpu",
                 init: str | Path | Weights | None = None,
                 wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        self.params, self.phase = params, phase
        self.device = torch.device(device)
        t = params.train
        torch.manual_seed(t.seed)
        self.model = DAEFuse(params.model)
        self.disc = Discriminators(params.model)
        if init is not None:  # phase II starts from the phase I export (folder or weights)
            model_sd, disc_sd = load_weights(init) if isinstance(init, str | Path) else init
            self.model.load_state_dict(model_sd)
            self.disc.load_state_dict(disc_sd)
        fusion_layers = [self.model.cross_a, self.model.cross_b, self.model.fuse_reduce]
        for module in fusion_layers:  # phase I does not use (or train) the fusion layers
            module.requires_grad_(phase == 2)
        self.model.to(self.device)
        self.disc.to(self.device)
        self.net, self.dnet = wrap(self.model), wrap(self.disc)
        self.steps = t.phase1_steps if phase == 1 else t.phase2_steps
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(trainable, lr=t.lr)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t.d_lr)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(
            self.opt_g, _cosine(self.steps, t.lr_min_ratio))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(
            self.opt_d, _cosine(self.steps, t.lr_min_ratio))
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.resumes: list[int] = []  # steps this run was resumed at (crash / restart audit)
        self.amp = t.amp and self.device.type == "cuda"

    # -- state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {"phase": self.phase, "step": self.step, "model": self.model.state_dict(),
                 "disc": self.disc.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "sched_g": self.sched_g.state_dict(),
                 "sched_d": self.sched_d.state_dict(), "curve": list(self.curve),
                 "resumes": list(self.resumes), "rng_torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load(self, state: dict[str, Any]) -> None:
        if state["phase"] != self.phase:
            raise ValueError(f"checkpoint is for phase {state['phase']}, not {self.phase}")
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
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

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor,
                params: list[nn.Parameter]) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, self.params.train.grad_clip)
        opt.step()

    def generate(self, a: torch.Tensor, b: torch.Tensor):
        """Phase I: reconstructions and features; phase II: the fused image."""
        if self.phase == 1:
            rec, hf, lf = self.net(torch.cat([a, b]))
            return rec.chunk(2), hf.chunk(2), lf.chunk(2)
        return self.net(a, b)

    def generator_losses(self, a, b, out, d_fake) -> dict[str, torch.Tensor]:
        w = self.params.loss
        adv = losses.generator_adversarial(*d_fake)
        if self.phase == 1:
            (rec_a, rec_b), (hf_a, hf_b), (lf_a, lf_b) = out
            corr = losses.decomposition_loss(hf_a, hf_b, lf_a, lf_b)
            content = losses.content_loss(a, rec_a) + losses.content_loss(b, rec_b)
            total = w.lam * adv + w.sigma * corr + (1 - w.sigma) * content
            return {"loss": total, "adv": adv, "corr": corr, "content": content}
        text = losses.texture_loss(out, a, b)
        inten = losses.intensity_loss(out, a, b)
        total = w.w_text * text + w.w_int * inten + w.w_adv * adv
        return {"loss": total, "adv": adv, "text": text, "int": inten}

    def train_step(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        a, b = a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)
        self.net.train()
        self.dnet.train()
        with self._autocast():
            out = self.generate(a, b)
            fake_a, fake_b = out[0] if self.phase == 1 else (out, out)
            n = a.shape[0]
            d1, d2 = self.dnet(torch.cat([a, fake_a.detach()]), torch.cat([b, fake_b.detach()]))
            d_loss = losses.discriminator_loss(d1[:n], d1[n:], d2[:n], d2[n:])
        self._update(self.opt_d, d_loss, list(self.disc.parameters()))
        with self._autocast():
            g = self.generator_losses(a, b, out, self.dnet(fake_a, fake_b))
        self._update(self.opt_g, g["loss"], [p for group in self.opt_g.param_groups
                                             for p in group["params"]])
        self.sched_g.step()
        self.sched_d.step()
        self.step += 1
        return {"d_loss": float(d_loss.detach()), **{k: float(v.detach()) for k, v in g.items()},
                "lr": self.sched_g.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        """Generator losses on a fixed batch, in eval mode (for validation and tests)."""
        a, b = a.to(self.device), b.to(self.device)
        self.net.eval()
        self.dnet.eval()
        out = self.generate(a, b)
        fake_a, fake_b = out[0] if self.phase == 1 else (out, out)
        return {k: float(v) for k, v in
                self.generator_losses(a, b, out, self.dnet(fake_a, fake_b)).items()}

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
