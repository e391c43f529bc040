"""Low-rank factorizations of weight matrices and conv kernels (numpy only).

All math runs in float64; callers cast the factors back to the weight dtype.

- Plain SVD: W = U S V^T ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T), the best rank-r
  approximation in Frobenius norm (Eckart-Young). The singular values are
  split evenly between the factors so neither carries the whole dynamic range
  (matters once the factors are quantized).
- Data-aware SVD (ASVD / SVD-LLM): minimize ||X W - X A B||_F for activations
  X with G = X^T X. With the damped Cholesky factor G + lambda I = L L^T the
  loss is ||L^T W - L^T A B||_F, so the best choice is the truncated SVD of
  L^T W = U S V^T: A = L^-T U_r S_r, B = V_r^T.
- Sequential data-aware SVD (the teacher-propagated fit of SVD-LLM v2 and of
  GPTQ/OBC-style sequential quantization): a layer deep in an already
  factored model gets inputs X' that differ from the original X, and its
  original output is X W. Minimizing ||X' A B - X W||^2 + lambda ||A B - W||^2
  (the ridge pulls unseen directions towards the original weight) with
  C = X'^T X and X'^T X' + lambda I = L L^T is ||L^T A B - Z||^2 + const for
  Z = L^-1 (C + lambda I) W = L^T W*, where W* is the full least-squares
  weight; so A B = L^-T (truncated SVD of Z) (reduced-rank regression).
  With X' = X, Z = L^T W: the plain data-aware fit.
- Tucker-2 (HOSVD) of a conv kernel W[O, I, kh, kw] on its two channel modes:
  W ~ C x_0 U_out x_1 U_in with orthonormal U_out [O, r_out], U_in [I, r_in]
  and core C = W x_0 U_out^T x_1 U_in^T [r_out, r_in, kh, kw]. Exact when both
  ranks are full.
"""

from __future__ import annotations

__all__ = [
    "DAMPING",
    "Fit",
    "data_aware_factors",
    "fit",
    "energy_rank",
    "matrix_rank_for_ratio",
    "mode_singular_values",
    "singular_values",
    "svd_factors",
    "tucker2",
    "tucker_ranks_for_ratio",
    "whitened_singular_values",
    "whitening",
]

import math
from dataclasses import dataclass

import numpy as np

from passes.prune import reconstruct

# Ridge on G relative to the mean of its diagonal: keeps the Cholesky factor
# well conditioned when inputs are collinear (dead or duplicated features),
# while the data-aware error still tracks the true one closely.
DAMPING = 1e-2


def matrix_rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """The rank whose two factors hold ``ratio`` of a k x n matrix's parameters (at least 1)."""
    return max(1, math.floor(ratio * k * n / (k + n)))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold ``energy`` of the total (at least 1)."""
    squares = np.asarray(singular_values, np.float64) ** 2
    total = float(squares.sum())
    if total <= 0:
        return 1
    cumulative = np.cumsum(squares) / total
    # The small tolerance keeps energy=1 from asking for ranks beyond rounding noise.
    return int(min(len(squares), np.searchsorted(cumulative, energy - 1e-12) + 1))


def singular_values(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def svd_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [k, r], B [r, n]) with A B the best rank-r approximation of ``weight`` [k, n]."""
    u, s, vt = np.linalg.svd(np.asarray(weight, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def damping(gram: np.ndarray) -> float:
    """DAMPING times the mean of the Gram matrix's diagonal (1 when that is 0: inputs all zero), prune's rule."""
    return reconstruct.damping(gram, DAMPING)


def whitening(gram: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor L of the damped Gram matrix (G + lambda I = L L^T)."""
    gram = np.asarray(gram, np.float64)
    return np.linalg.cholesky(gram + damping(gram) * np.eye(gram.shape[0]))


def whitened_singular_values(weight: np.ndarray, chol: np.ndarray) -> np.ndarray:
    return singular_values(chol.T @ np.asarray(weight, np.float64))


@dataclass(frozen=True)
class Fit:
    """What a data-aware factorization of one weight needs: L (L L^T = X'^T X' + lambda I) and the whitened target Z."""

    chol: np.ndarray
    target: np.ndarray

    def singular_values(self) -> np.ndarray:
        return singular_values(self.target)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) minimizing ||L^T A B - Z||_F: A = L^-T U_r sqrt(S_r), B = sqrt(S_r) V_r^T."""
        u, s, vt = np.linalg.svd(self.target, full_matrices=False)
        root = np.sqrt(s[:rank])
        # A solve against L^T, never an explicit inverse.
        return np.linalg.solve(self.chol.T, u[:, :rank] * root), root[:, None] * vt[:rank]


def fit(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray | None = None) -> Fit:
    """The data-aware fit of ``weight`` on inputs with ``gram`` = X'^T X' (and ``cross`` = X'^T X when X' != X)."""
    gram = np.asarray(gram, np.float64)
    weight = np.asarray(weight, np.float64)
    chol = whitening(gram)
    if cross is None:
        return Fit(chol, chol.T @ weight)
    ridge = damping(gram)
    # Z = L^-1 (C + lambda I) W, by a triangular solve (numpy's generic solve; L is small).
    return Fit(chol, np.linalg.solve(chol, (np.asarray(cross, np.float64) + ridge * np.eye(gram.shape[0])) @ weight))


def data_aware_factors(weight: np.ndarray, chol: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) minimizing ||L^T (W - A B)||_F, i.e. the output error on the activations behind ``chol``."""
    return Fit(chol, chol.T @ np.asarray(weight, np.float64)).factors(rank)


def tucker_ranks_for_ratio(out_channels: int, in_channels: int, kernel: int, ratio: float) -> tuple[int, int]:
    """(r_out, r_in) proportional to (O, I) whose three convs hold about ``ratio`` of O*I*kernel parameters.

    With r_out = a O and r_in = a I the parameters are a I O (2 + a kernel),
    so a solves a^2 kernel + 2 a = ratio kernel; ranks are floored (at least 1).
    """
    alpha = (math.sqrt(1 + ratio * kernel * kernel) - 1) / kernel
    return max(1, min(out_channels, math.floor(alpha * out_channels))), max(1, min(in_channels, math.floor(alpha * in_channels)))


def mode_singular_values(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the output-channel and input-channel unfoldings of a [O, I, kh, kw] kernel."""
    kernel = np.asarray(kernel, np.float64)
    return singular_values(kernel.reshape(kernel.shape[0], -1)), singular_values(kernel.transpose(1, 0, 2, 3).reshape(kernel.shape[1], -1))


def tucker2(kernel: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_in [I, r_in], core [r_out, r_in, kh, kw], U_out [O, r_out]) by truncated HOSVD."""
    kernel = np.asarray(kernel, np.float64)
    u_out = np.linalg.svd(kernel.reshape(kernel.shape[0], -1), full_matrices=False)[0][:, :r_out]
    u_in = np.linalg.svd(kernel.transpose(1, 0, 2, 3).reshape(kernel.shape[1], -1), full_matrices=False)[0][:, :r_in]
    # Two contractions, not one three-operand einsum: numpy's unoptimized einsum
    # loops over all five indices at once (minutes on a 512x512x3x3 kernel).
    core = np.tensordot(np.tensordot(u_out.T, kernel, axes=(1, 0)), u_in, axes=(1, 0)).transpose(0, 3, 1, 2)
    return u_in, core, u_out
