"""Thin adapters that attach lowmem to training frameworks (optional extras).

`lowmem.integrations.hf.LowmemCallback`: a Hugging Face `transformers.TrainerCallback`.
"""
