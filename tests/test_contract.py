"""The extension contract, end to end: an aggregator, an update attack and a whole workload, each defined
in THIS module, registered, and run on the engine through Ray; the same aggregator again as a plugin from
a module outside the package (``tests/plugin_example``); and ``engine.debug_nonfinite_clients`` on the
linear and a LoRA workload.

The engine's actors are separate processes: they know an extension only if they import the module that
registers it. A user's extension reaches them through the ``plugins`` config key (the driver imports the
modules before validating, the actors import them from the directories the driver found them in), so the
engine runs here name this very module as a plugin (``plugins=[<this module>]``); the actors then import
it from ``tests/`` and its registrations run there too.

Every engine run shares the session's 2-CPU Ray (tests/conftest.py) and is small; each run's tables are
checked by several tests (module-scoped fixtures), so the whole file takes well under three minutes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from clair_ray import attacks
from clair_ray.aggregators import AGGREGATORS, AggContext, AggOutput, get_aggregator, register_aggregator
from clair_ray.aggregators._common import check_updates, finite_mask, global_output
from clair_ray.attacks import ATTACKS, AttackContext, register_attack
from clair_ray.config import ConfigError, ExperimentConfig, load_config, plugin_paths
from clair_ray.results import read_tables
from clair_ray.workloads import get_workload
from clair_ray.workloads.base import (
    WORKLOADS,
    register_workload,
)

REPO = Path(__file__).resolve().parents[1]
LINEAR_SMALL = REPO / "configs" / "linear_small.yaml"
COPY_SMALL = REPO / "configs" / "copy_task_small.yaml"
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_example"
sys.path.insert(0, str(PLUGIN_DIR))  # the example plugins (not a package) import as top-level modules
from clair_workload_example import ToyMeanConfig, ToyMeanWorkload  # noqa: E402

WORKLOAD_PLUGIN = "clair_workload_example"
#: This module as the actors import it (``tests/`` is not a package: pytest imports it by its file name).
SELF = __name__
TOY = "toy_norm_trimmed_mean"
NON_FINITE = "non-finite"


# ---------------------------------------------------------------------------------------------------------
# The extensions (registered on import: in the driver by pytest, in every actor through ``plugins``)
# ---------------------------------------------------------------------------------------------------------


def toy_trimmed_mean(updates: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, str]]:
    """The mean of the finite clients whose update norm is at or below the median norm.

    Args:
        updates: (K, p, q) updates (non-finite clients are left out of everything).

    Returns:
        ((p, q) float64 aggregate or None when no client is finite; client -> reason for each finite
        client above the median norm).
    """
    mask = finite_mask(updates)  # (K,)
    idx = torch.nonzero(mask).flatten()  # (N,)
    if idx.numel() == 0:
        return None, {}
    x = updates[idx].to(torch.float64)  # (N, p, q)
    norms = torch.linalg.matrix_norm(x)  # (N,)
    med = torch.quantile(norms, 0.5)  # mean of the two middle norms for an even N (as numpy's median)
    keep = norms <= med
    out = {
        int(idx[j]): f"{TOY}: norm {float(norms[j]):.4g} > median {float(med):.4g}"
        for j in torch.nonzero(~keep).flatten().tolist()
    }
    return x[keep].mean(dim=0), out


@register_aggregator(TOY)
class ToyNormTrimmedMean:
    """A global method: every finite client gets :func:`toy_trimmed_mean`; clients above the median norm
    are flagged."""

    def aggregate(self, updates: torch.Tensor, ctx: AggContext) -> AggOutput:
        del ctx
        check_updates(updates)
        agg, flagged = toy_trimmed_mean(updates)
        return global_output(updates, finite_mask(updates), agg, flagged=flagged)


@register_attack("toy_zero", defaults={"scale": 0.0})
def toy_zero(
    own: torch.Tensor,
    honest: torch.Tensor | None,
    generator: torch.Generator,
    ctx: AttackContext,
    scale: float,
) -> torch.Tensor:
    """Sends ``scale`` times its own update (0 by default: a silent client)."""
    del honest, generator, ctx
    return scale * own


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def rows(res: Any, method: str) -> pd.DataFrame:
    """One method's client rows, indexed by client id."""
    return res.clients[res.clients.method == method].set_index("client_id").sort_index()


