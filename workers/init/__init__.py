"""Adapter initialisations that start from the quantization error instead of from zero, one module per method:
:mod:`.lq` (LQ-LoRA's alternating W ≈ Q + L1·L2 per configuration) and :mod:`.projq` (ProjQ's noise shaping and
activation-whitened SVD per configuration, and ``projq-shared``: one B, A for a set of configurations with θ
warm-started from each one's r×r correction). ``zero_B`` and ``svd_of_W`` need no data and live in the layer
(:meth:`workers.adapters.lora.CoALoRALinear.reset_lora`)."""
