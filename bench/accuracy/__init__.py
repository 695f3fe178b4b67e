"""The paper's claims, measured at CPU scale: one CoA-LoRA run vs per-configuration fine-tuning (issue #7).

One invocation runs, for every job of a YAML file in ``conf/bench/`` (``--quick``: ``conf/bench/quick.yaml``,
MiniLM + review snippets; default: ``conf/bench/full.yaml``, that job at a larger scale plus SmolLM2-135M +
Shakespeare):

- **CoA-LoRA once**, through the real product path (``orchestrator.runs.start_run``: Fisher cost table → ILP
  initial pool → rounds of training + BoTorch search → final evaluation), with ``evaluation.baselines =
  [no_adapter, shared_lora]`` so the driver also trains **Shared-LoRA** once (one plain LoRA, one target
  configuration drawn per step) and reports the quantized base without adapters as a reference;
- **QLoRA** (plain LoRA, B = 0) and **LQ-LoRA** (faithful LQ init: T <= 100, best iterate, randomized SVD,
  Fisher-weighted by default; ``bench.lq_lora_lr`` gives its SVD-initialised LoRA factors their own learning rate,
  as LQ-LoRA's recipe does, while its task head keeps the shared one)
  **once per target configuration**, on exactly the ILP configurations the driver
  evaluated (read back from the run's ledger), plus QLoRA on the first ``bench.qlora_unseen`` unseen
  configurations to show what per-configuration training buys there.

Fairness: every baseline configuration is trained for as many optimizer steps as CoA-LoRA's whole run
(``search.rounds x training.steps_per_round``), with the same learning rate, schedule, weight decay, clipping,
batch size, rank, data order (the driver's seeded epoch permutations) and the same worker code computing the
gradients; it is evaluated on the same validation batches. That is the strongest fair per-configuration baseline:
each baseline adapter sees as many batches as the single CoA-LoRA model does in total (CoA-LoRA's K configurations
per step share one batch).

Targets: ``evaluation.targets`` (2.5 / 3.0 / 3.5 / 4.0 bits): the ILP configuration at each budget, identical for
every method. Unseen: ``evaluation.unseen`` (20) seeded random configurations between 2.5 and 6 bits, never in
CoA-LoRA's pool; CoA-LoRA and Shared-LoRA are evaluated on them without retraining.

Wall time per method is the time to produce its adapter(s) for everything it serves (evaluation excluded):
CoA-LoRA = model load + cost table + ILP + rounds of training and search; Shared-LoRA = its training; QLoRA /
LQ-LoRA = the sum over the four targets of (LQ init +) training. The cost table that yields the ILP configurations
is charged to CoA-LoRA only (the baselines reuse it for free), which favours the baselines.

Hypervolume: of each method's (average bits, metric) points, both normalised with a fixed reference that does not
depend on the data: bits over the space's range [2.0322, 8.625]; accuracy over [hv_reference (0.5 = chance), 1]
(as the error 1 − accuracy); perplexity as log(ppl) over [0, log(hv_reference)]. 1 is the best possible value.

Reproducibility: every random choice is seeded (run.seed) and torch runs one thread per process, so two runs of
``--quick`` on the same machine and torch build give identical metrics (tolerance 0; checked by
tests/bench/test_accuracy.py on a tiny model). Across machines / BLAS builds allow one validation example of
accuracy (1 / val_examples) or 1e-3 relative perplexity. Wall times are not reproducible (shared machine).

Outputs (``--out``, default ``docs/`` for the full mode and ``docs/quick/`` for ``--quick``): ``results.md``; ``results/accuracy-<job>.png`` (metric vs average bits per
method); ``results/accuracy.json`` (every row, timings, hypervolumes, the resolved configurations);
``results/work/`` (the product run directories and, unless a tracking URI is given, the MLflow SQLite store).
Paired differences: CoA-LoRA minus every other method on the same validation examples, per configuration and pooled over
the targets and the unseen configurations, with 95% intervals over the examples (``orchestrator.loop.paired``; the
driver's methods from the run's final/examples.safetensors, the per-configuration baselines scored the same way):
in results.md and in the headline (``paired_coa_minus``). Two jobs of one file can be compared directly: a job with ``bench.paired_with: <other job>`` (same model, data,
targets and seeds; e.g. another ``adapter.init``) has its run method paired with the other job's, example by
example, on every configuration both evaluated (``paired_jobs`` in accuracy.json and the headline, "Against job"
in results.md); ``bench.per_configuration: false`` leaves out its per-configuration rows when they would repeat
the other job's (conf/bench/projq-shared.yaml). MLflow: one parent run (experiment ``coalora-bench``) with one nested run per method (per job and method when the
file has several jobs); the product runs themselves go to experiment ``coalora-bench-product``. The last stdout
line is one JSON object with the headline figures.

    .venv/bin/python -m bench.accuracy --quick                    # job (a), < 15 min on 2 CPU cores
    .venv/bin/python -m bench.accuracy                            # full: (a) larger, and (b) SmolLM2 + Shakespeare
    .venv/bin/python -m bench.accuracy --quick --override data.train_examples=256 --out /tmp/bench

The parts, each with one job: :mod:`.jobs` (the bench YAML, each job's product run and its per-configuration
trainings), :mod:`.baselines` (QLoRA and LQ-LoRA on the run's own worker code), :mod:`.stats` (means, gaps,
hypervolumes, the headline) and :mod:`.report` (results.md, plots, MLflow); ``__main__`` is the command line.
"""
