"""Faithful transcription of the seed sketch's CARROT (shared/seed/carrot-seed.md), defects kept.

Reference only — for the step benchmark (its per-sample loop) and for the test that shows the
safety test can fail (its bound). Do not use it for training. Defects, as in docs/CARROT.md:
1. the chance constraint runs over the top-K classes, whose ``‖P_N d_k‖²`` is ~0, so the
   ``eps`` clamp makes α ~ 1e9; 2. ``ln(1/δ)`` without a union bound; 3. the train step applies
   LayerNorm a second time to the augmented rows; 4. a Python loop with a QR per sample.
The only change: an optional ``generator`` for ``torch.randn`` (the seed uses the global RNG).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SeedCarrotFeatureAug(nn.Module):
    """The seed's ``CARROTFeatureAug`` (per-sample loop; returns ``(z_aug, y_aug)`` or Nones)."""

    def __init__(self, topk=10, gamma=0.0, delta=0.05, aug_per_sample=1, aug_weight=1.0, eps=1e-8):
        super().__init__()
        self.topk = topk
        self.gamma = gamma
        self.delta = delta
        self.aug_per_sample = aug_per_sample
        self.aug_weight = aug_weight
        self.eps = eps

    @torch.no_grad()
    def _build_D_basis(self, w_y: torch.Tensor, w_ks: torch.Tensor):
        A = w_y.unsqueeze(0) - w_ks  # (K, D)
        Q, R = torch.linalg.qr(A.T, mode="reduced")  # Q: (D, r)
        diag = torch.abs(torch.diag(R)) if R.ndim == 2 else torch.zeros(1, device=Q.device)
        keep = diag > 1e-6
        if keep.numel() == 0 or keep.sum() == 0:
            return None
        return Q[:, keep]

    def forward(self, z, y, logits, W, generator: torch.Generator | None = None):
        device = z.device
        B, D = z.shape
        C = W.shape[0]
        with torch.no_grad():
            logits_masked = logits.clone()
            logits_masked[torch.arange(B, device=device), y] = -1e9
            k = min(self.topk, C - 1)
            topk_idx = torch.topk(logits_masked, k=k, dim=1).indices
        z_out = []
        y_out = []
        log_term = math.log(1.0 / max(self.delta, 1e-12))
        for i in range(B):
            yi = int(y[i].item())
            w_y = W[yi]
            w_ks = W[topk_idx[i]]
            with torch.no_grad():
                D_basis = self._build_D_basis(w_y.detach(), w_ks.detach())
            if D_basis is None:
                continue

            def proj_N(v, D_basis=D_basis):
                return v - D_basis @ (D_basis.T @ v)

            with torch.no_grad():
                zi = z[i].detach()
                margins = (w_y.unsqueeze(0) - w_ks) @ zi
                diffs = w_y.unsqueeze(0) - w_ks
                diffs_N = torch.stack([proj_N(diffs[j]) for j in range(diffs.shape[0])], dim=0)
                pn2 = (diffs_N.pow(2).sum(dim=1)).clamp_min(self.eps)
                slack = (margins - self.gamma).clamp_min(0.0)
                alpha_k = (slack * slack) / (2.0 * pn2 * log_term + self.eps)
                alpha = torch.min(alpha_k).item()
            if not math.isfinite(alpha) or alpha <= 0:
                continue
            for _ in range(self.aug_per_sample):
                eps = torch.randn(D, device=device, generator=generator)
                epsN = proj_N(eps)
                z_out.append(z[i] + math.sqrt(alpha) * epsN)
                y_out.append(y[i])
        if len(z_out) == 0:
            return None, None
        return torch.stack(z_out, dim=0), torch.stack(y_out, dim=0).long()


def seed_train_step(x, y, norm: nn.LayerNorm, classifier: nn.Linear, carrot, optimizer) -> float:
    """The seed's train step (non-AMP branch) over cached embeddings ``x``: LN twice (defect 3)."""
    optimizer.zero_grad(set_to_none=True)
    z = norm(x)
    logits = classifier(z)
    loss_real = F.cross_entropy(logits, y)
    z_aug, y_aug = carrot(z, y, logits, classifier.weight)
    if z_aug is not None:
        logits_aug = classifier(norm(z_aug))
        loss = loss_real + carrot.aug_weight * F.cross_entropy(logits_aug, y_aug)
    else:
        loss = loss_real
    loss.backward()
    optimizer.step()
    return loss.item()
