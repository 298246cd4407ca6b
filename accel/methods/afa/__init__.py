"""AFA: an ensemble of same-architecture denoisers, mixed block by block by a trained aggregator.

Paper: Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025, arXiv 2405.17082.

What it does: the members (fine-tunes of one base, say) run in lock-step. Their block inputs are mixed, and after
every block a Spatial-Aware Block-Wise (SABW) aggregator mixes their outputs: it projects the concatenated member
features of each token down, modulates them by a timestep embedding, runs self-attention and attention to the
condition embedding, and a zero-initialised projection gives N logits per token; the per-token softmax weights sum
the members' features. The mix is every member's next input. At initialisation the weights are 1/N, exactly the
members' mean. Only the aggregator is trained, with the members' own denoising loss on training data
(``accel.train_aggregator``); ``accel.ensemble([pipe_a, pipe_b], aggregator=dir)`` (or ``accel.wrap(pipe_a,
"afa", members=[pipe_b], aggregator=dir)``) gives a pipeline called like the members.

Where this implementation departs from the paper, and why:
* Under classifier-free guidance the unconditional branch is mixed with the conditional branch's weights (same
  sample, step and mixing point; ``guidance_mix="per-branch"`` is the paper's own routing by the null condition):
  otherwise guidance amplifies the difference between two differently mixed models (``docs/methods/afa.md``).
* DiT families: one mixing point per block plus the first block's inputs. The U-Net (the paper's SD 1.5 case,
  ``unet.py``) mixes per stage where the paper mixes after every layer: diffusers calls stages, not layers.
* The members' stream and time embeddings are their own; their prompt embeddings are the lead pipeline's (the
  paper runs each member's text encoder; fine-tunes of one base usually share it).
* The aggregator embeds the timestep and the condition (class label or ``encoder_hidden_states``) itself, shared
  by all mixing points, instead of averaging the members' own embeddings (computed per block in DiT, once in
  PixArt and Wan). An adaptive LayerNorm stands in for the paper's timestep-conditioned ResNet block; one layer
  of width ``hidden`` (64 by default, the paper 128) keeps the aggregator small next to a small model.
* The lead member's output head reads the last mix (the paper mixes every member's last layer); a dual-stream
  block's context stream is mixed by the plain mean.

Measured figures and the command that reproduces them: ``docs/benchmarks/ensemble.md``
(``python benchmarks/ensemble.py``).
"""

from .aggregator import Aggregator
from .method import AFAConfig, apply_afa
from .training import AggregatorSettings, train_aggregator, validation_loss

__all__ = ["AFAConfig", "Aggregator", "AggregatorSettings", "apply_afa", "train_aggregator", "validation_loss"]
