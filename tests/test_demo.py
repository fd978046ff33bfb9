"""`clair-ray demo` runs end to end and reports what it promises."""

from __future__ import annotations

import re

from clair_ray.demo import main


def test_demo_small(capsys) -> None:
    assert (
        main(["--clients", "20", "--p", "12", "--q", "4", "--rank", "2", "--samples", "60", "--seed", "1"])
        == 0
    )
    out = capsys.readouterr().out
    for label in (
        "subspace error",
        "detection F1",
        "honest mean error",
        "gain over local estimates",
        "flagged by CLAIR",
    ):
        assert label in out
    f1 = re.search(r"detection F1\s+([0-9.]+)\s+([0-9.]+)", out)
    assert f1 is not None and float(f1.group(1)) >= 0.9
