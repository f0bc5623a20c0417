"""Rank-constrained backbone fine-tuning math (CRAFT-LoRA Eq. 1-4).

Convention: a ``d_out x d_in`` weight ``W0`` is projected on its *input* side with an
orthonormal ``Q`` of shape ``(d_in, r)``: ``W = W0 - W0 Q Q^T``. The projected weight
no longer responds to inputs inside span(Q), the subspace left free for the LoRAs.
Conv weights ``(c_out, c_in, kh, kw)`` are treated as ``(c_out, c_in * kh * kw)``.
"""

from __future__ import annotations

import torch

__all__ = ["rank_schedule", "orthonormal_basis", "projection_residual", "merged_basis", "as_matrix"]


def rank_schedule(num_layers: int, r_max: int = 128, r_min: int = 4) -> list[int]:
    """Hierarchical rank, Eq. 2: ``r_l = r_max - (l - 1) / (L - 1) * (r_max - r_min)``, rounded."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if r_min <= 0 or r_max <= 0:
        raise ValueError(f"ranks must be positive, got r_max={r_max}, r_min={r_min}")
    if r_min > r_max:
        raise ValueError(f"r_min must not exceed r_max, got r_min={r_min} > r_max={r_max}")
    if num_layers == 1:
        return [r_max]
    return [round(r_max - (l - 1) / (num_layers - 1) * (r_max - r_min)) for l in range(1, num_layers + 1)]


def orthonormal_basis(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``Q`` (d_in, r) spanning a learnable basis ``B`` (d_in, r), via QR (Eq. 1).

    The sign of each column is fixed so that ``diag(R) >= 0``, making Q a smooth,
    unique function of B (differentiable for training).
    """
    if B.ndim != 2 or B.shape[1] > B.shape[0]:
        raise ValueError(f"basis must be (d_in, r) with r <= d_in, got {tuple(B.shape)}")
    Q, R = torch.linalg.qr(B.float(), mode="reduced")
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs


def as_matrix(W: torch.Tensor) -> torch.Tensor:
    """View a linear or conv weight as ``(d_out, d_in)``."""
    return W.reshape(W.shape[0], -1)


def projection_residual(W0: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Projection residual, Eq. 1: ``W = W0 - W0 Q Q^T`` (input side), computed in fp32."""
    M = as_matrix(W0).float()  # (d_out, d_in)
    if Q.shape[0] != M.shape[1]:
        raise ValueError(f"basis rows {Q.shape[0]} do not match weight input dim {M.shape[1]}")
    Qf = Q.float()
    out = M - (M @ Qf) @ Qf.T
    return out.reshape(W0.shape).to(W0.dtype)


def merged_basis(Q_content: torch.Tensor, Q_style: torch.Tensor) -> torch.Tensor:
    """Merged subspace, Eq. 3-4: ``Q_merged = QR([Q_content | Q_style])``.

    Columns beyond ``d_in`` or numerically dependent on earlier ones are dropped, so the
    result is orthonormal with rank <= d_in.
    """
    if Q_content.shape[0] != Q_style.shape[0]:
        raise ValueError(f"bases disagree on d_in: {Q_content.shape[0]} vs {Q_style.shape[0]}")
    cat = torch.cat([Q_content.float(), Q_style.float()], dim=1)  # (d_in, r_c + r_s)
    Q, R = torch.linalg.qr(cat, mode="reduced")
    diag = torch.diagonal(R).abs()
    keep = diag > 1e-6 * max(float(diag.max()), 1.0) if diag.numel() else diag.bool()
    return Q[:, keep]
