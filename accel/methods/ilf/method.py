"""ILF's runtime: the config, ``apply_ilf`` (load the trained module, check it fits, hook the loop region) and
the registration. The package docstring (``accel.methods.ilf``) says what and why."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from accel.config import AccelConfig
from accel.hooks import MethodScope
from accel.pipelines.adapters import ADAPTERS
from accel.registry import register_accelerator

from .loop import install_loop
from .module import FeedbackModule, check_model

logger = logging.getLogger("accel.ilf")

FAMILIES = tuple(adapter.name for adapter in ADAPTERS if adapter.sequential_blocks)


@dataclasses.dataclass
class ILFConfig(AccelConfig):
    """Configuration of ILF (arXiv 2501.13107).

    Args:
        module: the folder a trained feedback module was saved to (``accel.train_feedback(...).save(dir)``), or
            the ``FeedbackModule`` itself; required.
    """

    method = "ilf"
    module: str | FeedbackModule | None = None

    def validate(self) -> None:
        if isinstance(self.module, os.PathLike):
            self.module = os.fspath(self.module)
        if self.module is not None and not isinstance(self.module, (str, FeedbackModule)):
            raise ValueError(f"module={self.module!r} is not accepted; pass the folder a feedback module was saved "
                             "to, or the FeedbackModule accel.train_feedback returned.")
        if isinstance(self.module, str):
            FeedbackModule.read_card(self.module)  # a clear error now, not at wrap time

    def to_dict(self) -> dict:
        data = super().to_dict()
        if isinstance(self.module, FeedbackModule):
            data["module"] = None  # the tensors are saved with module.save
        return data


def apply_ilf(scope: MethodScope, config: ILFConfig) -> None:
    """Load ``config.module`` for the pipeline behind ``scope`` and hook its loop region."""
    if config.module is None:
        raise ValueError("ILF needs a trained feedback module: module = accel.train_feedback(pipe, inputs); "
                         "module.save(dir); accel.wrap(pipe, 'ilf', module=dir).")
    card = config.module.card if isinstance(config.module, FeedbackModule) else FeedbackModule.read_card(config.module)
    denoiser = card.get("denoiser", "transformer")
    if denoiser not in scope.blocks:
        raise ValueError(f"The feedback module was trained for the pipeline's {denoiser!r}, which "
                         f"{type(scope.pipe).__name__} does not have (denoisers: {sorted(scope.blocks)}).")
    model, blocks = scope.denoisers[denoiser], scope.blocks[denoiser]
    if isinstance(config.module, FeedbackModule):
        check_model(card, model)
        module = config.module.eval().requires_grad_(False)
    else:
        module = FeedbackModule.load(Path(config.module), model, blocks)
    module.to(next(model.parameters()).device)
    if card.get("scheduler") not in (None, type(scope.pipe.scheduler).__name__):
        raise ValueError(f"The feedback module was trained with {card['scheduler']}; this pipeline samples with "
                         f"{type(scope.pipe.scheduler).__name__}. Train one for this scheduler.")

    def enabled() -> bool:
        info = scope.current if scope.is_active() else None
        return info is not None and info.denoiser == denoiser

    state = install_loop(module, blocks, enabled, lambda block, hook: scope.register_hook(block, hook, "loop"))
    steps = card.get("ilf_steps")

    def check_steps(arguments: dict) -> None:
        state.loops = 0
        asked = arguments.get("num_inference_steps")
        if steps is not None and asked is not None and asked != steps:
            logger.warning("ILF: this feedback module was trained for %s steps (%s base steps); the call asks for "
                           "%s, a step size it was not trained for.", steps, card.get("num_inference_steps"), asked)

    scope.before_each_call(check_steps)
    scope.extras.update(region=list(module.region), trained_steps=steps, scale=module.scale)

register_accelerator(
    ILFConfig,
    apply_ilf,
    description="ILF: a trained feedback block re-runs an inner loop of blocks so that half the steps suffice",
    families=FAMILIES,
    trained_with="accel.train_feedback",
    role="feedback",
)
