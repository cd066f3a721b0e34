"""Closed-form weight updates, in [out, in] orientation: W <- W + A @ B.T.

Let C = E[k k^T] be the second moment of the keys (statistics), K the new keys (columns)
and R the wanted changes of the layer output at those keys.

rank_one (ROME):       A = r,  B = C^-1 k / (k_d^T C^-1 k)
    so that (W + A B^T) k_d = W k_d + r, while keys uncorrelated with k under C barely move.
    k_d = k in the corrected form (R-ROME); the original uses the bare-prompt key there.
least_squares (MEMIT): A = R,  B = (lam C + K K^T)^-1 K
    the minimiser of |(W + D) K - (W K + R)|^2 + lam * tr(D C D^T).
"""

from __future__ import annotations

import torch


def rank_one_update(
    c_inv: torch.Tensor,
    key: torch.Tensor,
    value_change: torch.Tensor,
    denominator_key: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    c_inv = c_inv.double()
    u = c_inv @ key.double()
    right = u / (denominator_key.double() @ u)
    return value_change.double()[:, None], right[:, None]


def least_squares_update(
    second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [d_in, n], residuals [d_out, n] -> factors (A [d_out, n], B [d_in, n])."""
    keys = keys.double()
    system = lam * second_moment.double() + keys @ keys.T
    return residuals.double(), torch.linalg.solve(system, keys)
