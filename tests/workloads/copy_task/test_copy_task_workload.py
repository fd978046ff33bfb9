"""The copy-task workload on the engine: config, attack assignment, grouped training, Ray runs.

The Ray tests run ``configs/copy_task_small.yaml`` (a 1-layer, 32-wide base, 8 clients, 6 local steps) on
the session's 2-CPU Ray; the base is cached under a per-session temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from round_helpers import flat

from clair_ray import attacks
from clair_ray.config import ConfigError, load_config, to_dict
from clair_ray.results import NONDETERMINISTIC_COLUMNS, read_tables
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import ClientJob, Group
from clair_ray.workloads.copy_task import task as ct
from clair_ray.workloads.copy_task.workload import CopyTaskWorkload
from clair_ray.workloads.lora import adapters as lora
from clair_ray.workloads.lora.methods import fedavg_factors

REPO = Path(__file__).resolve().parents[3]
SMALL = REPO / "configs" / "copy_task_small.yaml"


def small(tmp: Path, cache: Path, *overrides: str):
    return load_config(SMALL, [f"output_dir={tmp}", f"workload.cache_dir={cache}", *overrides])


def test_data_attack_kinds_match_the_workload() -> None:
    assert set(CopyTaskWorkload.data_attacks) == set(ct.DATA_ATTACK_KINDS)
    assert {"data_reversed", "data_flip"} <= set(attacks.data_kinds())  # registered where defined


def test_config_validation_names_key_and_value(tmp_path: Path, copy_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"workload\.lora\.side='diagonal'"):
        small(tmp_path, copy_cache, "workload.lora.side=diagonal")
    with pytest.raises(ConfigError, match=r"workload\.lora\.clair_input='sparse'"):
        small(tmp_path, copy_cache, "workload.lora.clair_input=sparse")
    with pytest.raises(ConfigError, match=r"aggregation\.methods=.*local_early is one-shot only"):
        small(tmp_path, copy_cache, "workload.mode=multi_round")
    with pytest.raises(ConfigError, match=r"aggregation\.quarantine=.*needs workload\.mode=multi_round"):
        small(tmp_path, copy_cache, "aggregation.quarantine={q: 1, m: 2}")
    with pytest.raises(ConfigError, match=r"aggregation\.quarantine=.*1 <= q <= m"):
        small(tmp_path, copy_cache, "aggregation.quarantine={q: 3, m: 2}")
    with pytest.raises(ConfigError, match=r"workload\.clients_per_round=4: client sampling needs mode"):
        small(tmp_path, copy_cache, "workload.clients_per_round=4")
    with pytest.raises(ConfigError, match=r"engine\.min_clients=5: must be <= workload\.clients_per_round=4"):
        small(
            tmp_path,
            copy_cache,
            "workload.mode=multi_round",
            "aggregation.methods=[fedavg]",
            "workload.clients_per_round=4",
            "engine.min_clients=5",
        )
    with pytest.raises(ConfigError, match=r"workload\.lora\.early_steps=99"):
        small(tmp_path, copy_cache, "workload.lora.early_steps=99")
    with pytest.raises(ConfigError, match=r"engine\.actor_num_gpus=0\.0"):
        small(tmp_path, copy_cache, "workload.lora.device=cuda")
    with pytest.raises(ConfigError, match=r"aggregation\.rank=9"):
        small(tmp_path, copy_cache, "aggregation.rank=9")
    # No rank: CLAIR cannot run on a LoRA workload yet (no silent default detection rank); methods that
    # need none, the oracle included (it only refines), still can.
    with pytest.raises(ConfigError, match=r"aggregation\.rank=None: must be set for \['clair'\]"):
        small(tmp_path, copy_cache, "aggregation.rank=null")
    assert small(tmp_path, copy_cache, "aggregation.rank=null", "aggregation.methods=[fedavg,oracle]")
    with pytest.raises(ConfigError, match=r"aggregation\.refine=-1: must be 'auto', 'heldout' or an integer"):
        small(tmp_path, copy_cache, "aggregation.refine=-1")
    with pytest.raises(ConfigError, match=r"aggregation\.params\.clair\.side='row': .* workload\.lora\.side"):
        small(tmp_path, copy_cache, "aggregation.params={clair: {side: row}}")
    # The copy task's own methods and corruptions are not the linear workload's.
    with pytest.raises(ConfigError, match=r"aggregation\.methods\[0\]='fedavg_honest'"):
        load_config(REPO / "configs" / "linear_small.yaml", ["aggregation.methods=[fedavg_honest]"])
    with pytest.raises(ConfigError, match=r"contamination\.mix\.data_flip"):
        load_config(REPO / "configs" / "linear_small.yaml", ["contamination.mix={data_flip: 1.0}"])


def test_copy_attack_kinds_assigned_by_attacks_py() -> None:
    mix = {"data_random": 1.0, "data_reversed": 1.0, "data_shifted": 1.0, "data_flip": 1.0, "alie": 1.0}
    out = attacks.assign_attacks(list(range(10)), mix, 3)
    counts = pd.Series(list(out.values())).value_counts().to_dict()
    assert sorted(out) == list(range(10))
    assert set(counts) == set(mix) and sum(counts.values()) == 10 and max(counts.values()) == 2
    # Kinds registered later (the copy task's) come after the built-in ones in the canonical order, so a
    # mix of built-in kinds splits the same whatever else is registered.
    kinds = list(attacks.ATTACKS)
    assert kinds.index("data_shifted") < kinds.index("data_reversed") < kinds.index("data_flip")
    with pytest.raises(ValueError, match="data_nonsense"):
        attacks.assign_attacks(list(range(10)), {"data_nonsense": 1.0}, 3)


def test_grouped_batch_equals_one_at_a_time_and_peft(tmp_path: Path, copy_cache: Path) -> None:
    """A batch trained as one group = the same clients one call each = peft's train_client (float32)."""
    cfg = small(tmp_path, copy_cache, "engine.debug_fail_clients=[2]")
    wl = get_workload(cfg)
    assert isinstance(wl, CopyTaskWorkload)
    wl.prepare()
    jobs = [(0, 11), (1, 12), (2, 13)]
    from clair_ray.engine.actors import ClientWorker  # the client actor's logic, without Ray

    meta, grouped = ClientWorker(to_dict(cfg), 0).train(0, 0, "*", jobs, None)
    assert [m["ok"] for m in meta] == [True, True, False] and "on purpose" in meta[2]["traceback"]
    assert [m["trained"] for m in meta] == [True, True, False]  # client 2 never reached the workload
    names = list(grouped["final"])
    assert grouped["final"][names[0]][0].shape[0] == 2
    for i, job in enumerate(jobs[:2]):
        single = wl.train_batch(0, 0, [ClientJob(*job)], None).payload
        for n in names:
            for which in ("final", "early"):
                got = grouped[which][n][0][i] @ grouped[which][n][1][i]  # (out, in)
                want = single[which][n][0][0] @ single[which][n][1][0]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        # peft, one client at a time, with lora.train_lora's batch order from the same seed.
        t = cfg.workload.lora
        ref, _ = lora.train_client(
            ct.load_base(wl.prepare()),
            wl.spec,
            wl.train_data(0, job[0]),
            t.steps,
            t.lr,
            t.batch,
            job[1],
            loader=ct.load_base,
        )
        for n in names:
            np.testing.assert_allclose(
                grouped["final"][n][0][i] @ grouped["final"][n][1][i],
                ref[n][0] @ ref[n][1],
                rtol=1e-4,
                atol=1e-6,
            )


