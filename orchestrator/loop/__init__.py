"""The run's algorithm (design.md "Data flow of one run"): the resumable CoA-LoRA loop (:mod:`.driver`), its final
phase of baselines and evaluation (:mod:`.finish`), the master copy of the trainable state and its optimizers
(:mod:`.optim`), the seeded schedule of data and configurations (:mod:`.schedule`), paired differences
(:mod:`.paired`) and the plots and tables a run writes (:mod:`.report`)."""
