"""What a finished run hands to a runtime: a PEFT adapter (:mod:`.peft`), or a mixed-precision GGUF base with its
LoRA for llama.cpp (:mod:`.gguf`)."""
