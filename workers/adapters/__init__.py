"""Adapter kinds, one module per kind (as PEFT keeps one tuner per method):

- :mod:`.lora`: the adapted linear layer every LoRA-family kind uses, y = W_q(C)·x + s·B·M·A·x, with its packed
  base in the shared :class:`~workers.quant.cache.QuantCache`, and ``LoRAModel``: every target wrapped with M = I
  (``adapter.kind: lora``; Shared-LoRA, QLoRA and coa-no-theta too);
- :mod:`.coa`: CoA-LoRA (``adapter.kind: coa``), ``LoRAModel`` plus θ (:mod:`.encoder`), which maps a
  configuration to each layer's r×r M;
- :mod:`.lota`: LoTA-QAF, ternary adapters merged losslessly into INTk codes.
"""
