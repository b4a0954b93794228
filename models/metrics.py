"""Sample-quality metrics on the MNIST feature network: FID, IS analogue, sFID-like, PSNR.

All plain torch in float64; the Frechet distance uses the exact symmetric form
trace(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed with eigendecompositions.
"""

from __future__ import annotations

import math

import torch


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID between two feature sets (N, D)."""
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    r = _sqrt_psd(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def inception_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) on the classifier's softmax."""
    p = logits.double().softmax(1)
    py = p.mean(0, keepdim=True)
    kl = (p * (p.clamp(min=1e-12).log() - py.clamp(min=1e-12).log())).sum(1).mean()
    return float(kl.exp())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1])."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def classifier_stats(net, x: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    feats, spatial, logits = [], [], []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].clamp(-1, 1)
        f, s = net.features(xb)
        feats.append(f); spatial.append(s); logits.append(net.fc2(f))
    return {"feat": torch.cat(feats), "spatial": torch.cat(spatial), "logits": torch.cat(logits)}
