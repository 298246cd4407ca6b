"""BAC calibration: run the uncached pipeline on a few inputs, record every branch output (and, for
``metric="sensitivity"``, its projection on the gradients of the final sample), and solve for each branch's update
steps (``accel.methods.bac.solvers``). Backs ``accel.calibrate(pipe, "bac", ...)``."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook

from accel.config import check_int
from accel.hooks import MethodScope, temporary_scope

from .method import METRICS, BACConfig
from .schedule import BACSchedule, branch_names, describe_models
from .solvers import (
    bubbling_union,
    least_error_schedules,
    least_error_updates,
    optimal_updates,
    schedule_error,
    sensitivity_gram,
    share_updates,
    update_count,
)

_RECORD_HOOK = "record"


class BranchRecorder:
    """Per (branch, CFG branch): each step's output, one flattened fp16 row per sample."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self.pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def record(self, name: str, branch: str, step: int, output) -> None:
        tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
        # kept on the CPU: the statistics are NumPy's, and a GPU's memory is the denoiser's
        rows = torch.cat([t.detach().reshape(t.shape[0], -1).to("cpu", torch.float16) for t in tensors], dim=1)
        self.pending.setdefault((name, branch), {})[step] = rows

    def end_call(self) -> None:
        """Append this call's samples (batch rows) to what earlier calls recorded."""
        for key, steps in self.pending.items():
            stored = self.outputs.setdefault(key, {})
            for step, rows in steps.items():
                stored[step] = torch.cat([stored[step], rows]) if step in stored else rows
        self.pending = {}

    def statistics(self, name: str) -> tuple[list[int], np.ndarray, np.ndarray, float]:
        """(steps the branch ran on, cosine-similarity matrix over them, Gram matrix of its outputs centred on their
        mean over the steps, relative L1 volatility), each a mean over samples, summed or averaged over CFG
        branches. Centring leaves every reuse or forecast error unchanged (their weights sum to zero) and keeps the
        errors computed from the Gram matrix clear of cancellation."""
        per_branch = [steps for (other, _), steps in self.outputs.items() if other == name]
        steps = sorted(set().union(*per_branch)) if per_branch else []
        similarity, gram, volatility = np.zeros((len(steps), len(steps))), np.zeros((len(steps), len(steps))), 0.0
        for recorded in per_branch:
            stack = torch.stack([recorded[s].float() for s in steps])  # [T, N, D]
            unit = torch.nn.functional.normalize(stack, dim=2)
            similarity += torch.einsum("ind,jnd->ij", unit, unit).numpy() / unit.shape[1]
            centred = stack - stack.mean(dim=0, keepdim=True)
            gram += torch.einsum("ind,jnd->ij", centred, centred).double().numpy() / stack.shape[1]
            if len(steps) > 1:
                change = (stack[1:] - stack[:-1]).abs().mean(dim=(1, 2))
                volatility += float((change / stack[:-1].abs().mean(dim=(1, 2)).clamp_min(1e-12)).mean())
        count = max(1, len(per_branch))
        return steps, similarity / count, gram, volatility / count


def _tensors(output) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]


def sample_count(output) -> int:
    """How many samples a pipeline call returned (images, or videos)."""
    for attr in ("images", "frames", "videos"):
        value = getattr(output, attr, None)
        if value is not None:
            return len(value)
    raise ValueError(f"metric='sensitivity' cannot tell how many samples {type(output).__name__} holds.")