def first_honest(cfg: ExperimentConfig) -> int:
    """The smallest honest client id of trial 0 (the plan is a pure function of the config)."""
    plan = get_workload(cfg).contamination(0)
    return next(k for k in range(cfg.workload.num_clients) if k not in plan.attack)


def linear_cfg(out: Path, *overrides: str) -> ExperimentConfig:
    """``configs/linear_small.yaml`` with this module as a plugin."""
    return load_config(LINEAR_SMALL, [f"output_dir={out}", f"plugins=[{SELF}]", *overrides])


def trimmed(x: np.ndarray) -> np.ndarray:
    """Independent numpy version of the toy method: mean of the rows with norm <= the median norm."""
    n = np.linalg.norm(x.reshape(len(x), -1), axis=1)
    return x[n <= np.median(n)].mean(axis=0)


# ---------------------------------------------------------------------------------------------------------
# Registration and validation (no Ray)
# ---------------------------------------------------------------------------------------------------------


def test_extensions_are_registered_and_reregistration_is_idempotent() -> None:
    assert AGGREGATORS[TOY] is ToyNormTrimmedMean and ToyNormTrimmedMean.personalized is False
    assert ATTACKS["toy_zero"].fn is toy_zero and ATTACKS["toy_zero"].defaults == {"scale": 0.0}
    assert "toy_zero" in attacks.update_kinds() and WORKLOADS["toy_mean"] is ToyMeanWorkload
    # A module imported twice (the driver, then a plugin import) registers the same objects again: allowed.
    assert register_aggregator(TOY)(ToyNormTrimmedMean) is ToyNormTrimmedMean
    assert register_attack("toy_zero", defaults={"scale": 0.0})(toy_zero) is toy_zero
    assert register_workload("toy_mean")(ToyMeanWorkload) is ToyMeanWorkload
    # Another class or function under a taken name is refused.
    with pytest.raises(ValueError, match="registered already"):
        register_aggregator(TOY)(type("Other", (), {}))
    with pytest.raises(ValueError, match="registered already"):
        register_attack("toy_zero", defaults={"scale": 0.0})(lambda own, h, g, c, scale: own)
    with pytest.raises(ValueError, match="registered already"):
        register_workload("toy_mean")(type("OtherWorkload", (ToyMeanWorkload,), {}))
    # The registries drive what a workload accepts: the toy method and attack on the linear and LoRA ones.
    assert TOY in WORKLOADS["linear"].methods() and TOY in WORKLOADS["copy_task"].methods()


def test_toy_aggregator_and_attack_direct() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    x[2] *= 50.0  # the largest norm
    x[5, 0, 0] = float("nan")
    out = get_aggregator(TOY).aggregate(x, AggContext())
    ok = [k for k in range(7) if k != 5]
    want = trimmed(x[ok].numpy())
    for k in ok:
        np.testing.assert_allclose(out.per_client[k].numpy(), want, rtol=1e-12)
    assert torch.equal(out.per_client[5].nan_to_num(7.0), x[5].nan_to_num(7.0)), "keeps its own input"
    norms = np.linalg.norm(x[ok].numpy().reshape(6, -1), axis=1)
    above = [ok[i] for i in np.flatnonzero(norms > np.median(norms))]
    assert 2 in above and out.flagged == sorted([*above, 5])
    assert out.reasons[5] == NON_FINITE and out.reasons[2].startswith(f"{TOY}: norm")
    # The attack through the dispatcher every workload calls: defaults and parameters.
    own = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.equal(
        attacks.apply_update_attack("toy_zero", own, None, g), torch.zeros(4, 3, dtype=own.dtype)
    )
    torch.testing.assert_close(attacks.apply_update_attack("toy_zero", own, None, g, scale=3.0), 3.0 * own)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['factor'\] for attack 'toy_zero'"):
        attacks.apply_update_attack("toy_zero", own, None, g, factor=2.0)


