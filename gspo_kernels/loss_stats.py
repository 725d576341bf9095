"""What every backend of the GSPO loss agrees on: the levels, the exp guards, the statistics row.

The PyTorch path and the Triton kernels (gspo_kernels/loss.py, gspo_kernels/loss_triton.py) write
and read the same per-sequence statistics; the plain reference (gspo_kernels/reference.py)
applies the same guards.
"""

from __future__ import annotations

import enum

LEVELS = ("sequence", "sequence_token", "token")

# exp() guards: every log-ratio is clamped from above before it is exponentiated, so no
# ratio can overflow whatever the inputs. A clamped term keeps its (huge but finite) value
# and gets no gradient through the clamp.
POLICY_LOG_RATIO_MAX = 10.0  # sequence and token importance ratios: at most e^10 ~ 2.2e4
KL_LOG_RATIO_MAX = 20.0  # log(pi_ref / pi_theta) inside the k3 KL estimator


class Stat(enum.IntEnum):
    """Columns of the per-sequence statistics written by the forward pass."""

    LOSS = 0  # policy term + beta * KL term; 0 for a sequence without response tokens
    LENGTH = 1  # number of response tokens n_i
    SEQ_LOG_RATIO = 2  # (1/n_i) sum_t (logp - old_logp), before the clamp
    RATIO_SUM = 3  # s_i for the sequence levels, sum of token ratios for "token"
    CLIP_LOW = 4  # response tokens clipped at 1 - eps_low
    CLIP_HIGH = 5  # response tokens clipped at 1 + eps_high
    KL_SUM = 6  # sum over response tokens of the k3 KL


NUM_STATS = len(Stat)
