"""LoTA-QAF (shared/docs/lota-qaf.md; Chen et al., NeurIPS 2025): ternary adapters trained on an integer grid and
merged into its codes losslessly, so the deployed model is a plain integer model with no adapter matmul.

- :mod:`.ternary`: what every variant shares: the factors' start, the masked ternary move, t-SignSGD and its
  schedule;
- :mod:`.intk`: the paper's form on asymmetric INTk groups (``LoTAModel``, ``train_lota``, merged files), uniform
  or configuration-aware over bit-widths; ``bench/lota.py`` measures it;
- :mod:`.blockwise`: ``adapter.kind: lota``, the run kind: one pair of ternary factors over every configuration of
  a space of ``int`` codes, trained by the driver like any other kind and exported merged.
"""

from .blockwise import BlockwiseLoTALinear, BlockwiseLoTAModel, MergedWeight
from .intk import LoTALinear, LoTAMerged, LoTAModel, MergedLinear, load_merged, save_merged, train_lota
from .ternary import OMEGA_FRACTION, TernarySignSGD, UpdateSchedule

__all__ = ["BlockwiseLoTALinear", "BlockwiseLoTAModel", "LoTALinear", "LoTAMerged", "LoTAModel", "MergedLinear",
           "MergedWeight", "OMEGA_FRACTION", "TernarySignSGD", "UpdateSchedule", "load_merged", "save_merged",
           "train_lota"]
