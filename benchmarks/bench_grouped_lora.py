"""Client-updates/s: one-client-at-a-time peft training vs grouped LoRA training of G clients per batch.

The copy-task-like job that benchmarks/vs_flower.py runs in Flower and in clair_ray
(configs/bench_vs_flower.yaml): a tiny GPT-2 (2 layers, 64 wide, vocab 64, dropout 0), LoRA r=8 (alpha 16)
on c_attn/c_proj/c_fc, sequences of 16 random tokens followed by their copy (32 tokens, loss on the copy
only), batch 16, 10 local AdamW steps at lr 3e-3 per client update.

* ``peft``: one resident peft model; per client, load its adapter (``set_peft_model_state_dict``), a fresh
  AdamW, 10 steps, and read the adapter back as numpy (what a Ray client actor does per virtual client).
* ``grouped G``: :class:`clair_ray.workloads.lora.grouped.GroupedLoRAModel`; per chunk of G clients,
  ``load_clients``, ``train_steps`` (10 steps for all G at once), ``client_state_dict`` per client as numpy.

Both train the same K clients on the same batches from the same initial adapter; the script checks that
their final losses agree. Configurations run round-robin (one repeat of each, then the next), so a busy
machine slows all of them alike; the table reports the best (least disturbed) of the repeats, by wall
time and by this process's CPU time.

Run (single thread, as one Ray actor per core would)::

    .venv/bin/python benchmarks/bench_grouped_lora.py --clients 32 --groups 1 4 8 16 32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from clair_ray.workloads.lora.grouped import GroupedLoRAModel

TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB, HALF = 64, 16


def copy_batches(steps: int, clients: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-task batches, a fresh one per step and client.

    Returns:
        (input_ids, labels), each (steps, K, b, 2*16); labels are -100 on the prompt half.
    """
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (steps, clients, batch, HALF), generator=gen)
    ids = torch.cat([src, src], dim=-1)  # (S, K, b, 32): the second half repeats the first
    labels = ids.clone()
    labels[..., :HALF] = -100  # train on the copy only
    return ids, labels


def load_base(path: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path)
    model.loss_type = "ForCausalLM"  # keeps transformers' loss_type=None warning away
    return model


def run_peft(
    model: PeftModel, init: dict, ids: torch.Tensor, labels: torch.Tensor, lr: float
) -> tuple[float, float, np.ndarray]:
    """All K clients one at a time on one resident peft model.

    Returns:
        (wall seconds, process CPU seconds, each client's last-step loss (K,)).
    """
    steps, clients = ids.shape[:2]
    last = np.zeros(clients)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(clients):
        set_peft_model_state_dict(model, init)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for s in range(steps):
            loss = model(input_ids=ids[s, k], labels=labels[s, k], use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        last[k] = loss.item()
        _update = {
            key: v.detach().cpu().numpy()
            for key, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
        }  # ship as numpy
    return time.perf_counter() - t0, time.process_time() - c0, last


def run_grouped(
    grouped: GroupedLoRAModel, init: dict, ids: torch.Tensor, labels: torch.Tensor, lr: float, g: int
) -> tuple[float, float, np.ndarray]:
    """All K clients in chunks of G, one ``train_steps`` call per chunk.

    Returns:
        (wall seconds, process CPU seconds, each client's last-step loss (K,)).
    """
    steps, clients = ids.shape[:2]
    last = np.zeros(clients)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, clients, g):
        chunk = slice(start, start + g)
        grouped.load_clients([init] * g)
        losses = grouped.train_steps(ids[:, chunk], steps, lr, labels=labels[:, chunk])  # (S, G)
        last[chunk] = losses[-1].numpy()
        _updates = [
            {key: v.detach().cpu().numpy() for key, v in grouped.client_state_dict(j).items()}
            for j in range(g)
        ]
    return time.perf_counter() - t0, time.process_time() - c0, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="K clients per measurement")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="G values")
    parser.add_argument("--steps", type=int, default=10, help="local steps per client update")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (both systems run on it; float32 either way)"
    )
    parser.add_argument(
        "--activation",
        default="gelu_new",
        help="GPT-2 activation_function: gelu_new (GPT2Config's default, a chain of elementwise ops) or "
        "gelu_pytorch_tanh (the same function as one fused kernel)",
    )
    args = parser.parse_args()
    if any(args.clients % g for g in args.groups):
        parser.error(f"--clients {args.clients} must be a multiple of every G in {args.groups}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB, n_positions=2 * HALF, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                activation_function=args.activation,
            )
        ).save_pretrained(tmp)  # fmt: skip
        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules=TARGETS,
            lora_dropout=0.0,
            fan_in_fan_out=True,
        )
        torch.manual_seed(0)
        peft_model = get_peft_model(load_base(tmp), config).to(args.device)
        init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        grouped = GroupedLoRAModel(load_base(tmp).to(args.device), TARGETS, args.rank, 2 * args.rank)

    ids, labels = (t.to(args.device) for t in copy_batches(args.steps, args.clients, args.batch, seed=1))
    names = ["peft"] + [f"grouped G={g}" for g in args.groups]

    def once(name: str) -> tuple[float, float, np.ndarray]:
        if name == "peft":
            return run_peft(peft_model, init, ids, labels, args.lr)
        return run_grouped(grouped, init, ids, labels, args.lr, int(name.split("=")[1]))

    # Warm-up on one chunk of each: first-call allocations and lazy imports stay out of the timings.
    run_peft(peft_model, init, ids[:, :1], labels[:, :1], args.lr)
    for g in args.groups:
        run_grouped(grouped, init, ids[:, :g], labels[:, :g], args.lr, g)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, np.ndarray] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name in names:
            w, c, last[name] = once(name)
            wall[name].append(w)
            cpu[name].append(c)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"device {where}; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, threads "
        f"{torch.get_num_threads()}, 1-min load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"K={args.clients} clients x {args.steps} steps, batch {args.batch}, {2 * HALF} tokens, "
        f"LoRA r={args.rank} on {'/'.join(TARGETS)}, {args.activation}; best of {args.repeats}.\n"
        "CPU = this process's CPU time (what a quiet core would take); wall also counts waiting for other "
        "processes on a busy machine."
    )
    base_wall = args.clients / min(wall["peft"])
    base_cpu = args.clients / min(cpu["peft"])
    print(
        f"| {'system':<12} | {'wall s':>7} | {'upd/s wall':>10} | {'vs peft':>7} | {'CPU s':>7} "
        f"| {'upd/s CPU':>9} | {'vs peft':>7} | {'max dloss/loss':>14} |"
    )
    print("|" + "|".join("-" * (w + 2) for w in (12, 7, 10, 7, 7, 9, 7, 14)) + "|")
    for name in names:
        w, c = min(wall[name]), min(cpu[name])
        rw, rc = args.clients / w, args.clients / c
        dev = float(np.max(np.abs(last[name] - last["peft"]) / last["peft"]))
        print(
            f"| {name:<12} | {w:>7.2f} | {rw:>10.2f} | {rw / base_wall:>6.2f}x | {c:>7.2f} | {rc:>9.2f} "
            f"| {rc / base_cpu:>6.2f}x | {dev:>14.1e} |"
        )


if __name__ == "__main__":
    main()
