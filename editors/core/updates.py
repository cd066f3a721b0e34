"""Closed-form weight updates, in [out, in] orientation: W <- W + A @ B.T.

Let C = E[k k^T] be the second moment of the keys (statistics), K the new keys (columns)
and R the wanted changes of the layer output at those keys.

rank_one (ROME):       A = r,  B = C^-1 k / (k_d^T C^-1 k)
    so that (W + A B^T) k_d = W k_d + r, while keys uncorrelated with k under C barely move.
    k_d = k in the corrected form (R-ROME); the original uses the bare-prompt key there.
least_squares (MEMIT): A = R,  B = (lam C + K K^T)^-1 K
    the minimiser of |(W + D) K - (W K + R)|^2 + lam * tr(D C D^T).
    NSE solves the same system restricted to the selected neurons S (rows of B outside S
    are zero), with the earlier edits' keys added to lam C.
equality_constrained (EMMET): A = R,  B = C^-1 K (K^T C^-1 K + lam_e I)^-1
    the minimiser of tr(D C D^T) subject to (W + D) K = W K + R (lam_e -> 0): every edit's
    key is mapped exactly onto its new value while the preserved keys move least. For one
    key it is rank_one with k_d = k; lam_e keeps K^T C^-1 K invertible for close keys.
null_space (AlphaEdit): D = D' P with P the projection on the null space of C, so the
    preserved keys' outputs (almost) cannot change; see `null_space_update`. Where C has
    no exact null space, lam_c P C P (the preserved keys' energy left inside P) can join
    the system, MEMIT's penalty restricted to P.
ridge (UltraEdit): A = V,  B = K (K^T K + lam I)^-1
    the minimiser of |(W + D) K - (W K + V)|^2 + lam |D|^2 (no statistics: the identity
    in place of C), solved in the n x n kernel form.
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
    second_moment: torch.Tensor,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    lam: float,
    earlier: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [d_in, n], residuals [d_out, n] -> factors (A [d_out, n], B [d_in, n]).
    `earlier` (K_p K_p^T, the keys of edits already made) joins lam C in the system, so
    those keys are protected like the preserved ones (sequential MEMIT, NSE)."""
    keys = keys.double()
    system = lam * second_moment.double() + keys @ keys.T
    if earlier is not None:
        system = system + earlier.double()
    return residuals.double(), torch.linalg.solve(system, keys)


def equality_constrained_update(
    second_moment: torch.Tensor,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [d_in, n], residuals [d_out, n] -> factors (A [d_out, n], B [d_in, n]) of
    D = R (K^T C^-1 K + lam I)^-1 K^T C^-1, so that D K = R (K^T C^-1 K)(K^T C^-1 K + lam I)^-1:
    R itself as lam -> 0."""
    keys = keys.double()
    spread = torch.linalg.solve(second_moment.double(), keys)  # C^-1 K
    gram = keys.T @ spread  # K^T C^-1 K
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return residuals.double(), torch.linalg.solve(gram + lam * eye, spread.T).T


def neurons_carrying(keys: torch.Tensor, share: float) -> torch.Tensor:
    """NSE's neuron selection: the fewest input dimensions (MLP neurons) of the keys
    [d_in, n] whose summed |activation| reaches `share` of the total, most active first."""
    scores = keys.abs().sum(1)
    order = torch.argsort(scores, descending=True)
    cumulative = torch.cumsum(scores[order], 0)
    count = int(torch.searchsorted(cumulative, share * cumulative[-1]).item()) + 1
    return torch.sort(order[: min(count, len(order))]).values


def null_space_projection(second_moment: torch.Tensor, energy: float) -> torch.Tensor:
    """P = U0 U0^T over the eigenvectors of C with the smallest eigenvalues that together hold
    at most `energy` of its trace: the directions the preserved keys (almost) never take,
    where an update can go without changing their outputs (AlphaEdit).

    The budget is a share of the keys' energy, not a fraction of the largest eigenvalue: a
    few outlier activations make the largest eigenvalue hundreds of times the mean, and a
    threshold relative to it would count directions holding a third of the energy as null."""
    values, vectors = torch.linalg.eigh(second_moment.double())  # ascending
    values = values.clamp(min=0)  # round-off can leave tiny negative eigenvalues
    held = torch.cumsum(values, 0) / values.sum()
    free = vectors[:, held <= energy]
    return free @ free.T


def null_space_update(
    projection: torch.Tensor,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    earlier: torch.Tensor | None,
    lam: float,
    preserved: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit: D = R K^T P (K_p K_p^T P + K K^T P + lam I)^-1, as factors A = R and
    B = (P (K K^T + K_p K_p^T) + lam I)^-1 P K, whose columns lie in the range of P, so
    D k0 = 0 for every preserved key k0 (P k0 = 0). `earlier` is K_p K_p^T, the keys of the
    edits already made, which the update also leaves (almost) alone. `preserved` (lam_c C)
    joins K K^T: with D = D P only P C P counts, so it weighs the damage to preserved keys
    whose energy is not quite null in P (the minimiser of |D K - R|^2 + |D K_p|^2
    + tr(D lam_c C D^T) + lam |D|^2 over D = D P)."""
    keys = keys.double()
    gram = keys @ keys.T
    if earlier is not None:
        gram = gram + earlier.double()
    if preserved is not None:
        gram = gram + preserved.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    system = projection @ gram + lam * eye
    return residuals.double(), torch.linalg.solve(system, projection @ keys)


def ridge_update(
    keys: torch.Tensor, values: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [d_in, n], wanted output changes values [d_out, n] -> factors (A [d_out, n],
    B [d_in, n]) of D = V K^T (K K^T + lam I)^-1 = V (K^T K + lam I)^-1 K^T, the ridge
    regression of the changes on the keys; the n x n system costs little however wide the
    layer is."""
    keys = keys.double()
    gram = keys.T @ keys
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return values.double(), torch.linalg.solve(gram + lam * eye, keys.T).T
