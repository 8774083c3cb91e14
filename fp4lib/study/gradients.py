"""The gradient-fidelity study: what each recipe does to the GEMMs and gradients of real training states.

The loss study (:mod:`fp4lib.study.definition`) sees an ingredient only through
the final loss, where its effect is small next to the spread between seeds. This
study measures each ingredient where it acts, on the states of two stored runs
(``bf16_s0`` and ``nvfp4_s0`` after 100, 200 and 300 of their 400 steps), on
held-out batches, over many draws of the random parts (stochastic rounding and
the Hadamard signs):

* **GEMM level**: every quantized layer's three GEMMs (forward, dgrad, wgrad) on
  the operands the layer sees in the exact float32 pass, quantized as the recipe
  says, against the exact float32 GEMM of the same operands: the mean relative
  error of one draw, and the relative bias (the mean over draws against the
  exact output, corrected for the finite number of draws) and spread (the
  root-mean-square deviation of one draw from that mean);
* **gradient level**: the whole model's gradient with the recipe against the
  exact one: cosine similarity, relative error, bias and spread, also per
  quantized layer's weight;
* **the weight twice**: how far the weight the forward GEMM sees lies from the one
  the dgrad GEMM sees (zero with 16x16 tiles), and the forward weight's error;
* **one step ahead**: the held-out loss after one AdamW step (the run's own
  optimizer state and learning rate) with the recipe's gradient, minus the loss
  after the same step with the exact gradient.

:func:`measure` makes a record; ``python -m fp4lib.study gradients`` stores
``experiments/results/gradients.json`` (:data:`FIDELITY`) and the small
:data:`FIDELITY_CHECK` that ``check`` re-runs. :mod:`fp4lib.study.mechanisms`
turns a record into intervals and verdicts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..training.apply import apply_recipe, quantized_layers
from ..training.config import lr_at
from ..training.layers import FP4Linear, FP4LinearFunction
from ..training.loop import default_loss, make_optimizer
from ..training.model import GPT
from ..training.operands import concrete_backend, fake_quantize_operand, mix_seed
from ..training.recipes import get_recipe
from ..training.run import PRESETS, build_run, run_training
from ..training.specs import ROLES

__all__ = ["FidelityStudy", "FIDELITY", "FIDELITY_CHECK", "GEMM_NAMES", "make_states", "measure", "measure_state",
           "Moments"]

GEMM_NAMES = ("fprop", "dgrad", "wgrad")
_GEMM_STREAM = 0x6E44   # seed streams of the draws, apart from the training runs' own
_MODEL_STREAM = 0x9A7D
_BATCH_SEED = 1000      # held-out gradient batch i: validation windows drawn with seed 1000 + i
_LOOKAHEAD_SEED = 2000  # look-ahead batch j: seed 2000 + j


@dataclass(frozen=True)
class FidelityStudy:
    """One gradient-fidelity measurement: which states, batches, draws and recipes.

    ``state_runs``: recipes trained (``preset``, ``seed``, ``run_steps`` steps, as the
    loss study's runs of that recipe and seed) to make the states, taken after each of
    ``state_steps``. ``batches``: held-out gradient batches per state; ``draws``: draws
    of the random parts per recipe (a recipe whose first two draws agree bit for bit
    is deterministic and is not drawn again); ``lookahead_batches``: held-out batches
    of the one-step look-ahead loss.
    """

    name: str
    recipes: Tuple[str, ...]
    state_runs: Tuple[str, ...] = ("bf16", "nvfp4")
    state_steps: Tuple[int, ...] = (100, 200, 300)
    run_steps: int = 400
    preset: str = "ci"
    seed: int = 0
    batches: int = 3
    draws: int = 8
    lookahead_batches: int = 2

    def __post_init__(self):
        for r in self.recipes + self.state_runs:
            get_recipe(r)  # a ValueError naming the recipe
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if not self.state_steps or any(not 0 < s < self.run_steps for s in self.state_steps):
            raise ValueError(f"state_steps must lie in 1..{self.run_steps - 1}, got {self.state_steps}")
        if self.draws < 2 or self.batches < 1 or self.lookahead_batches < 1:
            raise ValueError("need draws >= 2 (a bias needs a spread), batches >= 1, lookahead_batches >= 1")

    def definition(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


FIDELITY = FidelityStudy(
    "gradients",
    recipes=("nvfp4", "nvfp4_no_sr", "nvfp4_no_rht", "nvfp4_no_tiles", "nvfp4_unbiased_sr", "nvfp4_4over6",
             "mxfp4", "fp8", "fp4_naive"),
)
"""The stored study: 2 runs x 3 states x 3 batches = 18 cells, 8 draws per recipe."""

FIDELITY_CHECK = FidelityStudy("gradients_check", recipes=("nvfp4", "nvfp4_no_tiles"), state_runs=("bf16",),
                               state_steps=(20,), batches=1, draws=2, lookahead_batches=1)
"""The re-run check's slice: one early state, one batch, two recipes, two draws (seconds)."""


class _Enough(Exception):
    """Raised by the capture hook after the last state: the run need not go on."""


def make_states(study: FidelityStudy, backend: str = "auto", log: Callable[[str], None] = print) -> List[dict]:
    """Train ``study.state_runs`` and capture each state: parameters, AdamW state, the next step and its learning rate.

    Training stops after the last captured state; up to it, a run is the loss study's
    run of the same recipe, preset and seed (the same steps, batches and noise).
    """
    states = []
    last = max(study.state_steps)
    cfg = PRESETS[study.preset].train_config(steps=study.run_steps, seed=study.seed)
    for recipe in study.state_runs:
        def capture(trainer, step, recipe=recipe):
            done = step - 1
            if done in study.state_steps:
                states.append({
                    "name": f"{recipe}@{done}", "run": recipe, "step": done, "lr": lr_at(step, cfg),
                    "train_loss": trainer.train_losses[-1],
                    "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                    "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
                })
                if done == last:
                    raise _Enough
        t0 = time.time()
        try:
            run_training(recipe, study.preset, steps=study.run_steps, seed=study.seed, backend=backend,
                         progress=False, hooks=[capture])
        except _Enough:
            pass
        log(f"  states of {recipe}: steps {list(study.state_steps)} ({time.time() - t0:.0f} s)")
    return states


class Moments:
    """Draws of one tensor against its exact value: mean relative error, cosine, and the
    relative bias and spread of the draws (running mean and squared deviations).

    ``bias2`` is the squared distance of the draws' mean from the exact value minus
    its expected part from the draws' own spread (``spread2 / k``), relative to the
    exact value's squared norm: an unbiased estimate of the squared relative bias,
    which can come out below zero when the bias is small.

    Examples
    --------
    >>> exact = torch.tensor([1.0, 0.0])
    >>> m = Moments(exact)
    >>> for t in ([1.5, 0.5], [1.5, -0.5], [1.5, 0.0]):
    ...     m.add(torch.tensor(t))
    >>> s = m.summary()
    >>> round(s["bias2"], 4), round(s["spread2"], 4), round(s["error"], 4)
    (0.1667, 0.25, 0.6381)

    Per draw, ``bias2 + spread2`` is the mean squared relative error over the draws
    (the root-mean-square error, squared).
    """

    def __init__(self, exact: torch.Tensor):
        self.exact = exact.detach().double().flatten()
        self.norm2 = float(self.exact.dot(self.exact))
        self.k = 0
        self.mean = torch.zeros_like(self.exact)
        self.m2 = 0.0
        self.errors: List[float] = []
        self.cosines: List[float] = []

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().double().flatten()
        self.k += 1
        d = t - self.mean
        self.mean += d / self.k
        self.m2 += float(d.dot(t - self.mean))
        diff = t - self.exact
        self.errors.append(math.sqrt(float(diff.dot(diff)) / self.norm2) if self.norm2 else 0.0)
        tn = float(t.norm())
        self.cosines.append(float(t.dot(self.exact)) / (tn * math.sqrt(self.norm2)) if tn and self.norm2 else 0.0)

    @property
    def constant(self) -> bool:
        """True when every draw so far was the same tensor (no random part)."""
        return self.k >= 2 and self.m2 == 0.0

    def summary(self) -> dict:
        if not self.norm2:
            raise ValueError("the exact value is zero: relative quantities are undefined")
        spread2 = self.m2 / (self.k - 1) if self.k > 1 else 0.0
        off = self.mean - self.exact
        bias2 = float(off.dot(off)) - (spread2 / self.k if self.k > 1 else 0.0)
        return {"error": sum(self.errors) / self.k, "cosine": sum(self.cosines) / self.k,
                "bias2": bias2 / self.norm2, "spread2": spread2 / self.norm2, "draws": self.k}


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v) for v in d]
    if isinstance(d, float):
        return float(f"{d:.7g}")
    return d


