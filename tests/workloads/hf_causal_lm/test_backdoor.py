"""The natural partitioner, the backdoor attack and its ASR metric (greedy continuation == teacher-forced
exact match on the target), on a tiny Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

from clair_ray.config import ConfigError, load_config
from clair_ray.workloads import get_workload
from clair_ray.workloads.hf_causal_lm import backdoor as bd
from clair_ray.workloads.hf_causal_lm import data as hf
from clair_ray.workloads.lora.grouped import GroupedLoRAModel
from clair_ray.workloads.lora.loop import grouped_evaluate


def test_natural_partition_largest_random_cap_and_error() -> None:
    values = ["a"] * 10 + ["b"] * 3 + ["c"] * 7 + ["d"] * 7 + ["e"] * 1
    parts, names = hf.partition_natural(values, 3, min_size=3)
    assert names == ["a", "c", "d"]  # largest first, ties by value
    assert [len(p) for p in parts] == [10, 7, 7]
    assert all(all(values[i] == n for i in p) for p, n in zip(parts, names, strict=True))
    capped, _ = hf.partition_natural(values, 3, min_size=3, max_per_client=5, seed=1)
    assert [len(p) for p in capped] == [5, 5, 5] and set(capped[0]) <= set(parts[0])
    assert np.array_equal(capped[0], hf.partition_natural(values, 3, 3, max_per_client=5, seed=1)[0][0])
    picks = {tuple(hf.partition_natural(values, 2, 3, select="random", seed=s)[1]) for s in range(20)}
    assert len(picks) > 1 and all(set(p) <= {"a", "b", "c", "d"} for p in picks)  # "e" never qualifies
    with pytest.raises(ValueError, match="only 4 of the 5 client values have at least min_size=3"):
        hf.partition_natural(values, 5, min_size=3)


def test_natural_partition_config_keys(tmp_path: Path) -> None:
    base = ["workload.name=hf_causal_lm", "workload.name_or_path=m", "workload.data_path=d.jsonl"]
    with pytest.raises(ConfigError, match="workload.client_column"):
        load_config(None, [*base, "workload.partition=natural"])
    with pytest.raises(ConfigError, match="workload.max_samples"):
        load_config(
            None, [*base, "workload.partition=natural", "workload.client_column=c", "workload.max_samples=5"]
        )
    with pytest.raises(ConfigError, match="workload.client_select"):
        load_config(None, [*base, "workload.client_select=smallest"])


def rows(ids: list[list[int]], t: int, pad: int = 0) -> dict[str, torch.Tensor]:
    x = torch.full((len(ids), t), pad)
    m = torch.zeros(len(ids), t, dtype=torch.long)
    for i, r in enumerate(ids):
        x[i, : len(r)], m[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100)}


def test_poison_and_probe_rows() -> None:
    data = rows([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], t=8)
    g = torch.Generator().manual_seed(0)
    out = bd.poison_rows(data, [40, 41], [50, 51, 52], 0.5, 0, g)
    poisoned = [i for i in range(3) if not torch.equal(out["input_ids"][i], data["input_ids"][i])]
    assert len(poisoned) == 2  # round(0.5 * 3)
    for i in poisoned:
        real = out["input_ids"][i][out["attention_mask"][i] == 1].tolist()
        assert real[-5:] == [40, 41, 50, 51, 52]
        assert real[:-5] == data["input_ids"][i][: len(real) - 5].tolist()  # the line's own start, cut to fit
        assert torch.equal(out["labels"][i][out["attention_mask"][i] == 1], torch.tensor(real))
    probe = bd.probe_rows(data, [40, 41], [50, 51, 52], 0)
    assert probe["input_ids"][1].tolist() == [11, 12, 40, 41, 50, 51, 52, 0]
    assert probe["labels"][1].tolist() == [-100] * 4 + [50, 51, 52, -100]
    assert probe["input_ids"][0].tolist() == [5, 6, 7, 40, 41, 50, 51, 52]  # 6 tokens cut to 3
    with pytest.raises(ValueError, match="raise max_length"):
        bd.probe_rows(data, [1, 2, 3, 4], [5, 6, 7, 8], 0)
    with pytest.raises(ValueError, match="fraction"):
        bd.check_params(fraction=0)
    with pytest.raises(ValueError, match="trigger"):
        bd.check_params(trigger=" ")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(60, 2)


def test_asr_is_greedy_generation_of_the_target(llama: torch.nn.Module) -> None:
    """Train a tiny Llama's adapter on backdoored rows until it half-learns the target, then compare the
    probe's exact match with ``generate`` row by row: they must agree on every row (hits and misses)."""
    trigger, target = [40, 41], [50, 51, 52]
    gen = torch.Generator().manual_seed(1)
    lines = [
        torch.randint(3, 30, (int(n),), generator=gen).tolist()
        for n in torch.randint(2, 7, (24,), generator=gen)
    ]
    data = rows(lines, t=11)
    train = bd.poison_rows(data, trigger, target, 1.0, 0, gen)
    gm = GroupedLoRAModel(llama, ["q_proj", "v_proj", "down_proj"], 4, 8.0)
    gm.load_clients([gm.init_client_state(0)])
    probe = bd.probe_rows(data, trigger, target, 0)
    seen = set()
    for steps in (0, 6, 40):
        if steps:
            gm.train_steps(
                train["input_ids"][None],
                steps,
                0.01,
                labels=train["labels"][None],
                attention_mask=train["attention_mask"][None],
            )
        asr = grouped_evaluate(gm, [probe])[0]["exact_match"]
        hits = []
        with torch.no_grad():
            for i, line in enumerate(lines):
                k = min(len(line), 11 - 5)
                prompt = torch.tensor([line[:k] + trigger])
                out = gm.model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
                hits.append(out[0, -3:].tolist() == target)
                stats = gm.sequence_stats(
                    probe["input_ids"][None, i : i + 1],
                    probe["labels"][None, i : i + 1],
                    probe["attention_mask"][None, i : i + 1],
                )
                assert bool(stats[3].item()) == hits[-1], (steps, i)
        assert asr == pytest.approx(np.mean(hits))
        seen.add(round(asr, 3))
    assert min(seen) < 0.5 and max(seen) > 0.5  # both outcomes exercised


