"""Loss surrogate and the hypervolume acquisition (method.md §4.2–4.3, fixes §6 A2–A3).

Only the loss is modelled, by one ``SingleTaskGP`` on the features of :mod:`search.encoding` (BoTorch defaults:
Standardize outcome transform, RBF-ARD kernel with dimension-scaled lengthscale prior; float64). Storage is exact
and deterministic, so it is not modelled: the multi-output objective reads the average bits straight from the
candidate's features. (A ``GenericDeterministicModel`` inside a ``ModelListGP`` is rejected by BoTorch 0.18 —
ModelListGP needs likelihoods — and a plain ``ModelList`` gives a ``PosteriorList`` that disables qLogNEHVI's cached
Cholesky root, which measured 5–10× slower; the objective route computes the same y = [−loss, −bits].)

Acquisition: qLogNoisyExpectedHypervolumeImprovement in the maximisation convention y = [−loss, −bits] with a
nadir-based reference ref = min(Y) − 0.1·range(Y) over the observed pool (never the degenerate [0, 0] of §4.3).

BoTorch's pure-PyTorch qLogEHVI path, never its JIT-compiled fused kernel: BoTorch 0.18 compiles that kernel on first
use into ``~/.cache/torch_extensions`` behind a lock file, and a process killed during the compile (Ctrl-C or SIGKILL
in the first round) leaves the lock behind, so every later run waited on it forever (seen here); the compile also
needs a C++ toolchain on every worker and builds ``-march=native`` binaries that a home directory shared by unlike
cluster nodes would hand to the wrong CPU.
"""

from __future__ import annotations

import logging

import torch
from botorch.acquisition.multi_objective import logei
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
from botorch.exceptions.errors import ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.sampling import SobolQMCNormalSampler
from gpytorch.mlls import ExactMarginalLogLikelihood

from search.encoding import FeatureMap

logger = logging.getLogger(__name__)


def fit_loss_model(features: torch.Tensor, loss: torch.Tensor) -> SingleTaskGP:
    """Fit a GP of loss on features by exact marginal likelihood.

    If every optimiser attempt fails, the GP keeps its prior-mode hyperparameters (still a valid, if vaguer, model)
    and a warning is logged: the search goes on, but the failure is visible, never swallowed.
    """
    model = SingleTaskGP(features, loss.reshape(-1, 1))
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    try:
        fit_gpytorch_mll(mll)
    except ModelFittingError as err:
        logger.warning("GP fit failed (%s); using the prior hyperparameters for this round", err)
        model = SingleTaskGP(features, loss.reshape(-1, 1))
    model.eval()
    return model


def nadir_reference(loss: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """ref = min(Y) − 0.1·range(Y) for Y = [−loss, −bits]; a zero range is widened so the ref stays strictly below."""
    y = torch.stack([-loss, -bits], dim=-1)
    lo, hi = y.min(dim=0).values, y.max(dim=0).values
    span = torch.where(hi > lo, hi - lo, 1e-3 * (1.0 + lo.abs()))
    return lo - 0.1 * span


def build_acquisition(
    model: SingleTaskGP,
    feature_map: FeatureMap,
    features: torch.Tensor,
    loss: torch.Tensor,
    bits: torch.Tensor,
    seed: int,
    mc_samples: int = 64,
) -> qLogNoisyExpectedHypervolumeImprovement:
    """qLogNEHVI over y = [−loss (GP), −bits (exact)], baseline = the observed pool, QMC base samples seeded."""
    if getattr(logei, "_C", None) is None:  # see the module docstring: no JIT-compiled kernel
        logei._load_attempted = True

    def objective(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
        assert X is not None, "the storage objective needs the candidate features"
        neg_bits = -feature_map.bits_from_features(X).unsqueeze(-1)
        return torch.cat([-samples, neg_bits.expand(samples.shape)], dim=-1)

    return qLogNoisyExpectedHypervolumeImprovement(
        model=model,
        ref_point=nadir_reference(loss, bits).tolist(),
        X_baseline=features,
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed),
        objective=GenericMCMultiOutputObjective(objective),
        prune_baseline=True,
    )
