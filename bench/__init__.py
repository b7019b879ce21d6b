"""`lorax-bench`: the engine benchmark against the byte bound and HF transformers + PEFT."""