def test_toy_workload_config_is_validated_by_its_own_dataclass(tmp_path: Path) -> None:
    base = [f"output_dir={tmp_path}", "workload.name=toy_mean", "aggregation.methods=[fedavg]"]
    cfg = load_config(None, [*base, "workload.p=5", "workload.step=0.25"])
    assert isinstance(cfg.workload, ToyMeanConfig) and cfg.workload.p == 5 and cfg.workload.step == 0.25
    # __post_init__ names the full key and the value, every bad key at once.
    with pytest.raises(ConfigError, match=r"workload\.noise_std=-1\.0: must be finite and >= 0") as err:
        load_config(None, [*base, "workload.noise_std=-1", "workload.p=0"])
    assert "workload.p=0: must be >= 1" in str(err.value)
    with pytest.raises(ConfigError, match=r"workload\.step=1\.5"):
        load_config(None, [*base, "workload.step=1.5"])
    with pytest.raises(ConfigError, match=r"workload\.num_clients=1: must be >= 2"):  # the base section's
        load_config(None, [*base, "workload.num_clients=1"])
    # OmegaConf rejects keys the section does not have (the linear workload's p exists, true_rank not).
    with pytest.raises(ConfigError, match=r"workload\.true_rank"):
        load_config(None, [*base, "workload.true_rank=2"])
    # The default check(): methods from the registry, data attacks only where the workload has them.
    with pytest.raises(ConfigError, match=r"aggregation\.methods\[1\]='fedavg_honest'"):
        load_config(None, [*base, "aggregation.methods=[fedavg,fedavg_honest]"])
    with pytest.raises(ConfigError, match=r"contamination\.mix\.data_random"):
        load_config(None, [*base, "contamination.fraction=0.2", "contamination.mix={data_random: 1.0}"])
    ok = load_config(None, [*base, "contamination.fraction=0.2", "contamination.mix={toy_zero: 1.0}"])
    assert ok.contamination.mix == {"toy_zero": 1.0}


def test_plugin_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"plugins\[0\]='no_such_clair_plugin': cannot import it"):
        load_config(LINEAR_SMALL, ["plugins=[no_such_clair_plugin]"])
    # Without the plugin its method is unknown (hide it, should another test have imported it already).
    monkeypatch.delitem(AGGREGATORS, "plugin_trimmed_mean", raising=False)
    monkeypatch.delitem(sys.modules, "clair_plugin_example", raising=False)
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    methods = "aggregation.methods=[fedavg,plugin_trimmed_mean]"
    with pytest.raises(ConfigError, match=r"aggregation\.methods\[1\]='plugin_trimmed_mean': must be one of"):
        load_config(LINEAR_SMALL, [methods])
    cfg = load_config(LINEAR_SMALL, [methods, "plugins=[clair_plugin_example]"])
    assert AGGREGATORS["plugin_trimmed_mean"].__module__ == "clair_plugin_example"
    assert cfg.aggregation.methods == ["fedavg", "plugin_trimmed_mean"]
    # The actors get the plugin's directory (not a package: the directory the module itself sits in).
    assert plugin_paths(["clair_plugin_example"]) == [str(PLUGIN_DIR)]
    assert plugin_paths([SELF]) == [str(Path(__file__).resolve().parent)]


# ---------------------------------------------------------------------------------------------------------
# Engine runs (Ray)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Any]:
    """linear_small with fedavg and the toy method; 2 scaling (x10) attackers and 1 toy_zero attacker; one
    honest client's update made non-finite."""
    from clair_ray.engine import run_experiment

    out = tmp_path_factory.mktemp("linear")
    over = [
        f"aggregation.methods=[fedavg,{TOY}]",
        "contamination.mix.gaussian_noise=0.0",
        "contamination.mix.other_subspace=0.0",
        "contamination.mix.sign_flip=0.0",
        "contamination.mix.scaling=1.0",
        "contamination.mix.toy_zero=1.0",
        "contamination.params.scaling.factor=10.0",
    ]
    bad = first_honest(linear_cfg(out, *over))
    cfg = linear_cfg(out, *over, f"engine.debug_nonfinite_clients=[{bad}]")
    return cfg, run_experiment(cfg)


