"""Held-back rows (``workload.lora.holdout``) and ``refine: heldout`` on the copy task (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from round_helpers import flat

from clair_ray.clair import clair
from clair_ray.config import ConfigError, load_config
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import ClientJob, Group
from clair_ray.workloads.lora.spec import held_back

REPO = Path(__file__).resolve().parents[3]
SMALL = REPO / "configs" / "copy_task_small.yaml"


def _cfg(tmp: Path, cache: Path, *overrides: str):
    return load_config(SMALL, [f"output_dir={tmp}", f"workload.cache_dir={cache}", *overrides])


def test_held_back_count() -> None:
    assert [held_back(n, 0.25) for n in (4, 5, 8, 32)] == [1, 2, 2, 8]
    assert held_back(4, 0.0) == 0
    with pytest.raises(ValueError, match="workload.lora.holdout=0.5: a client with 1 local rows"):
        held_back(1, 0.5)


def test_config_refuses_heldout_where_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="workload.lora.holdout"):
        _cfg(tmp_path, tmp_path, "workload.lora.holdout=1.0")
    with pytest.raises(ConfigError, match="aggregation.refine.*workload.lora.holdout > 0"):
        _cfg(tmp_path, tmp_path, "aggregation.refine=heldout")
    with pytest.raises(ConfigError, match="aggregation.refine.*one_shot"):
        _cfg(
            tmp_path,
            tmp_path,
            "aggregation.refine=heldout",
            "workload.lora.holdout=0.25",
            "workload.mode=multi_round",
            "workload.rounds=2",
            "aggregation.methods=[clair,fedavg]",
        )
    with pytest.raises(ConfigError, match="aggregation.refine.*LoRA workloads"):
        load_config(REPO / "configs" / "linear.yaml", ["aggregation.refine=heldout"])
    with pytest.raises(ValueError, match="'heldout' chooses by the clients' held-back loss"):
        clair(torch.randn(6, 5, 4), rank=1, refine="heldout")


def test_clients_train_once_when_no_method_refines(tmp_path: Path, copy_cache: Path) -> None:
    """refine=heldout with neither clair nor the oracle among the methods: nothing chooses a refinement,
    so clients train once, on every row."""
    over = ["aggregation.refine=heldout", "workload.lora.holdout=0.25"]
    both = get_workload(_cfg(tmp_path, copy_cache, *over, "aggregation.methods=[clair,fedavg]"))
    neither = get_workload(_cfg(tmp_path / "n", copy_cache, *over, "aggregation.methods=[fedavg,local]"))
    assert both.selects and not neither.selects
    # the rows every method's update trains on do not depend on which methods run
    n = neither.cfg.workload.n_sequences
    assert (both.sizes(0) == n).all() and (neither.sizes(0) == n).all()
    neither.prepare()
    K = neither.cfg.workload.num_clients
    out = neither.train_batch(0, 0, [ClientJob(k, 100 + k) for k in range(K)], None)
    assert out.payload["select"] is None
    assert [i["n_samples"] for i in out.info] == [n] * K


@pytest.mark.parametrize("refit", [True, False])
def test_heldout_refinement_round(tmp_path: Path, copy_cache: Path, refit: bool) -> None:
    """Rows are split, never shared between training and the held-back set; CLAIR and the oracle choose a
    candidate by the held-back loss and record it; every honest client gets a finite test loss. With
    ``refit`` the aggregated updates train on every row and a second training without the held-back rows
    is what the choice is made on."""
    cfg = _cfg(
        tmp_path,
        copy_cache,
        "aggregation.refine=heldout",
        "workload.lora.holdout=0.25",
        f"workload.lora.refit={str(refit).lower()}",
        "aggregation.methods=[clair,oracle,local,fedavg_honest]",
    )
    wl = get_workload(cfg)
    wl.prepare()
    K, n = cfg.workload.num_clients, cfg.workload.n_sequences
    h = held_back(n, 0.25)
    whole = wl.train_data(0, 3)["input_ids"]
    train, back = wl.local_rows(0, 3)["input_ids"], wl.heldout_rows(0, 3)["input_ids"]
    assert train.shape[0] == n - h and back.shape[0] == h
    assert torch.equal(torch.cat([train, back]), whole)
    assert torch.equal(wl.local_rows(0, 3, every=True)["input_ids"], whole)
    assert (wl.sizes(0) == (n if refit else n - h)).all()
    torch.manual_seed(0)
    payload = wl.train_batch(0, 0, [ClientJob(k, 100 + k) for k in range(K)], None).payload
    assert (payload["select"] is not None) == refit
    if refit:  # two trainings of the same clients on different rows
        name = next(iter(payload["final"]))
        assert not np.allclose(payload["final"][name][0], payload["select"][name][0])
    group = Group(list(cfg.aggregation.methods), [(list(range(K)), payload)], [], {})
    metas = flat(wl.aggregate_round(0, 0, [group], None, evaluate=True))
    honest = [k for k in range(K) if k not in wl.contamination(0).attack]
    for method in ("clair", "oracle"):
        m = metas[method]
        assert np.isfinite(m["test_loss"][honest]).all()
        assert m["refine_shrink"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        per_module = json.loads(m["refine"])
        assert per_module and len({json.dumps(v, sort_keys=True) for v in per_module.values()}) >= 1
    # The oracle judges on the true honest set, CLAIR on its detected-honest set: with the same judge the
    # choice can differ, but each is one candidate for every module.
    assert np.isfinite(metas["local"]["test_loss"][honest]).all()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_heldout_on_ray(tmp_path: Path, copy_cache: Path) -> None:
    """The aggregator actor judges the candidates (its own resident model) and the run records the choice;
    the same config on 1 and 2 actors gives the same table."""
    from clair_ray.engine import run_experiment

    over = ("aggregation.refine=heldout", "workload.lora.holdout=0.25", "aggregation.methods=[clair,oracle]")
    one = run_experiment(_cfg(tmp_path / "one", copy_cache, "engine.num_actors=1", *over))
    two = run_experiment(_cfg(tmp_path / "two", copy_cache, "engine.num_actors=2", *over))
    cols = ["method", "honest_mean_test_loss", "refine_rank", "refine_shrink", "f1"]
    a, b = (r.summary[cols].sort_values("method").reset_index(drop=True) for r in (one, two))
    assert a["refine_shrink"].notna().all() and np.isfinite(a["honest_mean_test_loss"]).all()
    np.testing.assert_allclose(a[cols[1:]].to_numpy(float), b[cols[1:]].to_numpy(float), rtol=1e-6)
