"""Multi-LoRA serving: adapters read as PEFT saves them (:mod:`.adapter`), kept in a CPU cache
(:mod:`.cache`), and placed in the model's slots step by step."""