@pytest.mark.slow
def test_toy_aggregator_on_the_linear_workload(linear_run: tuple[ExperimentConfig, Any]) -> None:
    cfg, res = linear_run
    disk = read_tables(cfg.output_dir)
    assert set(disk["clients"]["method"]) == {"fedavg", TOY}
    s = disk["summary"].set_index("method")
    assert list(s.index) == ["fedavg", TOY]
    assert np.isfinite(s[["honest_mean_error", "honest_mean_test_mse"]].to_numpy()).all()
    # Two x10 scaling attackers drag FedAvg far off; the norm-trimmed mean leaves them out.
    assert s.loc[TOY, "honest_mean_error"] < 0.5 * s.loc["fedavg", "honest_mean_error"]
    # The engine's numbers equal the method computed directly on the updates the server received.
    wl = get_workload(cfg)
    K = cfg.workload.num_clients
    raw = torch.stack([torch.from_numpy(wl.train(0, k, None)[0]) for k in range(K)])  # (K, p, q)
    bad = cfg.engine.debug_nonfinite_clients[0]
    raw[bad] = float("nan")
    finite = torch.isfinite(raw).flatten(1).all(1).numpy()
    sent = wl.apply_attacks(0, 0, raw, finite).numpy()
    W = wl.problem(0).W.numpy()
    ok = np.flatnonzero(finite)
    for method, agg in (("fedavg", sent[ok].mean(axis=0)), (TOY, trimmed(sent[ok]))):
        r = rows(res, method)
        want = np.linalg.norm(agg - W, axis=(1, 2))
        np.testing.assert_allclose(r["error"].to_numpy()[ok], want[ok], rtol=1e-9)
        np.testing.assert_allclose(r["update_norm"].to_numpy()[ok], np.linalg.norm(sent[ok], axis=(1, 2)))
    norms = np.linalg.norm(sent[ok], axis=(1, 2))
    above = set(ok[norms > np.median(norms)].tolist())
    t = rows(res, TOY)
    assert set(t.index[t.flagged & (t.reason != NON_FINITE)]) == above
    assert t.loc[sorted(above), "reason"].str.startswith(f"{TOY}: norm").all()
    scalers = set(t.index[t.attack == "scaling"])
    assert len(scalers) == 2 and scalers <= above


@pytest.mark.slow
def test_toy_attack_on_the_linear_workload(linear_run: tuple[ExperimentConfig, Any]) -> None:
    cfg, res = linear_run
    clients = read_tables(cfg.output_dir)["clients"]
    att = clients[clients.attack == "toy_zero"]
    assert len(att) == 2 and att.client_id.nunique() == 1 and att.contaminated.all()  # 1 client x 2 methods
    assert (att["update_norm"] == 0.0).all()
    # The scaling attackers (the built-in next to the toy one) send 10x their honest update.
    wl = get_workload(cfg)
    for k in clients.loc[clients.attack == "scaling", "client_id"].unique():
        honest_norm = float(np.linalg.norm(wl.train(0, int(k), None)[0]))
        got = clients.loc[clients.client_id == k, "update_norm"].to_numpy()
        np.testing.assert_allclose(got, 10.0 * honest_norm, rtol=1e-12)
    det = res.detection
    assert set(det["attack"]) == {"scaling", "toy_zero"}
    z = det[det.attack == "toy_zero"].set_index("method")
    assert set(z.index) == {"fedavg", TOY} and (z["n_clients"] == 1).all() and not z["in_subspace"].any()
    assert z.loc["fedavg", "n_flagged"] == 0 and z.loc[TOY, "n_flagged"] == 0  # norm 0: never above median


@pytest.mark.slow
def test_nonfinite_client_is_flagged_on_the_linear_workload(linear_run: tuple[ExperimentConfig, Any]) -> None:
    cfg, res = linear_run
    bad = cfg.engine.debug_nonfinite_clients[0]
    r = res.clients[res.clients.client_id == bad]
    assert set(r["method"]) == {"fedavg", TOY}
    assert r["flagged"].all() and (r["reason"] == NON_FINITE).all() and not r["contaminated"].any()
    assert r["error"].isna().all() and r["update_norm"].isna().all()
    others = res.clients[(res.clients.client_id != bad)]
    assert np.isfinite(others["error"]).all() and not (others["reason"] == NON_FINITE).any()


@pytest.fixture(scope="module")
def lora_run(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Any]:
    """copy_task_small (fewer local steps) with clair, fedavg and the toy method; one data_reversed and
    one toy_zero attacker; one honest client's update made non-finite."""
    from clair_ray.engine import run_experiment

    out = tmp_path_factory.mktemp("lora")
    cache = tmp_path_factory.mktemp("copy-cache")
    over = [
        f"output_dir={out}",
        f"workload.cache_dir={cache}",
        f"plugins=[{SELF}]",
        f"aggregation.methods=[clair,fedavg,{TOY}]",
        "workload.lora.steps=4",
        "workload.lora.early_steps=2",
        "contamination.mix.sign_flip=0.0",
        "contamination.mix.toy_zero=1.0",
    ]
    bad = first_honest(load_config(COPY_SMALL, over))
    cfg = load_config(COPY_SMALL, [*over, f"engine.debug_nonfinite_clients=[{bad}]"])
    return cfg, run_experiment(cfg)


