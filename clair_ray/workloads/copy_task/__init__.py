"""The copy-task workload: ``task`` (variants, base model, data; no Ray) and ``workload`` (engine side)."""