def _rows(tensors: list, like: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Tensors flattened per batch row and concatenated; a ``None`` (a gradient that does not reach the sample) is
    zeros shaped as its counterpart in ``like``."""
    like = like or tensors
    return torch.cat([(t if t is not None else torch.zeros_like(ref)).detach().reshape(ref.shape[0], -1)
                      for t, ref in zip(tensors, like)], dim=1)


class SensitivityRecorder:
    """For ``metric="sensitivity"``: runs each calibration call with gradients and keeps, per branch, the outputs
    of every step projected on the gradients of random projections of the final sample (``sensitivity_gram``)."""

    def __init__(self, projections: int) -> None:
        self.projections = projections
        self.live: dict[tuple[str, str], dict[int, Any]] = {}  # (branch, CFG branch) -> step -> output in the graph
        self.products: dict[str, list[np.ndarray]] = {}  # branch -> [samples, T, T] per call and projection

    def record(self, name: str, branch: str, step: int, output) -> None:
        if any(t.requires_grad for t in _tensors(output)):
            self.live.setdefault((name, branch), {})[step] = output

    def run(self, scope: MethodScope, kwargs: dict, num_inference_steps: int, seed: int) -> None:
        """One calibration call with gradients; its projections are added to ``products``."""
        scheduler, final = scope.pipe.scheduler, []

        def keep_final_sample(output, steps_done: int):
            # the last step's sample is the output: keep it in the graph, hand the pipeline a detached copy
            if steps_done != len(scheduler.timesteps):
                return output
            sample = output[0] if isinstance(output, tuple) else output.prev_sample
            final.append(sample)
            torch.set_grad_enabled(False)  # decoding needs no graph; the enclosing enable_grad restores the mode
            if isinstance(output, tuple):
                return (sample.detach(), *output[1:])
            output.prev_sample = sample.detach()
            return output

        parameters = [p for model in scope.denoisers.values() for p in model.parameters()]
        flags = [p.requires_grad for p in parameters]
        try:
            for parameter in parameters:  # a frozen model would leave no graph from the branches to the sample
                parameter.requires_grad_(True)
            with torch.enable_grad(), scope.observe_steps(keep_final_sample):
                output = scope.call_undecorated(**kwargs, num_inference_steps=num_inference_steps)
            if not final or not final[-1].requires_grad:
                raise ValueError("metric='sensitivity' found no final sample in the autograd graph: the pipeline's "
                                 "last scheduler.step output does not depend on the denoiser.")
            with torch.enable_grad():
                self._project(final[-1], sample_count(output), seed)
        finally:
            for parameter, flag in zip(parameters, flags):
                parameter.requires_grad_(flag)
            self.live = {}

    def _project(self, final: torch.Tensor, samples: int, seed: int) -> None:
        # key -> each step's output tensors, in step order; the gradients come back in this order
        held = {key: [_tensors(outputs[step]) for step in sorted(outputs)] for key, outputs in self.live.items()}
        tensors = [t for steps in held.values() for ts in steps for t in ts]
        flattened = {}  # key -> [T, rows, D]: every step's output, flattened per batch row
        for key, steps in held.items():
            flattened[key] = torch.stack([_rows(ts) for ts in steps]).cpu().double()
            if flattened[key].shape[1] % samples:
                raise ValueError(f"metric='sensitivity' cannot assign {flattened[key].shape[1]} batch rows to "
                                 f"{samples} samples.")
        for index in range(self.projections):
            generator = torch.Generator().manual_seed(seed * self.projections + index)
            direction = torch.randn(final.shape, generator=generator, dtype=final.dtype).to(final.device)
            grads = iter(torch.autograd.grad((final * direction).sum(), tensors, allow_unused=True,
                                             retain_graph=index < self.projections - 1))
            products: dict[str, np.ndarray] = {}
            for key, steps in held.items():
                g = torch.stack([_rows([next(grads) for _ in ts], like=ts) for ts in steps]).cpu().double()
                y, count = flattened[key], len(steps)
                # row r belongs to sample r % samples (CFG batches stack [uncond; cond] or [cond; uncond])
                product = torch.einsum("krd,ird->rki", g, y).reshape(-1, samples, count, count).sum(0).numpy()
                earlier = products.get(key[0])
                if earlier is not None and earlier.shape != product.shape:
                    raise ValueError(f"metric='sensitivity' needs every CFG branch of {key[0]} on the same steps.")
                products[key[0]] = product if earlier is None else earlier + product
            for name, product in products.items():
                self.products.setdefault(name, []).append(product)

    def gram(self, names: list[str]) -> np.ndarray:
        """``sensitivity_gram`` of a group of branches: their projected errors add up before they are squared.
        Rows of ``products[name]`` are (call, projection, sample) in the same order for every branch."""
        return sensitivity_gram(sum(np.concatenate(self.products[name]) for name in names))


class RecordHook(ModelHook):
    def __init__(self, scope: MethodScope, recorders: list, denoiser: str, name: str) -> None:
        super().__init__()
        self.scope, self.recorders, self.denoiser, self.name = scope, recorders, denoiser, name

    def post_forward(self, module, output):
        info = self.scope.current if self.scope.is_active() else None
        if info is not None and info.denoiser == self.denoiser:
            for recorder in self.recorders:
                recorder.record(self.name, info.branch, info.step, output)
        return output


def _check_inputs(inputs, num_inference_steps) -> list[dict]:
    if isinstance(inputs, dict):
        inputs = [inputs]
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else None
    if not inputs or not all(isinstance(kwargs, dict) for kwargs in inputs):
        raise ValueError("inputs must be a dict of pipeline call arguments or a non-empty list of them.")
    if any("num_inference_steps" in kwargs for kwargs in inputs):
        raise ValueError("Pass num_inference_steps to calibrate itself, not inside inputs.")
    check_int("num_inference_steps", num_inference_steps, minimum=1)
    return inputs


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    return copy


def with_generator_copies(kwargs: dict) -> dict:
    """``kwargs`` with each ``generator`` replaced by a copy in the same state. Calibration leaves the caller's
    generators untouched, so the same inputs give the same schedule however often they are used."""
    generator = kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        return {**kwargs, "generator": _copy_generator(generator)}
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        return {**kwargs, "generator": [_copy_generator(g) for g in generator]}
    return kwargs


def _schedule_groups(branches: dict[str, tuple], statistics: dict[str, tuple], per_block: bool) -> list[list[str]]:
    """The branches that share one schedule: each alone, or with ``per_block`` every branch of a block that ran on
    the same steps."""
    if not per_block:
        return [[name] for name in branches]
    groups: dict[tuple, list[str]] = {}
    for name, (denoiser, index, _, _) in branches.items():
        groups.setdefault((denoiser, index, tuple(statistics[name][0])), []).append(name)
    return list(groups.values())


def _shared_schedules(groups: list[list[str]], statistics: dict[str, tuple], count: int, config: BACConfig,
                      group_gram: Callable[[list[str]], np.ndarray]) -> list[list[int]]:
    """Each group's update steps (indices into the steps it ran on) under ``share_budget``: the counts with the least
    summed error for the same total as without sharing (``count`` per group, fewer for a group that ran on fewer
    steps), each group at most twice ``count``. ``group_gram(group)`` is the Gram matrix the errors come from."""
    tables, errors, total = [], [], 0
    for group in groups:
        steps = statistics[group[0]][0]
        gram = group_gram(group) if steps else np.zeros((1, 1))
        final_step = config.compute_final_step and len(steps) >= 2
        size = gram.shape[-1]
        tables.append(least_error_schedules(gram, min(size, 2 * count), config.forecast, final_step,
                                            config.forecast_gain))
        errors.append([schedule_error(gram, updates, config.forecast, config.forecast_gain)
                       for updates in tables[-1]])
        total += min(count, size)
    return [table[group_count - 1] for table, group_count in zip(tables, share_updates(errors, total))]


def calibrate_bac(pipe, config: BACConfig, inputs: Iterable[dict], *, num_inference_steps: int,
                  progress: bool = True, _bac_passive: bool = False) -> BACSchedule:
    """Run the pipeline uncached on ``inputs`` and build the BAC schedule (see ``accel.calibrate``).

    ``_bac_passive``: BAC's own first-call calibration (``auto``), which holds its hooks passive meanwhile."""
    from tqdm.auto import tqdm

    inputs = _check_inputs(inputs, num_inference_steps)
    recorder = BranchRecorder()
    sensitivity = SensitivityRecorder(config.projections) if config.metric == "sensitivity" else None
    recorders = [recorder] if sensitivity is None else [recorder, sensitivity]
    branches: dict[str, tuple] = {}

    def install(scope: MethodScope) -> None:
        if BACConfig.method in scope.applied_methods() and not _bac_passive:
            raise ValueError("This pipeline is already wrapped with BAC; calibrate it unwrapped (accel.unwrap).")
        branches.update(branch_names(scope))
        for name, (denoiser, _, _, module) in branches.items():
            scope.register_hook(module, RecordHook(scope, recorders, denoiser, name), f"{_RECORD_HOOK}.{name}")

    with temporary_scope(pipe, "bac-calibration", install) as scope:
        models = describe_models(scope.denoisers, pipe.scheduler)
        for index, kwargs in enumerate(tqdm(inputs, desc="BAC calibration", disable=not progress)):
            if sensitivity is None:
                pipe(**with_generator_copies(kwargs), num_inference_steps=num_inference_steps)
            else:
                sensitivity.run(scope, with_generator_copies(kwargs), num_inference_steps, seed=index)
            recorder.end_call()

    count = update_count(num_inference_steps, config.budget)
    statistics = {name: recorder.statistics(name) for name in branches}
    volatility = {name: stats[3] for name, stats in statistics.items()}
    groups = _schedule_groups(branches, statistics, config.per_block)

    def group_gram(group: list[str]) -> np.ndarray:
        if sensitivity is not None:
            return sensitivity.gram(group)
        return sum(statistics[name][2] for name in group)

    # share_budget: each group's schedule comes out of the tables the sharing already computed
    shared = _shared_schedules(groups, statistics, count, config, group_gram) if config.share_budget else None
    updates = {}
    for index, group in enumerate(groups):
        steps = statistics[group[0]][0]
        if not steps:  # a branch that never ran (an expert outside its steps): never needed, keep step 0
            updates.update({name: [0] for name in group})
            continue
        final_step = config.compute_final_step and len(steps) >= 2
        if shared is not None:
            chosen = shared[index]
        elif config.metric in ("l2", "sensitivity"):
            chosen = least_error_updates(group_gram(group), count, config.forecast, final_step,
                                         config.forecast_gain)
        else:
            similarity = sum(statistics[name][1] for name in group)
            if final_step and count >= 2:
                # the final step is fixed: the program places the other updates over the steps before it
                chosen = [*optimal_updates(similarity[:-1, :-1], count - 1), len(steps) - 1]
            else:
                chosen = optimal_updates(similarity, count)
        updates.update({name: [steps[i] for i in chosen] for name in group})
    bubbled = bubbling_union(updates, volatility, branches, config.top_k)
    first = next(iter(recorder.outputs.values()), {})
    samples = next(iter(first.values())).shape[0] if first else 0
    metadata = {
        "models": models,
        "num_inference_steps": num_inference_steps,
        "budget": config.budget,
        "updates_per_branch": count,
        "final_step_computed": config.compute_final_step,
        "forecast": config.forecast,
        **({"forecast_gain": config.forecast_gain} if config.forecast else {}),
        "top_k": config.top_k,
        "per_block": config.per_block,
        "share_budget": config.share_budget,
        "metric": METRICS[config.metric],
        **({"projections": config.projections} if sensitivity is not None else {}),
        "volatility": "relative mean L1 change between consecutive steps",
        "bubbled_branches": bubbled,
        "calibration_calls": len(inputs),
        "samples_per_cfg_branch": samples,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return BACSchedule(num_inference_steps, updates, metadata)
