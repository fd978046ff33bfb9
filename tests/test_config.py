"""Config loading: every shipped YAML validates; bad values fail at load time naming key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from clair_ray.config import (
    ConfigError,
    ExperimentConfig,
    fingerprint,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
)

ALL_YAML = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# sweep_*.yaml are experiment configs plus a sweep: section (clair_ray/sweep/)
LINEAR_SMALL = Path(__file__).resolve().parents[1] / "configs" / "linear_small.yaml"
CONFIGS = [p for p in ALL_YAML if not p.name.startswith("sweep_")]
SWEEPS = [p for p in ALL_YAML if p.name.startswith("sweep_")]


def test_configs_dir_is_not_empty() -> None:
    assert any(p.name == "linear.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert path.read_text().startswith("#"), "each config starts with a header comment showing the command"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")][:8]
    assert any("clair-ray run" in line for line in header)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_loads_and_validates_each_trial(path: Path) -> None:
    from clair_ray.sweep import candidate_points, load_sweep, trial_config

    sw = load_sweep(path)  # validates every grid point's config
    assert sw.sweep.params, "a sweep varies something"
    for point in candidate_points(sw.sweep):
        assert isinstance(trial_config(sw.base, point), ExperimentConfig)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and any("clair-ray sweep" in line for line in lines[1:6])


def test_linear_yaml_is_the_acceptance_setting() -> None:
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("linear.yaml")])
    w = cfg.workload
    assert (w.num_clients, w.p, w.q, w.true_rank) == (50, 64, 16, 4)
    assert cfg.contamination.fraction == pytest.approx(0.3)
    assert len(cfg.contamination.mix) >= 3
    assert w.n_min >= w.p


def test_defaults_are_valid() -> None:
    assert load_config().workload.name == "linear"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("contamination.fraction=1.5", "contamination.fraction=1.5: must be in [0, 1)"),
        ("workload.num_clients=1", "workload.num_clients=1"),
        ("workload.true_rank=99", "workload.true_rank=99"),
        ("workload.n_min=10", "workload.n_min=10"),
        ("workload.mode=sometimes", "workload.mode='sometimes'"),
        ("workload.noise_std=-1", "workload.noise_std=-1.0"),
        ("engine.actor_num_cpus=0", "engine.actor_num_cpus=0.0"),
        ("engine.min_clients=999", "engine.min_clients=999"),
        ("aggregation.methods=[clair,krum]", "aggregation.methods[1]='krum'"),
        ("contamination.mix.backdoor=1.0", "contamination.mix.backdoor=1.0: unknown attack"),
        ("engine.debug_fail_clients=[77]", "engine.debug_fail_clients[0]=77"),
        ("ray.object_store_mb=50", "ray.object_store_mb=50"),
    ],
)
def test_bad_values_name_key_and_value(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="workload.nosuchkey"):
        load_config(None, ["workload.nosuchkey=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match="workload.p"):
        load_config(None, ["workload.p=abc"])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload:\n  p: 8\n  colour: blue\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(bad)


def test_overrides_apply_and_round_trip() -> None:
    cfg = load_config(
        None,
        [
            "seed=7",
            "workload.p=8",
            "workload.q=4",
            "workload.true_rank=2",
            "workload.n_min=12",
            "workload.n_median=20",
            "engine.num_actors=3",
        ],
    )
    assert (cfg.seed, cfg.workload.p, cfg.engine.num_actors) == (7, 8, 3)
    assert from_dict(to_dict(cfg)) == cfg
    assert "num_actors: 3" in to_yaml(cfg)


def test_fingerprint_ignores_layout_but_not_results() -> None:
    a = load_config()
    b = load_config(None, ["engine.num_actors=3", "output_dir=/elsewhere", "engine.debug_delay_s=1"])
    c = load_config(None, ["seed=1"])
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)


def test_a_broken_or_empty_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: YAML syntax error at line 2, column \d+"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(empty)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("engine.call_timeout_s=inf", r"engine\.call_timeout_s=inf: must be finite"),
        ("ray.num_cpus=inf", r"ray\.num_cpus=inf: must be finite"),
        ("contamination.mix.alie=inf", r"contamination\.mix\.alie=inf: must be finite"),
        # Parameters are checked at load against each attack's and method's own parameters, not after
        # all training in the aggregator.
        (
            "contamination.params.alie={zz: 1}",
            r"contamination\.params\.alie=.*unknown parameter\(s\) \['zz'\]",
        ),
        ("aggregation.params.clair={sovler: fast}", r"aggregation\.params\.clair=.*unknown clair parameter"),
        (
            "aggregation.params.geometric_median={max_iters: 3}",
            r"aggregation\.params\.geometric_median=.*max_iters",
        ),
    ],
)
def test_non_finite_values_and_unknown_parameters_fail_at_load(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(LINEAR_SMALL, [override])
