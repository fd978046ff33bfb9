"""Any Hugging Face causal LM on local text: ``data`` (loading, tokenising, partitioning; no Ray) and
``workload`` (the engine side)."""