def _exact_pass(model: GPT, batch, layer_names: Sequence[str]):
    """Float32 loss, every parameter's gradient and each named layer's operands ``(x, dy)``."""
    ops: Dict[str, dict] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in layer_names:
        def hook(mod, inp, out, name=name):
            ops[name] = {"x": inp[0].detach().reshape(-1, inp[0].shape[-1]).clone()}
            out.register_hook(lambda g, name=name: ops[name].__setitem__("dy", g.detach().reshape(-1, g.shape[-1]).clone()))
        handles.append(modules[name].register_forward_hook(hook))
    model.zero_grad(set_to_none=True)
    loss = default_loss(model, batch)
    loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return float(loss.detach()), grads, ops


def _gemms(x, w, dy, spec, seed: int, backend) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's three GEMM outputs ``(y, dx, dw)`` with ``spec``'s operands (bias left out)."""
    xx = x.clone().requires_grad_(True)
    ww = w.detach().clone().requires_grad_(True)
    y = FP4LinearFunction.apply(xx, ww, None, spec, seed, backend, torch.float32)
    y.backward(dy)
    return y.detach(), xx.grad, ww.grad


def _gemm_level(ops: dict, weights: Dict[str, torch.Tensor], spec, draws: int, backend) -> dict:
    out = {g: {"error": [], "bias2": [], "spread2": [], "draws": []} for g in GEMM_NAMES}
    for name, op in ops.items():
        x, dy, w = op["x"], op["dy"], weights[name]
        exact = (x @ w.t(), dy @ w, dy.t() @ x)
        moments = [Moments(e) for e in exact]
        for d in range(draws):
            outs = _gemms(x, w, dy, spec, mix_seed(_GEMM_STREAM, d), backend)
            for m, o in zip(moments, outs):
                if not m.constant:
                    m.add(o)
        for g, m in zip(GEMM_NAMES, moments):
            s = m.summary()
            for k in out[g]:
                out[g][k].append(s[k])
    return out


def _lookahead(model: GPT, state: dict, grads: Dict[str, torch.Tensor], batches, preset: str) -> float:
    """Held-out float32 loss after one AdamW step from ``state`` with ``grads`` (clipped as in training)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state["params"][n])
            p.grad = grads[n].clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), PRESETS[preset].train.grad_clip)
    opt = make_optimizer(model, PRESETS[preset].train)
    opt.load_state_dict(copy.deepcopy(state["optimizer"]))
    for group in opt.param_groups:
        group["lr"] = state["lr"]
    opt.step()
    model.eval()
    with torch.no_grad():
        loss = sum(float(default_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


def _set_params(model, params: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def _model_level(model, state: dict, batch, exact_grads, names: Sequence[str], draws: int, lookahead_model,
                 lookahead_batches, exact_after: float, preset: str) -> dict:
    """The recipe's whole-model gradient over ``draws`` draws against the exact one, and the look-ahead."""
    _set_params(model, state["params"])
    layers = quantized_layers(model)
    base = {n: m.seed for n, m in model.named_modules() if isinstance(m, FP4Linear)}
    whole = Moments(torch.cat([exact_grads[n].flatten() for n in names]))
    per_layer = [Moments(exact_grads[f"{n}.weight"]) for n in layers]
    ahead: List[float] = []
    model.train()
    for d in range(draws):
        for n, m in model.named_modules():
            if isinstance(m, FP4Linear):
                m.seed, m.calls = mix_seed(base[n], _MODEL_STREAM, d), 0
        model.zero_grad(set_to_none=True)
        default_loss(model, batch).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        whole.add(torch.cat([grads[n].flatten() for n in names]))
        for m, n in zip(per_layer, layers):
            m.add(grads[f"{n}.weight"])
        ahead.append(_lookahead(lookahead_model, state, grads, lookahead_batches, preset) - exact_after)
        if whole.constant:
            break
    for n, m in model.named_modules():
        if isinstance(m, FP4Linear):
            m.seed = base[n]
    layer_sums = [m.summary() for m in per_layer]
    return {"model": whole.summary(), "layers": {k: [s[k] for s in layer_sums] for k in ("error", "bias2", "spread2")},
            "lookahead": ahead}


def _weight_views(weights: Dict[str, torch.Tensor], spec) -> dict:
    """Per layer: the forward weight's relative error, and its distance from the dgrad GEMM's weight."""
    out = {"weight_error": [], "fwd_bwd_mismatch": []}
    for w in weights.values():
        w = w.detach().float()
        fwd = fake_quantize_operand(w, spec.fprop_w, ROLES["fprop_w"][1], backend="fused")
        bwd = fake_quantize_operand(w, spec.dgrad_w, ROLES["dgrad_w"][1], backend="fused")
        n = float(w.norm())
        out["weight_error"].append(float((fwd - w).norm()) / n)
        out["fwd_bwd_mismatch"].append(float((fwd - bwd).norm()) / n)
    return out


def measure_state(study: FidelityStudy, state: dict, models: Dict[str, GPT], exact_model: GPT,
                  lookahead_model: GPT, grad_batches, lookahead_batches, backend) -> dict:
    """All quantities of one state: per held-out batch (a cell) and, for the weights, per state."""
    recipes = {r: get_recipe(r) for r in study.recipes}
    names = [n for n, _ in exact_model.named_parameters()]
    some = next(m for r, m in models.items() if recipes[r].quantized)
    layer_names = quantized_layers(some)
    _set_params(exact_model, state["params"])
    exact_model.train()
    exact_after = None
    cells = []
    for i, batch in enumerate(grad_batches):
        loss, exact_grads, ops = _exact_pass(exact_model, batch, layer_names)
        exact_after = _lookahead(lookahead_model, state, exact_grads, lookahead_batches, study.preset)
        weights = {n: state["params"][f"{n}.weight"] for n in layer_names}
        cell = {"state": state["name"], "batch": i, "exact_loss": loss, "exact_lookahead_loss": exact_after,
                "recipes": {}}
        for r, rec in recipes.items():
            if quantized_layers(models[r]) != layer_names:
                raise ValueError(f"recipe {r} quantizes other layers than {study.recipes[0]}: no layer-wise comparison")
            cell["recipes"][r] = {
                "gemm": _gemm_level(ops, weights, rec.linear, study.draws, backend),
                "grad": _model_level(models[r], state, batch, exact_grads, names, study.draws, lookahead_model,
                                     lookahead_batches, exact_after, study.preset),
            }
        cells.append(cell)
    weights = {n: state["params"][f"{n}.weight"] for n in layer_names}
    return {"state": {"name": state["name"], "run": state["run"], "step": state["step"], "lr": state["lr"],
                      "train_loss": state["train_loss"],
                      "weights": {r: _weight_views(weights, recipes[r].linear) for r in study.recipes}},
            "cells": cells, "layers": layer_names}


def _measure_runs(study: FidelityStudy, backend, runs: Tuple[str, ...], log: Callable[[str], None],
                  threads: Optional[int] = None) -> dict:
    """The states of ``runs`` (some of ``study.state_runs``) and their cells."""
    if threads:
        torch.set_num_threads(threads)
    states = make_states(dataclasses.replace(study, state_runs=runs), backend, log)
    _, _, _, val, _ = build_run("bf16", study.preset, seed=study.seed)
    bs = PRESETS[study.preset].train.batch_size
    grad_batches = [val.sample(bs, torch.Generator().manual_seed(_BATCH_SEED + i)) for i in range(study.batches)]
    ahead_batches = [val.sample(bs, torch.Generator().manual_seed(_LOOKAHEAD_SEED + j))
                     for j in range(study.lookahead_batches)]
    cfg = PRESETS[study.preset].model
    models = {}
    for r in study.recipes:
        torch.manual_seed(study.seed)
        models[r] = GPT(cfg)
        apply_recipe(models[r], get_recipe(r), seed=study.seed, backend=backend)
    exact_model, lookahead_model = GPT(cfg), GPT(cfg)
    out = {"states": [], "cells": [], "layers": None}
    for state in states:
        t1 = time.time()
        part = measure_state(study, state, models, exact_model, lookahead_model, grad_batches, ahead_batches, backend)
        out["states"].append(part["state"])
        out["cells"] += part["cells"]
        out["layers"] = part["layers"]
        log(f"  {state['name']}: {len(part['cells'])} batch(es), {time.time() - t1:.0f} s")
    return out


def measure(study: FidelityStudy, backend: str = "auto", log: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """Make the states and measure every cell of ``study``; the record's numbers (without provenance).

    ``jobs``: processes, each making the states of some of ``study.state_runs`` and
    measuring them with the current thread count; the numbers do not depend on it
    (every state and draw has its own seeds).
    """
    backend = concrete_backend(backend)
    t0 = time.time()
    runs = [(r,) for r in study.state_runs]
    if jobs <= 1 or len(runs) == 1:
        parts = [_measure_runs(study, backend, study.state_runs, log)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n = len(runs)
        with ProcessPoolExecutor(min(jobs, n), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_measure_runs, [study] * n, [backend] * n, runs, [print] * n,
                                  [torch.get_num_threads()] * n))
    out = {"states": [s for p in parts for s in p["states"]], "cells": [c for p in parts for c in p["cells"]],
           "layers": parts[0]["layers"], "wall_s": round(time.time() - t0, 1)}
    return _round(out)
