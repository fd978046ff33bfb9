"""Writes a tiny Hugging Face causal LM and a small text dataset for ``configs/hf_causal_lm_small.yaml``.

    python jobs/make_tiny_hf.py [OUT_DIR] [--arch gpt2|llama] [--lines 400] [--seed 0]

``OUT_DIR`` (default ``results/tiny_hf``) then holds:

- ``model/``: a 1-layer, 32-wide GPT-2 (or Llama) with randomly initialised weights and a word-level
  tokenizer trained on the dataset, both written by ``save_pretrained``
  (:func:`clair_ray.workloads.hf_causal_lm.data.write_tiny_model`), so the workload loads them through the
  real ``from_pretrained`` path on a machine without a hub.
- ``data.jsonl``: ``--lines`` templated sentences, ``{"text": ..., "topic": ...}``, over four topics. Each
  topic has its own sentence template with a few choices per slot, so a client can learn its topics'
  templates (the loss falls well below the untrained model's) and a Dirichlet partition over ``topic``
  gives clients different mixes of them.

Not a job for ``ray job submit``: it runs once, locally, before ``clair-ray run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: Topic -> (template, slot -> choices).
TOPICS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "weather": (
        "today the sky is {sky} and the wind is {wind} near the {place}",
        {"sky": ["grey", "blue", "dark"], "wind": ["cold", "strong", "calm"], "place": ["coast", "hills"]},
    ),
    "cooking": (
        "she cooks {food} with {spice} and serves it {temp} at {time}",
        {
            "food": ["rice", "soup", "fish"],
            "spice": ["garlic", "pepper", "ginger"],
            "temp": ["hot", "warm"],
            "time": ["noon", "dinner"],
        },
    ),
    "sports": (
        "the {team} won the {event} by {margin} points on {day}",
        {
            "team": ["tigers", "eagles", "sharks"],
            "event": ["match", "final", "cup"],
            "margin": ["three", "seven"],
            "day": ["sunday", "friday"],
        },
    ),
    "music": (
        "he plays the {instrument} {manner} while the {group} sings {style}",
        {
            "instrument": ["piano", "violin", "drums"],
            "manner": ["softly", "loudly"],
            "group": ["band", "choir"],
            "style": ["jazz", "folk", "blues"],
        },
    ),
}


def make_dataset(lines: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """``lines`` records ``{"text", "topic"}``, topics in turn, slots filled at random (seeded).

    Args:
        lines: Number of sentences.
        seed: Seed of the slot choices.

    Returns:
        The records, in generation order.
    """
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    out = []
    for i in range(lines):
        topic = names[i % len(names)]
        template, slots = TOPICS[topic]
        fill = {slot: str(rng.choice(choices)) for slot, choices in slots.items()}
        out.append({"text": template.format(**fill), "topic": topic})
    return out


def pretrain(
    model_dir: Path, texts: list[str], steps: int, seed: int, lr: float = 3e-3, batch: int = 32
) -> float:
    """Full fine-tuning of the saved model on ``texts`` with their words scrambled; saved in place.

    The base then knows the vocabulary (and its logits have a useful scale), not the word order, which is
    what the clients' LoRA adapters learn.

    Args:
        model_dir: The directory written by ``write_tiny_model``.
        texts: The corpus (each text's words are shuffled, seeded).
        steps: AdamW steps.
        seed: Seed of the scrambling and of the batches.
        lr: Learning rate.
        batch: Sequences per step.

    Returns:
        The last step's loss.
    """
    import torch

    from clair_ray.workloads.hf_causal_lm import data as hf
    from clair_ray.workloads.lora import adapters as lora

    rng = np.random.default_rng(seed)
    scrambled = [" ".join(rng.permutation(t.split())) for t in texts]
    data = hf.tokenize(hf.load_tokenizer(model_dir), scrambled, max_length=32)
    model = hf.load_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, len(scrambled), (batch,), generator=gen)
        out = lora.lm_loss(model, {k: v[idx] for k, v in data.items()})
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        loss = float(out.detach())
    model.eval()
    model.save_pretrained(model_dir)
    return loss


def make(
    out_dir: str | Path = "results/tiny_hf",
    arch: str = "gpt2",
    lines: int = 400,
    seed: int = 0,
    pretrain_steps: int = 200,
) -> Path:
    """Writes ``OUT_DIR/model`` and ``OUT_DIR/data.jsonl`` (see the module docstring).

    Args:
        out_dir: Output directory (created).
        arch: ``gpt2`` or ``llama``.
        lines: Sentences in the dataset.
        seed: Seed of the dataset and of the model's initialisation.
        pretrain_steps: Steps of :func:`pretrain` on scrambled sentences (0: keep the random weights).

    Returns:
        The output directory.
    """
    from transformers.utils import logging as hf_logging

    from clair_ray.workloads.hf_causal_lm.data import write_tiny_model

    hf_logging.disable_progress_bar()  # save_pretrained's one-shard bar is noise here
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = make_dataset(lines, seed)
    with open(out / "data.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    texts = [r["text"] for r in records]
    write_tiny_model(out / "model", texts, arch=arch, width=32, seed=seed)
    if pretrain_steps:
        pretrain(out / "model", texts, pretrain_steps, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parses the arguments, writes the model and the data, prints where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="results/tiny_hf")
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    out = make(args.out_dir, args.arch, args.lines, args.seed, args.pretrain_steps)
    print(f"wrote {out / 'model'} ({args.arch}) and {out / 'data.jsonl'} ({args.lines} lines)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's clair_ray
    sys.exit(main())