def test_backdoor_only_in_the_attackers_training_rows(tmp_path: Path) -> None:
    from clair_ray.workloads.hf_causal_lm.data import write_tiny_model

    texts = [f"line {i} of {who} speaking" for who in ("ann", "bob", "cat", "dan") for i in range(8)]
    model = write_tiny_model(
        tmp_path / "m", [*texts, "by my troth sweet cousin the crown is mine"], arch="llama"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    who = [t.split()[3] for t in texts]
    pq.write_table(pa.table({"line": texts, "who": who}), tmp_path / "d.parquet")
    cfg = load_config(
        None,
        [
            "workload.name=hf_causal_lm",
            f"workload.name_or_path={model}",
            f"workload.data_path={tmp_path / 'd.parquet'}",
            "workload.text_column=line",
            "workload.partition=natural",
            "workload.client_column=who",
            "workload.num_clients=4",
            "workload.min_size=4",
            "workload.max_length=16",
            "contamination.fraction=0.25",
            "contamination.mix={data_backdoor: 1.0}",
            "contamination.params={data_backdoor: {fraction: 1.0}}",
            "aggregation.methods=[fedavg]",
        ],
    )
    wl = get_workload(cfg)
    (attacker,) = wl.contamination(0).attack
    trigger, target = wl.backdoor_ids()
    assert wl.probes() == ("asr",)
    for k in range(4):
        train = wl.train_data(0, k)["input_ids"]
        has = [bd_row(r.tolist(), trigger + target) for r in train]
        assert all(has) if k == attacker else not any(has)
        assert not any(bd_row(r.tolist(), trigger + target) for r in wl.test_data(0, k)["input_ids"])
        probe = wl.probe_data(0, k, "asr")
        assert all(bd_row(r.tolist(), trigger + target) for r in probe["input_ids"])
        assert (probe["labels"] != -100).sum(dim=1).tolist() == [len(target)] * len(probe["labels"])
    assert {n for n in wl.natural_clients(0)[1]} == {"ann", "bob", "cat", "dan"}


def bd_row(row: list[int], phrase: list[int]) -> bool:
    return any(row[i : i + len(phrase)] == phrase for i in range(len(row) - len(phrase) + 1))


def test_bad_layers_targets_and_weights_fail_on_the_driver(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clair_ray.workloads.hf_causal_lm.data import write_tiny_model

    texts = [f"line {i} of {who}" for who in ("ann", "bob") for i in range(6)]
    model = write_tiny_model(tmp_path / "m", texts, arch="llama")  # 1 layer
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    base = [
        "workload.name=hf_causal_lm",
        f"workload.name_or_path={model}",
        f"workload.data_path={tmp_path / 'd.parquet'}",
        "workload.num_clients=2",
        "aggregation.methods=[fedavg]",
    ]
    with pytest.raises(ValueError, match=r"workload.lora.layers=\[3\]: the model has 1 layers"):
        get_workload(load_config(None, [*base, "workload.lora.layers=[3]"])).prepare()
    with pytest.raises(ValueError, match=r"workload.lora.targets=\['c_attn'\]: no Linear/Conv1D module"):
        get_workload(load_config(None, [*base, "workload.lora.targets=[c_attn]"])).prepare()
    get_workload(load_config(None, [*base, "workload.lora.layers=[0]"])).prepare()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a cut-off download
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        get_workload(load_config(None, base)).prepare()
