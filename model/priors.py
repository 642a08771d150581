"""Analytic priors implementing :class:`scoremri.model.score.ScoreModel` (exactness tests of samplers).

``GaussianPrior(mean, std)``: the data distribution is N(mean, std^2 I) per pixel; perturbed by the VE-SDE
noise of std sigma it is N(mean, (std^2 + sigma^2) I), whose score is exact:
``score(x, sigma) = -(x - mean) / (std^2 + sigma^2)``. Tweedie's posterior mean is then
``mean + std^2 / (std^2 + sigma^2) * (x - mean)`` (the Wiener filter).
"""
from __future__ import annotations

import torch

from .score import check_input


class GaussianPrior:
    """Exact score of N(mean, std^2 I) convolved with N(0, sigma^2 I).

    mean: float or tensor broadcastable to (B, 1, H, W) (e.g. (H, W) or (1, 1, H, W)); std: float > 0 or
    tensor of the same broadcastable shape (per-pixel std, all > 0). Units: those of the images.
    """

    def __init__(
        self,
        mean: float | torch.Tensor = 0.0,
        std: float | torch.Tensor = 1.0,
        sigma_min: float = 0.01,
        sigma_max: float = 378.0,
        name: str = "gaussian",
    ) -> None:
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if not torch.all(std_t > 0):
            raise ValueError(f"GaussianPrior: std must be > 0, got {std}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"GaussianPrior: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = std_t
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sha256 = ""
        self.name = name
        # the same distribution at every pixel: any window of an image is an image of this prior
        self.windowable = self.mean.dim() == 0 and self.std.dim() == 0

    def _check(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return check_input(x, sigma, "GaussianPrior", dtype=x.dtype).view(-1, 1, 1, 1)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(device=x.device, dtype=x.dtype), self.std.to(device=x.device, dtype=x.dtype)

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W), (B,) -> grad_x log p_sigma(x) = -(x - mean) / (std^2 + sigma^2)."""
        s = self._check(x, sigma)
        mean, std = self._params(x)
        return -(x - mean) / (std**2 + s**2)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Tweedie: x + sigma^2 * score = mean + std^2 / (std^2 + sigma^2) * (x - mean)."""
        s = self._check(x, sigma)
        return x + s**2 * self.score(x, sigma)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw clean samples of the given (B, 1, H, W) shape from N(mean, std^2)."""
        z = torch.randn(shape, generator=generator)
        return self.mean + self.std * z