@pytest.mark.slow
def test_toy_aggregator_and_attack_on_a_lora_workload(lora_run: tuple[ExperimentConfig, Any]) -> None:
    cfg, res = lora_run
    disk = read_tables(cfg.output_dir)
    s = disk["summary"].set_index("method")
    assert list(s.index) == ["clair", "fedavg", TOY]
    assert np.isfinite(s["honest_mean_test_loss"]).all() and s["honest_mean_exact_match"].between(0, 1).all()
    bad = cfg.engine.debug_nonfinite_clients[0]
    t = rows(res, TOY)
    f = rows(res, "fedavg")
    honest = t.index[~t.contaminated & (t.index != bad)]
    assert np.isfinite(t.loc[honest, "test_loss"]).all()
    # A different global correction than FedAvg's (the toy method really ran, per module).
    assert not np.allclose(t.loc[honest, "test_loss"], f.loc[honest, "test_loss"])
    # The toy_zero attacker sends a zero update: norm 0, so the toy method never excludes it; what it does
    # exclude is a majority-of-modules vote, reported as such.
    z = t.index[t.attack == "toy_zero"]
    assert len(z) == 1 and (disk["clients"].set_index("client_id").loc[z[0], "update_norm"] == 0.0).all()
    assert not t.loc[z[0], "flagged"]
    voted = t[t.flagged & (t.reason != NON_FINITE)]
    assert len(voted) >= 1 and voted["reason"].str.match(rf"{TOY}: excluded in \d+/\d+ modules").all()
    assert set(res.detection["attack"]) == {"data_reversed", "toy_zero"}
    assert set(res.detection.loc[res.detection.attack == "toy_zero", "method"]) == {"clair", "fedavg", TOY}


