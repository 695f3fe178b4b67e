"""Adapter kinds, one module per kind (as PEFT keeps one tuner per method):

- :mod:`.lora`: the adapted linear layer every LoRA-family kind uses, y = W_q(C)·x + s·B·M·A·x, with its packed
  base in the shared :class:`~workers.quant.cache.QuantCache`;
- :mod:`.coa`: CoA-LoRA's whole model (every target wrapped, θ = :mod:`.encoder` mapping a configuration to each
  layer's r×r M); without θ it is a plain LoRA over the same layers (Shared-LoRA, QLoRA, coa-no-theta);
- :mod:`.lota`: LoTA-QAF, ternary adapters merged losslessly into INTk codes.
"""