def test_train_one_equals_grouped_from_a_global_start(tmp_path: Path, copy_cache: Path) -> None:
    """Multi-round: the grouped path and plain peft (train_one) agree when starting from a global adapter."""
    from clair_ray import seeds

    cfg = small(
        tmp_path,
        copy_cache,
        "workload.mode=multi_round",
        "aggregation.methods=[fedavg]",
        "contamination.mix.sign_flip=0.0",
    )
    wl = get_workload(cfg)
    wl.prepare()
    first = [wl.train_one(0, 0, k)[0] for k in range(3)]
    glob = fedavg_factors(first)
    jobs = [ClientJob(k, seeds.derive_seed(cfg.seed, seeds.TRAIN, 0, 1, k)) for k in range(3)]
    grouped = wl.train_batch(0, 1, jobs, {"corr": {}, "shared": glob, "personal": {}}).payload
    assert grouped["early"] is None  # no early-stopped baseline in multi-round mode
    for k in range(3):
        ref, loss = wl.train_one(0, 1, k, start=glob)
        assert np.isfinite(loss)
        for n, (b, a) in ref.items():
            np.testing.assert_allclose(grouped["final"][n][0][k], b, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(grouped["final"][n][1][k], a, rtol=1e-4, atol=1e-6)
    # FedIT averages B and A separately.
    n0 = next(iter(glob))
    np.testing.assert_allclose(glob[n0][0], np.mean([f[n0][0] for f in first], axis=0))
    assert np.isfinite(wl.evaluate_global(0, glob))


@pytest.mark.parametrize(
    ("side", "clair_input"), [("both", "dense"), ("both", "factors"), ("column", "factors"), ("row", "dense")]
)
def test_aggregate_round_without_ray(tmp_path: Path, copy_cache: Path, side: str, clair_input: str) -> None:
    """Every method (and CLAIR on each side, on factors or dense) gives a finite held-out loss."""
    methods = None if side == "both" else "aggregation.methods=[clair,oracle,local,fedavg_honest]"
    cfg = small(
        tmp_path,
        copy_cache,
        f"workload.lora.side={side}",
        f"workload.lora.clair_input={clair_input}",
        *([methods] if methods else []),
    )
    wl = get_workload(cfg)
    wl.prepare()
    torch.manual_seed(0)
    K = cfg.workload.num_clients
    jobs = [ClientJob(k, 100 + k) for k in range(K)]
    payload = wl.train_batch(0, 0, jobs, None).payload
    group = Group(list(cfg.aggregation.methods), [(list(range(K)), payload)], [], {})
    res = wl.aggregate_round(0, 0, [group], None, evaluate=True)
    metas, nxt = flat(res), res.nexts
    assert nxt == {} and res.plan is None
    prob = wl.contamination(0)
    honest = [k for k in range(K) if k not in prob.attack]
    for method, m in metas.items():
        assert np.isfinite(m["test_loss"][honest]).all(), method
        assert np.isnan(np.delete(m["test_loss"], honest)).all(), method
    # The oracle knows the contaminated set; local and fedavg_honest never flag anyone.
    assert metas["oracle"]["flagged"][list(prob.attack)].all()
    assert not metas["local"]["flagged"].any() and not metas["fedavg_honest"]["flagged"].any()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_small_run_writes_tables_and_is_actor_count_invariant(tmp_path: Path, copy_cache: Path) -> None:
    from clair_ray.engine import run_experiment

    one = run_experiment(small(tmp_path / "one", copy_cache, "engine.num_actors=1"))
    two = run_experiment(small(tmp_path / "two", copy_cache, "engine.num_actors=2"))
    tables = read_tables(tmp_path / "two")
    assert set(tables) == {"clients", "summary", "detection"}
    s = tables["summary"].set_index("method")
    assert list(s.index) == list(load_config(SMALL).aggregation.methods)
    assert s["honest_mean_test_loss"].notna().all() and s["honest_mean_exact_match"].between(0, 1).all()
    assert (tmp_path / "two" / "config.yaml").exists()
    assert sorted(one.clients["actor_id"].unique()) == [0]
    assert sorted(two.clients["actor_id"].unique()) == [0, 1]

    def stable(df: pd.DataFrame) -> pd.DataFrame:
        df = df.drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in df.columns])
        keys = [c for c in ("trial", "method", "round", "client_id", "attack") if c in df.columns]
        return df.sort_values(keys).reset_index(drop=True)

    for a, b in ((one.clients, two.clients), (one.summary, two.summary), (one.detection, two.detection)):
        pd.testing.assert_frame_equal(stable(a), stable(b), check_exact=True)
    # The report reads the workload's own summary columns (a loss here, no parameter error).
    from clair_ray.report import build_report

    _, text = build_report(tmp_path / "two", plots=False)
    assert "clair" in text and "test loss" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_device_without_gpu_is_a_clear_dropout(tmp_path: Path, copy_cache: Path) -> None:
    wl = get_workload(small(tmp_path, copy_cache, "workload.lora.device=cuda", "engine.actor_num_gpus=0.5"))
    out = wl.train_batch(0, 0, [ClientJob(0, 1)], None)
    assert "device='cuda' but this actor sees no GPU" in out.failed[0]


