"""Multi-round LoRA without Ray: trajectory math, client sampling, every method over rounds, quarantine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from round_helpers import flat, run_rounds

from clair_ray import seeds
from clair_ray.config import load_config
from clair_ray.workloads import get_workload
from clair_ray.workloads.lora import rounds, trajectory
from clair_ray.workloads.lora.methods import fedavg_factors

REPO = Path(__file__).resolve().parents[3]
SMALL = REPO / "configs" / "copy_task_small.yaml"
EVERY = "[clair,fedavg,fedavg_exact,fedavg_honest,oracle,local,median,trimmed_mean,geometric_median]"


def rng_factors(rng: np.random.Generator, r: int = 3) -> trajectory.Factors:
    return {"m": (rng.normal(size=(6, r)), rng.normal(size=(r, 5)))}


def test_round_pairs_and_advance_are_exact() -> None:
    rng = np.random.default_rng(0)
    start, final = rng_factors(rng), rng_factors(rng)
    pair = trajectory.round_pairs(final, start)["m"]
    assert pair[0].shape == (6, 6) and pair[1].shape == (6, 5)  # rank <= 2r
    np.testing.assert_allclose(
        pair[0] @ pair[1], final["m"][0] @ final["m"][1] - start["m"][0] @ start["m"][1]
    )
    assert trajectory.round_pairs(final, None) == final  # from peft's start (product 0)
    state = {"corr": {"m": rng.normal(size=(6, 5))}, "shared": start, "personal": {}}
    m = rng.normal(size=(6, 5))  # a full-rank aggregate: the rank-3 adapter cannot hold it all
    nxt = trajectory.advance(state, {"m": m}, 3)
    b, a = nxt["shared"]["m"]
    assert b.shape == (6, 3) and a.shape == (3, 5)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)  # orthonormal rows, like a fresh A's scale
    before = state["corr"]["m"] + start["m"][0] @ start["m"][1] + m
    np.testing.assert_allclose(nxt["corr"]["m"] + b @ a, before, atol=1e-12)  # nothing lost
    # The best rank-3 part is kept in the adapter (the correction is what rank 3 cannot hold).
    s = np.linalg.svd(before - state["corr"]["m"], compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(nxt["corr"]["m"] - state["corr"]["m"]), np.linalg.norm(s[3:]))
    # FedIT: the mean of the B's and of the A's, the correction carried over.
    two = [rng_factors(rng), rng_factors(rng)]
    fit = trajectory.fedit(state, two)
    np.testing.assert_allclose(fit["shared"]["m"][0], (two[0]["m"][0] + two[1]["m"][0]) / 2)
    np.testing.assert_allclose(fit["corr"]["m"], state["corr"]["m"])
    assert fit["shared"]["m"][0].shape == fedavg_factors(two)["m"][0].shape
    assert trajectory.start_of(None, 3) is None
    assert trajectory.start_of({"shared": start, "personal": {3: final}}, 3) is final
    assert trajectory.start_of({"shared": start, "personal": {3: final}}, 4) is start


def test_personalize_gives_each_refined_client_its_deviation_and_everyone_the_mean() -> None:
    rng = np.random.default_rng(1)
    start = {"corr": {"m": rng.normal(size=(6, 5))}, "shared": None, "personal": {2: rng_factors(rng, 2)}}
    mean = {"m": rng.normal(size=(6, 5))}
    u = np.linalg.qr(rng.normal(size=(6, 1)))[0]
    dev = {2: {"m": u @ rng.normal(size=(1, 5))}, 4: {"m": u @ rng.normal(size=(1, 5))}}
    nxt = trajectory.personalize(start, mean, dev, 2)
    np.testing.assert_allclose(nxt["corr"]["m"], start["corr"]["m"] + mean["m"])  # the mean: everyone's
    assert nxt["shared"] is None and set(nxt["personal"]) == {2, 4}
    b, a = nxt["personal"][2]["m"]
    # rank(start_2 + dev_2) <= 3 > r = 2: the best rank-2 part is kept (the rest is dropped).
    want = trajectory.adapter_product(start["personal"][2], "m") + dev[2]["m"]
    s = np.linalg.svd(want, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(b @ a - want), np.linalg.norm(s[2:]), atol=1e-12)
    b4, a4 = nxt["personal"][4]["m"]  # from peft's start (product 0): exactly its deviation (rank 1)
    np.testing.assert_allclose(b4 @ a4, dev[4]["m"], atol=1e-12)


def test_client_sample_is_seeded_sorted_and_per_round() -> None:
    a = seeds.sample_clients(0, 0, 1, 100, 20)
    assert a == seeds.sample_clients(0, 0, 1, 100, 20) and a == sorted(a) and len(set(a)) == 20
    assert a != seeds.sample_clients(0, 0, 2, 100, 20) and a != seeds.sample_clients(0, 1, 1, 100, 20)
    assert seeds.sample_clients(0, 0, 1, 100, 0) == list(range(100))
    assert seeds.sample_clients(0, 0, 1, 10, 10) == list(range(10))


def test_quarantine_counts_the_last_m_rounds_a_client_took_part_in() -> None:
    hist = {1: [True, True, False], 2: [True, False, False], 3: [False, True, True]}
    assert rounds._quarantined({"q": 2, "m": 3}, hist, [1, 2, 3, 4]) == [1, 3]
    assert rounds._quarantined({"q": 2, "m": 2}, hist, [1, 2, 3]) == [3]
    assert rounds._quarantined(None, hist, [1, 2, 3]) == []


def multi(tmp: Path, cache: Path, *overrides: str):
    return load_config(
        SMALL,
        [
            f"output_dir={tmp}",
            f"workload.cache_dir={cache}",
            "workload.mode=multi_round",
            "workload.rounds=3",
            f"aggregation.methods={EVERY}",
            *overrides,
        ],
    )


def test_every_method_over_sampled_rounds_with_update_attacks(tmp_path: Path, copy_cache: Path) -> None:
    """Sampled rounds, a data and an in-subspace update attack: every method runs every round; clients
    outside the sample have no update and no flag; the last round evaluates every honest client."""
    cfg = multi(tmp_path, copy_cache, "workload.clients_per_round=6", "workload.lora.eval_every=2")
    wl = get_workload(cfg)
    wl.prepare()
    outs = run_rounds(wl)
    prob = wl.contamination(0)
    honest = [k for k in range(wl.K) if k not in prob.attack]
    for r, out in enumerate(outs):
        sample = seeds.sample_clients(cfg.seed, 0, r, wl.K, 6)
        outside = [k for k in range(wl.K) if k not in sample]
        for method, m in flat(out).items():
            assert np.isfinite(m["update_norm"][sample]).all() and np.isnan(m["update_norm"][outside]).all()
            assert not m["flagged"][outside].any() and not m["dropped"].any(), method
            evaluated = np.flatnonzero(np.isfinite(m["test_loss"])).tolist()
            if r == 2:  # the last round: every honest client
                assert evaluated == honest, method
            elif r == 1:  # eval_every=2: the round's sampled honest clients
                assert evaluated == [k for k in sample if k in honest], method
            else:
                assert evaluated == [], method
        assert set(out.nexts) == (set() if r == 2 else set(cfg.aggregation.methods))
    last = flat(outs[-1])
    # local keeps each client's own adapter: the others' evaluation changes nothing for it.
    assert set(outs[1].nexts["local"]["personal"]) >= set(seeds.sample_clients(cfg.seed, 0, 0, wl.K, 6))
    assert outs[1].nexts["fedavg"]["corr"] == {}  # FedIT never needs a correction
    # The exact mean and FedIT's mean of factors are different matrices (different trajectories).
    assert last["fedavg"]["test_loss"][honest[0]] != last["fedavg_exact"]["test_loss"][honest[0]]
    assert "history" in outs[1].nexts["clair"]


def test_personalized_rounds_refine_the_detected_honest_clients(tmp_path: Path, copy_cache: Path) -> None:
    """rounds_mode=personalized: CLAIR's sampled, unflagged clients get their own adapter; the oracle's
    are exactly the sampled honest ones; every method still evaluates finite losses."""
    cfg = multi(
        tmp_path, copy_cache, "workload.clients_per_round=7", "workload.lora.rounds_mode=personalized",
        "aggregation.methods=[clair,oracle,fedavg_honest]",
    )  # fmt: skip
    wl = get_workload(cfg)
    wl.prepare()
    outs = run_rounds(wl)
    prob = wl.contamination(0)
    sample0 = seeds.sample_clients(cfg.seed, 0, 0, wl.K, 7)
    oracle = outs[0].nexts["oracle"]["personal"]
    assert set(oracle) == {k for k in sample0 if k not in prob.attack}
    clair0 = flat(outs[0])["clair"]
    assert set(outs[0].nexts["clair"]["personal"]) == {k for k in sample0 if not clair0["flagged"][k]}
    assert outs[0].nexts["clair"]["shared"] is None and outs[0].nexts["fedavg_honest"]["shared"] is not None
    assert np.isfinite(clair0["refine_rank"]) and clair0["refine"].startswith("{")  # the choice, recorded
    for m in flat(outs[-1]).values():
        assert np.isfinite(m["test_loss"][[k for k in range(wl.K) if k not in prob.attack]]).all()


def test_a_methods_trajectory_does_not_depend_on_the_others(tmp_path: Path, copy_cache: Path) -> None:
    cfg = multi(tmp_path, copy_cache, "workload.clients_per_round=7")
    wl = get_workload(cfg)
    wl.prepare()
    both = run_rounds(wl, methods=["clair", "fedavg", "local"])
    alone = run_rounds(get_workload(cfg), methods=["clair"])
    for a, b in zip(both, alone, strict=True):
        fa, fb = flat(a)["clair"], flat(b)["clair"]
        np.testing.assert_array_equal(fa["flagged"], fb["flagged"])
        np.testing.assert_array_equal(fa["update_norm"], fb["update_norm"])
        np.testing.assert_array_equal(fa["test_loss"], fb["test_loss"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notice inside peft's load
def test_exported_adapters_load_in_plain_peft_with_the_reported_loss(
    tmp_path: Path, copy_cache: Path
) -> None:
    """export_adapters: a global method's adapter (+ its correction) and local's per-client adapters load
    with PeftModel.from_pretrained and give the held-out loss the run reported."""
    from peft import PeftModel

    from clair_ray.workloads.copy_task import task as ct
    from clair_ray.workloads.lora import adapters as lora

    cfg = multi(tmp_path, copy_cache, "workload.clients_per_round=7", "export_adapters=true")
    wl = get_workload(cfg)
    wl.prepare()
    outs = run_rounds(wl, methods=["clair", "fedavg", "local"])
    last = flat(outs[-1])
    written = wl.export(0, outs[-1].nexts, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "clair" / lora.CORRECTION_FILE) in written
    assert not (tmp_path / "adapters" / "fedavg" / lora.CORRECTION_FILE).exists()  # FedIT has none
    trained = outs[-1].nexts["local"]["personal"]
    honest = [k for k in range(wl.K) if k not in wl.contamination(0).attack and k in trained]
    for method, sub in (("clair", "global"), ("fedavg", "global"), ("local", f"clients/client{honest[0]}")):
        d = tmp_path / "adapters" / method
        assert (d / sub / "adapter_config.json").exists() and (d / sub / "adapter_model.safetensors").exists()
        base = ct.load_base(wl.prepare())
        if (d / lora.CORRECTION_FILE).exists():
            lora.fold_correction_file(base, d / lora.CORRECTION_FILE)
        model = PeftModel.from_pretrained(base, str(d / sub))
        got = lora.evaluate_lm(model, wl.test_data(0, honest[0]))["loss"]
        np.testing.assert_allclose(got, last[method]["test_loss"][honest[0]], rtol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_shot_export_writes_corrections_and_refined_client_adapters(
    tmp_path: Path, copy_cache: Path
) -> None:
    from peft import PeftModel

    from clair_ray.workloads.copy_task import task as ct
    from clair_ray.workloads.lora import adapters as lora

    cfg = load_config(
        SMALL,
        [f"output_dir={tmp_path}", f"workload.cache_dir={copy_cache}", "export_adapters=true",
         "aggregation.methods=[clair,fedavg]"],
    )  # fmt: skip
    wl = get_workload(cfg)
    wl.prepare()
    (out,) = run_rounds(wl)
    wl.export(0, out.nexts, tmp_path / "adapters")
    honest = [k for k in range(wl.K) if k not in wl.contamination(0).attack]
    clients = [p.name for p in (tmp_path / "adapters" / "clair" / "clients").iterdir()]
    assert set(clients) == {f"client{k}" for k in honest}  # CLAIR refines every honest client
    for method, sub in (("clair", f"clients/client{honest[0]}"), ("fedavg", "global")):
        d = tmp_path / "adapters" / method
        base = lora.fold_correction_file(ct.load_base(wl.prepare()), d / lora.CORRECTION_FILE)
        got = lora.evaluate_lm(PeftModel.from_pretrained(base, str(d / sub)), wl.test_data(0, honest[0]))[
            "loss"
        ]
        np.testing.assert_allclose(got, flat(out)[method]["test_loss"][honest[0]], rtol=1e-5)
