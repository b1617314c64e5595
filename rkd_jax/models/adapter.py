"""The student-side feature adapter of ICKD (a training-only module, never part of the student).

ICKD (Liu et al. 2021) does not compare the student's features with the teacher's directly:
the student's map first goes through a learned 1x1 convolution and BatchNorm, and the loss
is taken between the teacher's inter-channel correlation and that of the adapted map. The
adapter gives the student a free linear map in which to match the teacher's correlation,
so the loss does not have to reshape the student's own decoder features. rkd_jax trains it
with the student (same optimizer and schedule) and keeps it in the train state's `aux`
part; it is saved with the run's checkpoints (so a killed run resumes it) but not with the
student's variables, and no inference path builds it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class ChannelAdapter(nn.Module):
    """1x1 conv (no bias) + BatchNorm on `[B, HW, C]` or `[B, H, W, C]` features.

    Attributes:
      features: output channels (the teacher's channel count).
    """

    features: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if x.ndim not in (3, 4):
            raise ValueError(f"ChannelAdapter: expected [B, HW, C] or [B, H, W, C], got {x.shape}")
        y = nn.Dense(self.features, use_bias=False, name="conv1x1")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(y)
