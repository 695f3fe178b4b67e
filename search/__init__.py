"""Pareto configuration search (method.md §2.3–2.4, §4): configurations and objective values in, proposals out.

Modules, one job each: ``space`` (the configuration space), ``allocation`` (ILP initial pool), ``encoding``
(validation and GP features), ``acquisition`` (loss GP + qLogNEHVI), ``proposer`` (segment-constrained discrete
search), ``pareto`` (segmented selection), ``hypervolume`` (2-D HV with a fixed reference), ``searcher`` (ask/tell
state and persistence) and ``tune`` (the Ray Tune adapter, the only module that imports Ray). Nothing here sees a
model. Import from the submodules: this package keeps ``import search.space`` free of torch and BoTorch.
"""