def test_summary_shows_lm_metrics_only_when_present() -> None:
    from clair_ray import results

    base = {
        "trial": 0,
        "method": "clair",
        "round": 0,
        "contaminated": False,
        "attack": "",
        "detectable": False,
        "dropped": False,
        "flagged": False,
        "reason": "",
        "update_norm": 1.0,
        "n_samples": 8,
        "bytes_sent": 8,
        "actor_id": 0,
        "train_s": 0.0,
    }
    rows = [{**base, "client_id": k, "test_loss": 0.5 + k, "exact_match": 0.25} for k in range(2)]
    rows.append({**base, "client_id": 2, "contaminated": True, "attack": "data_flip", "detectable": True})
    cols = CopyTaskWorkload.columns
    df = results.table(rows, results.client_schema(cols)).to_pandas()
    summary, detection = results.summarize(df, {}, cols)
    assert summary[0]["honest_mean_test_loss"] == 1.0 and summary[0]["honest_mean_exact_match"] == 0.25
    assert detection[0]["attack"] == "data_flip" and not detection[0]["in_subspace"]
    text = results.format_summary(pd.DataFrame(summary), pd.DataFrame(detection))
    assert (
        "honest_mean_test_loss" in text and "honest_mean_error" not in text and "subspace_error" not in text
    )


