"""QuEST: low-bit weights and activations (W8A8 / W4A8 / W4A4), finetuned selectively against the float model.

Paper: Wang et al., "QuEST: Low-bit Diffusion Model Quantization via Efficient Selective Finetuning", arXiv
2402.03666 (ICCV 2025); built on Q-Diffusion (arXiv 2302.04304).

``accel.calibrate(pipe, "quest-w4a8", inputs, num_inference_steps=T)`` samples the float pipeline on ``inputs``
(both CFG branches), quantizes every Linear and Conv2d of the denoiser (``quantizers``: per-output-channel weights
with a searched clipping range; inputs with one learnable step size per group of timesteps), then finetunes:
stage A the time-embedding / AdaLN-modulation layers group by group, stage B the feed-forward and q/k/v layers and
every activation step size, each on local layer MSE + final output MSE against the float model (``calibration``).
The ``QuESTArtifact`` it returns saves packed codes (two per byte at 4 bits) as safetensors with a JSON card;
``accel.wrap(pipe, "quest-w4a8", artifact=dir)`` runs the layers from it (``method``): W8A8 per-tensor layers as
integer matmuls (``torch._int_mm``), the others dequantized per layer; ``accel.summary`` says which ran.

Departures from the paper (measurements: ``docs/methods/quest.md``):
* No AdaRound / BRECQ block reconstruction before finetuning (the authors resume Q-Diffusion's checkpoints for it):
  weights start from the searched clipping range, which stays fixed while the finetuned float weights move.
* Each step group's activation range is searched on that group's own inputs (the authors search at the first
  timestep and copy); groups split each call's steps evenly, so an artifact serves any step count.
* Stage A uses the weights' learning rate for its activation scales, as the authors' code does; iteration counts
  are scaled to small models (config). The first layer is the one that reads the latent, the last the last to run.
* ``quantize_attention`` quantizes q, k, v with dynamic per-tensor ranges (not calibrated), and keeps the softmax
  probabilities in float, as the authors' Stable Diffusion command (``--sm_abit 16``) does. Label-embedding tables
  are quantized per row at the weight bits (ours: on digits-dit they held two thirds of the remaining bytes).

Measured on the shipped ``digits-dit`` (20 steps, 500 samples, ``python benchmarks/quantization.py``): PSNR against
float 39.8 / 34.8 / 29.6 dB at W8A8 / W4A8 / W4A4 (round-to-nearest: 36.5 / 31.4 / 29.6), W8A8 FID 18.20 against
float's 18.32, 4-bit weights in 0.27 of the fp16 bytes, calibration under 4 minutes on 2 CPU cores.
"""

from accel.registry import register_accelerator

from .artifact import QuantizedLayer, QuESTArtifact
from .calibration import calibrate_quest
from .method import QuESTConfig, apply_quest

__all__ = ["QuESTArtifact", "QuESTConfig", "QuantizedLayer", "apply_quest", "calibrate_quest"]

register_accelerator(
    QuESTConfig,
    apply_quest,
    description="QuEST: W8A8 / W4A8 / W4A4 weights and activations, selectively finetuned against the float model",
    presets={
        "quest-w8a8": lambda: QuESTConfig(weight_bits=8, activation_bits=8),
        "quest-w4a8": lambda: QuESTConfig(weight_bits=4, activation_bits=8),
        # at A4 (per-channel ranges) training the activation scales lost PSNR on digits-dit (docs/methods/quest.md)
        "quest-w4a4": lambda: QuESTConfig(weight_bits=4, activation_bits=4, activation_lr=0.0),
    },
    calibrate=calibrate_quest,
    artifact_field="artifact",
    role="quantization",
)
