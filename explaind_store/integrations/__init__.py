"""Recording from training frameworks (optional extras: ``pip install explaind-store[hf]`` for Hugging Face)."""
