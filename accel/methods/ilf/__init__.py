"""ILF: an inner loop of feedback that lets a DiT sample in half the steps.

Paper: Gwilliam et al., "Accelerate High-Quality Diffusion Models with Inner Loop Feedback", arXiv 2501.13107.

What it does: a feedback module F, a block of the backbone's own configuration with fresh weights, reads the
hidden state at the end of an inner-loop region of blocks [a, b]; its output, times a learnable scale per block
(zero at initialisation, so the untrained model is exactly the backbone), is added to the input of every block of
the region, which then runs again; the rest of the network follows. Only F and the scales are trained, the
backbone stays frozen, and the wrapped pipeline is called with half the steps (``accel.wrap(pipe, "ilf",
module=dir)``; ``module = accel.train_feedback(pipe, inputs, num_inference_steps=20)`` trains one).

The loss (the authors' code is private; the paper's figure gives the target, not the form): MSE between the
model's noise prediction at a teacher state (x_j, t_j) and the teacher's own prediction at the next base step
(x_{j+1}, t_{j+1}), on every step of the frozen model's N-step trajectories, data-free. Why: a sampler taking a
step of 2Δ from x_t with the prediction of the state Δ later is the midpoint rule, second order where the plain
step is first order, so N/2 such steps track the N-step trajectory; the target needs no solver or CFG algebra, so
one loss serves every scheduler and family. The last step, with no later step, keeps its own prediction.

Where this implementation departs from the paper, and why:
* The region, its length and the scale shape (one scalar per block, or one per channel) are chosen by
  measurement on the reference models (``docs/methods/ilf.md``); the default is one block in the middle, the
  longest region that still leaves 1.7x at half the steps on a 12-block model.
* Variance channels of DiT-style outputs (twice the input channels) are left out of the loss: samplers ignore them.
* F and the scales see each block's own call arguments (timestep, conditioning) of the current forward.

Measured figures and the command that reproduces them: ``docs/benchmarks/feedback.md``
(``python benchmarks/feedback.py``).
"""

from .method import ILFConfig, apply_ilf
from .module import FeedbackModule
from .training import FeedbackSettings, train_feedback

__all__ = ["FeedbackModule", "FeedbackSettings", "ILFConfig", "apply_ilf", "train_feedback"]
