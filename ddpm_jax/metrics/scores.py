"""FID, Inception Score and KID from Inception features (float64 numpy).

* FID (Heusel et al. 2017): `|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`
  of the Gaussians fitted to pool3 features, the matrix square root taken by
  `scipy.linalg.sqrtm` with pytorch-fid's safeguards (an eps-ridge when the
  product is singular, a check that the imaginary part is numerical noise).
* IS (Salimans et al. 2016): `exp(E_x KL(p(y|x) || p(y)))` per split of the
  samples taken in order, as the original code does; mean and std over splits.
  Computed in log space, so it stays finite for confident (large) logits.
* KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel
  `k(x, y) = (x.y / d + 1)^3`, averaged over random subsets (torch-fidelity's
  defaults: 100 subsets of 1000).
"""
from typing import Optional, Tuple, Union

import numpy as np
from scipy import linalg
from scipy import special

# The Inception Score of a one-sample split is exactly 1 (p(y|x) is its own
# marginal), so every split needs at least two samples.
MIN_SAMPLES_PER_SPLIT = 2


def _check_finite(what: str, **arrays) -> None:
  """ValueError naming the arrays that hold NaN or inf."""
  bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
  if bad:
    raise ValueError(
        f"{what}: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or "
        "inf values, so the Inception outputs behind them are broken (bad "
        "weights or images; delete a cached reference file made of such "
        "features).")


def stats_from_features(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and covariance `[D, D]` (ddof=1), float64, of features `[N, D]`."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"Need features [N, D] with N >= 2, got shape {features.shape}.")
  # (np.cov of one column is 0-d; keep [1, 1].)
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                   sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: `[D]` means. sigma1, sigma2: `[D, D]` covariances.
    eps: ridge added to both covariances when `sigma1 @ sigma2` is too
      singular for sqrtm to return a finite root.

  Returns:
    The FID as a Python float (>= 0 up to rounding).

  Raises:
    ValueError: on mismatched shapes, on statistics holding NaN or inf,
      or when the square root has an imaginary part that is not numerical
      noise (|imag| > 1e-3 on the diagonal) or is not finite, which means
      the statistics are broken.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
        f"FID statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
        f"mu2 {mu2.shape}, sigma2 {sigma2.shape}.")
  _check_finite("The FID statistics are not finite", mu1=mu1, sigma1=sigma1,
                mu2=mu2, sigma2=sigma2)
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    ridge = np.eye(d) * eps
    covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
  if not np.isfinite(covmean).all():
    raise ValueError("The matrix square root in the FID is not finite even with "
                     f"an eps={eps:g} ridge: the covariances are not valid.")
  if np.iscomplexobj(covmean):
    worst = np.max(np.abs(np.diagonal(covmean).imag))
    if not worst <= 1e-3:  # (NaN included)
      raise ValueError(
          f"The matrix square root in the FID has an imaginary part of {worst:.3g}: "
          "the covariances are not valid (too few samples, or NaN features).")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
  """Inception Score of classifier logits `[N, K]`: (mean, std) over splits.

  The samples are split in order into `splits` parts (as the original code;
  part i is rows `i*N//splits : (i+1)*N//splits`); each part's score is
  `exp(mean_x KL(p(y|x) || mean_x p(y|x)))`. Ranges from 1 to K.

  Computed in log space (log p(y) by logsumexp, `p log(p / p(y))` taken as 0
  where p underflows to 0, as `scipy.special.rel_entr`), so confident
  logits, whose other classes' probabilities underflow, give a finite score.

  Raises:
    ValueError: when a part would have fewer than MIN_SAMPLES_PER_SPLIT
      samples (N < 2 * splits): a one-sample part scores exactly 1 whatever
      the images, so such a score means nothing; or when the logits hold
      NaN or inf.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, K], got shape {logits.shape}.")
  n = logits.shape[0]
  if splits < 1:
    raise ValueError(f"splits must be >= 1, got {splits}.")
  if n < MIN_SAMPLES_PER_SPLIT * splits:
    raise ValueError(
        f"The Inception Score over {splits} splits needs at least "
        f"{MIN_SAMPLES_PER_SPLIT * splits} samples ({MIN_SAMPLES_PER_SPLIT} per "
        f"split; a one-sample split always scores 1), got {n}.")
  _check_finite("The Inception Score's input is not finite", logits=logits)
  log_p = _log_softmax(logits)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    p = np.exp(part)
    # log of the part's marginal p(y): never log(0), even for a class whose
    # probability underflows in every sample of the part.
    log_marginal = special.logsumexp(part, axis=0) - np.log(len(part))
    with np.errstate(invalid="ignore"):  # 0 * -inf, replaced by 0
      kl = np.sum(np.where(p > 0, p * (part - log_marginal), 0.0), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of samples x, y `[m, D]` under `k(a, b) = (a.b / D + 1)^3`.

  `sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
   - 2 sum_{i, j} k(x_i, y_j) / m^2`.
  """
  m, d = x.shape
  if y.shape != (m, d) or m < 2:
    raise ValueError(f"Need two [m, D] sets with m >= 2, got {x.shape} and {y.shape}.")
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(off_diag - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    rng: Optional[Union[int, np.random.Generator]] = 0,
) -> Tuple[float, float]:
  """KID between two feature sets `[N1, D]`, `[N2, D]`: (mean, std) over subsets.

  Each subset draws `subset_size` rows of features1, then of features2,
  without replacement (`rng.choice(N, subset_size, replace=False)`), and
  computes `polynomial_mmd2_unbiased`. `rng` is a seed or a
  `np.random.Generator`; the same seed gives the same KID.

  Raises:
    ValueError: when a set has fewer than `subset_size` rows (the message
      says how small subset_size must be).
  """
  f1 = np.asarray(features1, np.float64)
  f2 = np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"Need features [N1, D] and [N2, D], got {f1.shape} and {f2.shape}.")
  _check_finite("The KID's features are not finite", features1=f1, features2=f2)
  n = min(len(f1), len(f2))
  if not 2 <= subset_size <= n:
    raise ValueError(
        f"KID subset_size={subset_size} must be between 2 and the size of the smaller "
        f"feature set ({n}); pass a smaller subset_size or more samples.")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}.")
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  mmds = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), subset_size, replace=False)]
    y = f2[rng.choice(len(f2), subset_size, replace=False)]
    mmds.append(polynomial_mmd2_unbiased(x, y))
  return float(np.mean(mmds)), float(np.std(mmds))
