"""Adapter kinds other than CoA-LoRA's configuration-aware LoRA, one module per kind (as PEFT keeps one tuner per
method): :mod:`.lota` (LoTA-QAF, ternary adapters merged losslessly into INTk codes)."""
