"""What every LoRA workload shares.

- ``spec``: the ``workload.lora`` knobs (light: no torch).
- ``adapters``: peft helpers (wrap, extract/load factors, fold corrections; the plain-peft reference path).
- ``loop``: the one local training loop and the one set of held-out metrics.
- ``grouped``: grouped multi-client LoRA (many clients per forward/backward over one resident base).
- ``methods``: per-module aggregation of factor pairs (CLAIR, the oracle, baselines), pure functions.
- ``workload``: the client side (:class:`~clair_ray.workloads.lora.workload.LoRAWorkload`).
- ``rounds``: the aggregator side (attacks, methods, the evaluation plan).
"""
