"""Incremental PCA on torch tensors (PEFT's `peft.utils.incremental_pca.IncrementalPCA`; EVA runs it on every adapted
layer's inputs, batch after batch, on the model's device).

The update is Ross et al.'s incremental SVD as scikit-learn's IncrementalPCA does it: the new batch, centred on its
own mean, is stacked under the current components scaled by their singular values and one row that corrects for the
shift of the mean; the SVD of that stack gives the new components. Means and variances are kept in float64 (Chan et
al.'s pairwise update), so that long runs of batches do not drift.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class IncrementalPCA:
    """Principal components of data seen batch by batch.

    Args:
        n_components: components to keep (default: min(samples, features) of the first batch).
        copy: work on a copy of each batch (False lets partial_fit centre the caller's tensor in place).
        batch_size: rows a batch in `fit` (default 5 × features).
        svd_driver: cuSOLVER driver for torch.linalg.svd on CUDA inputs (None, "gesvd", "gesvdj", "gesvda").
        lowrank: use torch.svd_lowrank (randomized) instead of the full SVD.
        lowrank_q: lowrank's subspace size (default 2 × n_components; at least n_components).
        lowrank_niter: lowrank's subspace iterations.
        lowrank_seed: seed for lowrank's random start (the global generator is left as it was).
    """

    def __init__(self, n_components: Optional[int] = None, copy: Optional[bool] = True,
                 batch_size: Optional[int] = None, svd_driver: Optional[str] = None, lowrank: bool = False,
                 lowrank_q: Optional[int] = None, lowrank_niter: int = 4, lowrank_seed: Optional[int] = None):
        self.n_components = n_components
        self.copy = copy
        self.batch_size = batch_size
        self.svd_driver = svd_driver
        self.lowrank = lowrank
        self.lowrank_q = lowrank_q
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.n_features_ = None
        if lowrank:
            if lowrank_q is None:
                if n_components is None:
                    raise ValueError("n_components must be specified when using lowrank mode with lowrank_q=None.")
                self.lowrank_q = 2 * n_components
            elif n_components is not None and lowrank_q < n_components:
                raise ValueError("lowrank_q must be greater than or equal to n_components.")

    # ------------------------------------------------------------------ fitting
    def fit(self, X, check_input: bool = True) -> "IncrementalPCA":
        """Fit on X (samples × features) in batches of `batch_size` rows."""
        if check_input:
            X = self._validate_data(X)
        n_samples, n_features = X.shape
        if self.batch_size is None:
            self.batch_size = 5 * n_features
        for batch in self.gen_batches(n_samples, self.batch_size, min_batch_size=self.n_components or 0):
            self.partial_fit(X[batch], check_input=False)
        return self

    def partial_fit(self, X, check_input: bool = True) -> "IncrementalPCA":
        """Update the components with one batch X (samples × features)."""
        first = not hasattr(self, "components_")
        if check_input:
            X = self._validate_data(X)
        n_samples, n_features = X.shape
        if first:
            self.mean_ = self.var_ = None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
            self.n_features_ = n_features
            if not self.n_components:
                self.n_components = min(n_samples, n_features)
        elif n_features != self.n_features_:
            raise ValueError("Number of features of the new batch does not match the number of features of the first "
                             "batch.")
        mean, var, seen = self._incremental_mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            # the row that moves the old components' centre to the new mean
            shift = torch.sqrt(self.n_samples_seen_.double() / seen * n_samples) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X, shift))
        U, S, Vt = self._svd_fn_lowrank(X) if self.lowrank else self._svd_fn_full(X)
        U, Vt = self._svd_flip(U, Vt, u_based_decision=False)
        explained_variance = S**2 / (seen - 1)
        k = self.n_components
        self.n_samples_seen_ = seen
        self.components_ = Vt[:k]
        self.singular_values_ = S[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ = explained_variance[:k]
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * seen))[:k]
        if k not in (n_samples, n_features):
            self.noise_variance_ = explained_variance[k:].mean()
        else:
            self.noise_variance_ = torch.tensor(0.0, device=X.device)
        return self

    def transform(self, X) -> torch.Tensor:
        """X projected onto the components (centred on the mean seen so far)."""
        X = X - self.mean_
        return torch.mm(X.double(), self.components_.T).to(X.dtype)

    # ------------------------------------------------------------------ pieces
    def _validate_data(self, X) -> torch.Tensor:
        if not isinstance(X, torch.Tensor):
            X = torch.tensor(X, dtype=torch.float32)
        elif self.copy:
            X = X.clone()
        if X.dim() != 2:
            raise ValueError(f"IncrementalPCA expects a 2-D (samples × features) tensor, got shape {tuple(X.shape)}")
        n_samples, n_features = X.shape
        if self.n_components is not None:
            if self.n_components > n_features:
                raise ValueError(f"n_components={self.n_components} invalid for n_features={n_features}, need more "
                                 "rows than columns for IncrementalPCA processing.")
            if self.n_components > n_samples:
                raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of "
                                 f"samples {n_samples}")
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        return X

    def _svd_fn_full(self, X):
        return torch.linalg.svd(X, full_matrices=False, driver=self.svd_driver)

    def _svd_fn_lowrank(self, X):
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(devices=[X.device] if X.is_cuda else [], enabled=seeded):
            if seeded:
                torch.manual_seed(self.lowrank_seed)
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=self.lowrank_niter)
        return U, S, V.mH

    @staticmethod
    def _incremental_mean_and_var(X, last_mean, last_variance, last_sample_count):
        """Mean and (biased) variance of everything seen, with X's rows added (float64 sums)."""
        if X.shape[0] == 0:
            return last_mean, last_variance, last_sample_count
        if last_sample_count > 0 and (last_mean is None or last_variance is None):
            raise ValueError("last_mean and last_variance must be given when last_sample_count > 0.")
        n_new = torch.tensor([X.shape[0]], device=X.device)
        n_total = last_sample_count + n_new
        last_sum = (torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None
                    else last_mean * last_sample_count)
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / n_total
        centred = X - new_sum / n_new
        # Σ(x − m)² less the rounding error of m (the corrected two-pass formula)
        new_m2 = (centred.square().sum(dim=0, dtype=torch.float64)
                  - centred.sum(dim=0, dtype=torch.float64).square() / n_new)
        if last_variance is None:
            return mean, new_m2 / n_total, n_total
        ratio = last_sample_count.double() / n_new
        m2 = last_variance * last_sample_count + new_m2 + ratio / n_total * (last_sum / ratio - new_sum).square()
        return mean, m2 / n_total, n_total

    @staticmethod
    def _svd_flip(u, v, u_based_decision: bool = True):
        """Signs fixed so that each component's largest entry (of u's column or v's row) is positive."""
        if u_based_decision:
            signs = torch.sign(u[torch.argmax(u.abs(), dim=0), range(u.shape[1])])
        else:
            signs = torch.sign(v[range(v.shape[0]), torch.argmax(v.abs(), dim=1)])
        u *= signs[: u.shape[1]].view(1, -1)
        v *= signs.view(-1, 1)
        return u, v

    @staticmethod
    def gen_batches(n: int, batch_size: int, min_batch_size: int = 0) -> Iterator[slice]:
        """Slices of batch_size rows over range(n); a last batch shorter than min_batch_size joins the one before."""
        start = 0
        for _ in range(n // batch_size):
            end = start + batch_size
            if end + min_batch_size > n:
                continue
            yield slice(start, end)
            start = end
        if start < n:
            yield slice(start, n)