def test_grouped_evaluation_equals_peft_evaluation(tmp_path: Path, copy_cache: Path) -> None:
    """Grouped held-out evaluation (many clients per forward) = peft's per-client evaluate_lm."""
    from clair_ray.workloads.lora import adapters as lora
    from clair_ray.workloads.lora import workload as le

    cfg = small(tmp_path, copy_cache)
    wl = get_workload(cfg)
    wl.prepare()
    payload = wl.train_batch(0, 0, [ClientJob(k, 50 + k) for k in range(5)], None).payload
    names = list(payload["final"])
    # Adapters of several ranks (1 and the full 4), a shared correction, and unequal test-set sizes.
    adapters = {
        k: {
            n: (payload["final"][n][0][k][:, : 1 + 3 * (k % 2)], payload["final"][n][1][k][: 1 + 3 * (k % 2)])
            for n in names
        }
        for k in range(5)
    }
    corr = {n: 0.1 * payload["final"][n][0][0] @ payload["final"][n][1][0] for n in names}
    full = wl.test_data
    wl.test_data = lambda trial, k: {key: t[: 5 + 3 * k] for key, t in full(trial, k).items()}  # type: ignore[method-assign]
    old_group, old_rows = le.EVAL_GROUP, le.EVAL_ROWS
    le.EVAL_GROUP, le.EVAL_ROWS = 2, 7  # several chunks of clients and of rows
    try:
        got = wl.evaluate_clients(0, [0, 1, 2, 3, 4], corr, adapters)
        again = wl.evaluate_clients(0, [0, 1, 2, 3, 4], {}, adapters)["test_loss"]  # the base is restored
    finally:
        le.EVAL_GROUP, le.EVAL_ROWS = old_group, old_rows
    shared = lora.fold_corrections(wl._evaluator(), corr)
    plain = wl._evaluator()
    for k in range(5):
        lora.load_factors(shared, adapters[k])
        ref = lora.evaluate_lm(shared, wl.test_data(0, k))
        np.testing.assert_allclose(got["test_loss"][k], ref["loss"], rtol=1e-5)
        assert got["exact_match"][k] == ref["exact_match"]
        np.testing.assert_allclose(got["token_accuracy"][k], ref["token_accuracy"], rtol=1e-12)
        lora.load_factors(plain, adapters[k])
        np.testing.assert_allclose(again[k], lora.evaluate_lm(plain, wl.test_data(0, k))["loss"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_multi_round_sampled_resumes_to_the_same_results(tmp_path: Path, copy_cache: Path) -> None:
    """Multi-round LoRA on Ray with a sample of the clients each round, an update attack and several
    methods: a crash + resume on another actor count changes nothing."""
    from clair_ray.engine import EngineError, run_experiment

    multi = [
        "workload.mode=multi_round",
        "workload.rounds=3",
        "workload.clients_per_round=6",
        "workload.lora.eval_every=1",
        "aggregation.methods=[clair,fedavg,local,median]",
    ]
    full = run_experiment(small(tmp_path / "full", copy_cache, *multi))
    s = full.summary
    assert sorted(s["round"].unique()) == [0, 1, 2] and (s["n_sampled"] == 6).all()
    assert s["honest_mean_test_loss"].notna().all()
    assert (full.clients.groupby(["method", "round"])["sampled"].sum() == 6).all()
    assert set(full.rounds.columns) >= {"round_s", "client_compute_s", "agg_s", "eval_s", "orchestration_s"}
    assert (full.rounds["clients"] == 6).all()
    with pytest.raises(EngineError, match="debug_stop_after_round"):
        run_experiment(small(tmp_path / "crash", copy_cache, *multi, "engine.debug_stop_after_round=0"))
    resumed = run_experiment(
        small(tmp_path / "crash", copy_cache, *multi, "resume=true", "engine.num_actors=1")
    )

    def stable(df: pd.DataFrame) -> pd.DataFrame:
        df = df.drop(columns=[c for c in NONDETERMINISTIC_COLUMNS if c in df.columns])
        return df.sort_values(["method", "round", "client_id"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(stable(full.clients), stable(resumed.clients), check_exact=True)
    assert list(resumed.rounds["round"]) == [0, 1, 2]  # rounds.parquet keeps the round before the resume


def test_evaluation_plan_on_clients_equals_evaluating_in_place(tmp_path: Path, copy_cache: Path) -> None:
    """The engine's split (aggregate, then evaluate_batch on client actors) gives the in-place numbers."""
    cfg = small(tmp_path, copy_cache)
    wl = get_workload(cfg)
    wl.prepare()
    K = cfg.workload.num_clients
    payload = wl.train_batch(0, 0, [ClientJob(k, 7 + k) for k in range(K)], None).payload
    group = Group(list(cfg.aggregation.methods), [(list(range(K)), payload)], [], {})
    here = flat(wl.aggregate_round(0, 0, [group], None, evaluate=True))
    res = get_workload(cfg).aggregate_round(0, 0, [group], None)
    metas, plan = flat(res), res.plan.data
    assert set(plan) == set(metas) and all(np.isnan(m["test_loss"]).all() for m in metas.values())
    worker = get_workload(cfg)  # another process's instance: a client actor
    clients = res.plan.clients
    parts = [worker.evaluate_batch(0, plan, clients[:2]), worker.evaluate_batch(0, plan, clients[2:])]
    for method, m in here.items():
        got = np.full(K, np.nan)
        for part in parts:
            if method in part:
                got[part[method]["clients"]] = part[method]["test_loss"]
        np.testing.assert_allclose(got, m["test_loss"], rtol=1e-6, equal_nan=True)