@pytest.mark.slow
def test_nonfinite_client_is_flagged_on_a_lora_workload(lora_run: tuple[ExperimentConfig, Any]) -> None:
    cfg, res = lora_run
    bad = cfg.engine.debug_nonfinite_clients[0]
    r = res.clients[res.clients.client_id == bad]
    assert set(r["method"]) == {"clair", "fedavg", TOY}
    assert r["flagged"].all() and (r["reason"] == NON_FINITE).all() and not r["contaminated"].any()
    assert r["update_norm"].isna().all() and r["test_loss"].isna().all()
    others = res.clients[res.clients.client_id != bad]
    assert not (others["reason"] == NON_FINITE).any() and np.isfinite(others["update_norm"]).all()
    honest = others[~others.contaminated]
    assert np.isfinite(honest["test_loss"]).all()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_toy_workload_on_the_engine(tmp_path: Path) -> None:
    """The toy workload multi-round (shared first round, then one trajectory per method), with toy_zero
    at scale 2; every client's toy_metric equals an independent simulation of the rounds."""
    from clair_ray.engine import run_experiment

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"plugins=[{WORKLOAD_PLUGIN},{SELF}]",
            "workload.name=toy_mean",
            "workload.num_clients=9",
            "workload.mode=multi_round",
            "workload.rounds=3",
            "contamination.fraction=0.2",
            "contamination.mix={toy_zero: 1.0}",
            "contamination.params.toy_zero.scale=2.0",
            f"aggregation.methods=[fedavg,{TOY}]",
            "engine.num_actors=2",
            "engine.batch_size=4",
            "engine.call_timeout_s=120",
        ],
    )
    res = run_experiment(cfg)
    tables = read_tables(tmp_path)
    clients, summary = tables["clients"], tables["summary"]
    assert {"toy_metric", "update_norm"} <= set(clients.columns)
    assert {"honest_mean_toy_metric", "toy_n_kept"} <= set(summary.columns)
    wl = get_workload(cfg)
    K, w = 9, cfg.workload
    mu = wl.truth(0)
    m = np.stack([wl.local_mean(0, k) for k in range(K)])  # (K, p, q)
    attackers = sorted(res.clients.loc[res.clients.attack == "toy_zero", "client_id"].unique())
    assert len(attackers) == 2
    for method, agg in (("fedavg", lambda x: x.mean(axis=0)), (TOY, trimmed)):
        s = np.zeros_like(mu)  # a global method: every client continues from the same model
        for rnd in range(3):
            sent = s + w.step * (m - s)
            sent[attackers] *= 2.0
            s = agg(sent)
            r = clients[(clients.method == method) & (clients["round"] == rnd)].set_index("client_id")
            np.testing.assert_allclose(r["toy_metric"], np.linalg.norm(s - mu), rtol=1e-10)
            np.testing.assert_allclose(r["update_norm"], np.linalg.norm(sent, axis=(1, 2)), rtol=1e-10)
            row = summary[(summary.method == method) & (summary["round"] == rnd)].iloc[0]
            assert row["honest_mean_toy_metric"] == pytest.approx(np.linalg.norm(s - mu), rel=1e-10)
            norms = np.linalg.norm(sent, axis=(1, 2))
            kept = K if method == "fedavg" else int(np.sum(norms <= np.median(norms)))
            assert row["toy_n_kept"] == kept and row["n_honest"] == 7
    assert (clients["n_samples"] == w.n_samples).all() and (clients["bytes_sent"] == w.p * w.q * 8).all()
    # FedAvg converges to the mean of what it is sent; the trimmed mean to a different point.
    fin = summary[summary["round"] == 2].set_index("method")["honest_mean_toy_metric"]
    assert fin["fedavg"] != pytest.approx(fin[TOY])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_plugin_aggregator_from_outside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's method runs in the actors, which import it from the directory the driver found it in
    (Ray itself does not give the workers that directory: checked first)."""
    import ray

    from clair_ray.engine import run_experiment

    monkeypatch.syspath_prepend(str(PLUGIN_DIR))

    @ray.remote(num_cpus=0.1)
    def can_import() -> bool:
        return importlib.util.find_spec("clair_plugin_example") is not None

    assert not ray.get(can_import.remote(), timeout=120), "Ray workers see the plugin without the engine"
    cfg = load_config(
        LINEAR_SMALL,
        [
            f"output_dir={tmp_path}",
            f"plugins=[clair_plugin_example,{SELF}]",
            f"aggregation.methods=[fedavg,plugin_trimmed_mean,{TOY}]",
        ],
    )
    res = run_experiment(cfg)
    s = read_tables(tmp_path)["summary"].set_index("method")
    assert list(s.index) == ["fedavg", "plugin_trimmed_mean", TOY]
    assert np.isfinite(s.loc["plugin_trimmed_mean", ["honest_mean_error", "honest_mean_test_mse"]]).all()
    # The plugin's copy of the toy method gives the toy method's numbers, client by client.
    p, t = rows(res, "plugin_trimmed_mean"), rows(res, TOY)
    np.testing.assert_array_equal(p["error"], t["error"])
    np.testing.assert_array_equal(p["flagged"], t["flagged"])
    assert p["flagged"].any()
    np.testing.assert_array_equal(
        p["reason"].str.replace("plugin_trimmed_mean", TOY, regex=False), t["reason"]
    )
    assert not np.allclose(p["error"], rows(res, "fedavg")["error"])


@pytest.mark.parametrize(
    "name", ["clair_plugin_example.py", "clair_attack_example.py", "clair_workload_example.py"]
)
def test_readme_examples_are_the_tested_plugin_files(name: str) -> None:
    """The README's extension examples are these files, verbatim (so the README shows tested code)."""
    readme = (REPO / "README.md").read_text()
    marker = f"<!-- example: tests/plugin_example/{name} -->\n```python\n"
    assert marker in readme, name
    block = readme.split(marker, 1)[1].split("```\n", 1)[0]
    assert block == (PLUGIN_DIR / name).read_text()


def test_attack_plugin_example_loads_and_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    cfg = load_config(
        LINEAR_SMALL,
        [
            "plugins=[clair_attack_example]",
            "contamination.mix={shrunk_sign_flip: 1.0}",
            "contamination.fraction=0.2",
        ],
    )
    own = torch.ones(2, 3, dtype=torch.float64)
    out = attacks.apply_update_attack("shrunk_sign_flip", own, None, torch.Generator(), scale=0.25)
    assert torch.equal(out, -0.25 * own) and ATTACKS["shrunk_sign_flip"].in_subspace
    assert dict(cfg.contamination.mix) == {"shrunk_sign_flip": 1.0}
