"""What a finished run hands to a runtime: a PEFT adapter (:mod:`.peft`), a mixed-precision GGUF base with its
LoRA for llama.cpp (:mod:`.gguf`), or a LoTA run's merged integer model (:mod:`.merged`)."""
