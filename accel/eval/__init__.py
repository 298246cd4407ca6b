"""Evaluation: the main job's quick comparison (``accel.eval.quick``) and, later, the full harness (FID, CLIP score,
fidelity, latency, FLOPs) with batch evaluation under ``accelerate launch``."""
