"""Scale: round wall time, its split and peak memory at K = 100 / 1000 (copy task) and 10,000 (linear).

Each setting runs ``run_experiment`` in a fresh Python process (a child of this script) with a fresh
in-process Ray (``ray.init(address="local", num_cpus=2)``, as the runner does when no Ray is running), so
one setting's peak memory is not another's. Settings:

* copy task (``configs/bench_scale_copy_task.yaml``): multi-round FedAvg, 3 rounds of 10 local AdamW
  steps, 50 clients per actor call trained in one grouped forward/backward, evaluation after the last
  round only. The first round includes loading the base model into the actors and is reported apart;
  the "steady" numbers are the mean over the later rounds.
* copy task with ``--sample n``: n clients sampled per round (``workload.clients_per_round``) wherever K
  is larger, so K = 100 and K = 1000 train the same number of clients per round; the growth check then
  compares the round's training + aggregation time (evaluation after the last round covers every client
  and is left out), which should follow the sample, not K.
* linear (``configs/bench_scale_linear.yaml``): one-shot, FedAvg and CLAIR (fast solver) on the same
  round's updates, 500 clients per actor call. One round, so its "steady" round is that round.

Per setting, from the runner's ``rounds`` table (clair_ray/engine/runner.py ``run_round``): round wall
time; client compute (the busiest client actor's time inside its training calls), aggregation (methods,
in the aggregator actor), evaluation (the runner's ``eval_s``: the held-out evaluation phase) and
orchestration = round wall - those three, in seconds and % of the round; orchestration split into the
part while clients train (train wall - client compute) and the part after the last client answered
(round wall - train wall - aggregation - evaluation: the aggregator's fetches and bookkeeping); the time
between rounds that no round counts (the driver's result rows and checkpoint, from the progress lines'
timestamps); time per client. CPU seconds per steady round of each kind of process (``/proc/<pid>/stat``
at every round's end: client actors, aggregator, driver, Ray's own processes) and the client actors' CPU
per client, which, unlike wall time, a busy machine hardly changes. Peak memory: a thread samples
``/proc/<pid>/status`` of this child and every descendant (Ray's GCS, raylet, workers, actors) every
0.5 s; reported are the sum over processes of each one's peak RSS (``VmHWM``; shared pages such as the
object store and libraries count once per process, so an upper bound), the largest single process's
peak, and the sampled peak of the processes' summed private anonymous memory (``RssAnon``: heaps, no
shared pages), also per kind of process. Then the growth check (round time per client at each K and the
ratio between K values, by wall time and by client-actor CPU: 1.0 = linear; memory at each K) and
whether orchestration is under 10% of the round at K = 1000.

Timings depend on the machine's load (other jobs share the 2 cores): report ``uptime`` before and after.

Usage::

    python benchmarks/scale.py [--copy-clients 100 1000] [--linear-clients 1000 10000] [--json out.json]
    python benchmarks/scale.py --quick                         # copy K=100, linear K=1000 (a few minutes)
    python benchmarks/scale.py --copy-clients 1000 --copy-override workload.lora.steps=5
    python benchmarks/scale.py --copy-clients 100 1000 --sample 100 --linear-clients  # sampled rounds
    python benchmarks/scale.py --report out.json                 # reprint the tables of a saved run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "copy_task": REPO / "configs" / "bench_scale_copy_task.yaml",
    "linear": REPO / "configs" / "bench_scale_linear.yaml",
}
#: The runner's end-of-round progress line: "trial 0 round 2/3: 1000/1000 clients, train ..."
ROUND_LINE = re.compile(r"^trial (\d+) round (\d+)/(\d+):")
ORCH_TARGET = 0.10  # the target: orchestration under this share of the round at K = 1000
ORCH_TARGET_K = 1000
GIB = 2**30


# ---- memory -----------------------------------------------------------------------------------------------
def read_status(pid: int) -> dict[str, int] | None:
    """Memory fields of ``/proc/<pid>/status`` in bytes (``VmHWM``, ``VmRSS``, ``RssAnon``, ...).

    Args:
        pid: Process id.

    Returns:
        Field name -> bytes for the ``kB`` fields, or None when the process is gone or unreadable.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0]) * 1024
    return out


def process_name(pid: int) -> str:
    """The process's command line as Ray sets it (``ray::ClientActor.train_from``, ``raylet ...``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = raw.replace(b"\0", b" ").decode(errors="replace").split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    return " ".join(Path(w).name if i == 0 else w for i, w in enumerate(words[:2]))


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (``/proc/<pid>/stat``), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd on: state, ppid, ...
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (Ray's GCS, raylet, workers and actors of this session).

    Args:
        root: The ancestor's pid.

    Returns:
        Pids, ``root`` first.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def role(name: str) -> str:
    """Which part of the session a process is, from its name (see :func:`process_name`)."""
    if "ClientActor" in name:
        return "client actors"
    if "AggregatorActor" in name:
        return "aggregator"
    if name.startswith("ray::"):
        return "other ray workers"
    return "ray system (gcs, raylet, ...)"


def _name_rank(name: str) -> int:
    return 0 if name == "?" else 1 if name == "ray::IDLE" else 2


@dataclass
class MemorySampler:
    """Samples the memory of a process tree from a background thread.

    Attributes:
        root: The tree's root (this process).
        interval_s: Seconds between samples.
        peak_hwm: Pid -> its largest ``VmHWM`` seen (the kernel's own peak RSS of that process).
        names: Pid -> its most telling name seen (an actor's ``ray::<Class>`` wins over ``ray::IDLE``).
        peak_anon: Pid -> its largest ``RssAnon`` seen (private heap: no shared or file-backed pages; the
            object store's shared memory is not in it).
        peak_anon_total: Largest sum over live processes of ``RssAnon`` in one sample.
        samples: Samples taken.
    """

    root: int
    interval_s: float = 0.5
    peak_hwm: dict[int, int] = field(default_factory=dict)
    peak_anon: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    peak_anon_total: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Takes one sample of every process in the tree."""
        anon = 0
        for pid in descendants(self.root):
            st = read_status(pid)
            if st is None:
                continue
            self.peak_hwm[pid] = max(self.peak_hwm.get(pid, 0), st.get("VmHWM", 0))
            anon += st.get("RssAnon", 0)
            self.peak_anon[pid] = max(self.peak_anon.get(pid, 0), st.get("RssAnon", 0))
            name = process_name(pid)
            if pid == self.root:
                name = "driver"
            # An exiting process has no command line ("?"); an actor's name beats an idle worker's.
            if _name_rank(name) >= _name_rank(self.names.get(pid, "?")):
                self.names[pid] = name
        self.peak_anon_total = max(self.peak_anon_total, anon)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        """Resets this process's peak RSS (``/proc/self/clear_refs``) and starts sampling."""
        try:
            Path(f"/proc/{self.root}/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
        except OSError:
            pass
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Takes a last sample and stops."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds used so far by the live processes of the tree, summed per role (see :func:`role`).

        The driver's share includes this sampler's own thread (a few ms per sample).
        """
        out: dict[str, float] = {}
        for pid in descendants(self.root):
            cpu = read_cpu_seconds(pid)
            if cpu is None:
                continue
            r = "driver" if pid == self.root else role(process_name(pid))
            out[r] = out.get(r, 0.0) + cpu
        return out

    def summary(self) -> dict[str, Any]:
        """Sum of per-process peaks, the largest process, the per-role sums, the peak anonymous total."""
        by_role: dict[str, int] = {}
        anon_by_role: dict[str, int] = {}
        for pid, hwm in self.peak_hwm.items():
            r = "driver" if pid == self.root else role(self.names.get(pid, "?"))
            by_role[r] = by_role.get(r, 0) + hwm
            anon_by_role[r] = anon_by_role.get(r, 0) + self.peak_anon.get(pid, 0)
        top = max(self.peak_hwm, key=self.peak_hwm.__getitem__, default=None)
        return {
            "processes": len(self.peak_hwm),
            "sum_peak_rss": sum(self.peak_hwm.values()),
            "max_process_peak_rss": 0 if top is None else self.peak_hwm[top],
            "max_process": "" if top is None else self.names.get(top, "?"),
            "peak_anon_total": self.peak_anon_total,
            "by_role": by_role,
            "anon_by_role": anon_by_role,
            "samples": self.samples,
            "per_process": sorted(
                ((self.names.get(pid, "?"), hwm) for pid, hwm in self.peak_hwm.items()), key=lambda t: -t[1]
            ),
        }


# ---- summaries ---------------------------------------------------------------------------------------------
def between_rounds(round_ends: list[float], round_s: list[float]) -> list[float]:
    """Seconds between rounds that no round's wall time counts (result rows, checkpoint).

    Args:
        round_ends: perf_counter time of each round's end-of-round progress line, in order.
        round_s: Each round's wall time (the runner's ``round_s``), same order.

    Returns:
        One value per round after the first: end[i] - end[i-1] - round_s[i] (the checkpoint after round
        i-1 and the result rows of round i; the rows are built after ``round_s`` stops).
    """
    return [
        round_ends[i] - round_ends[i - 1] - round_s[i] for i in range(1, min(len(round_ends), len(round_s)))
    ]


def cpu_per_round(snapshots: list[dict[str, float]]) -> list[dict[str, float]]:
    """CPU seconds each role used in each round, from cumulative snapshots (start, end of round 1, ...).

    Args:
        snapshots: :meth:`MemorySampler.cpu_by_role` before the run and at the end of every round.

    Returns:
        One dict per round: role -> CPU seconds between consecutive snapshots (a process that exited in
        between takes its CPU time with it, so a role's value can come out low, never high).
    """
    return [
        {r: cur.get(r, 0.0) - prev.get(r, 0.0) for r in cur}
        for prev, cur in zip(snapshots, snapshots[1:], strict=False)
    ]


def summarize_rounds(rounds: pd.DataFrame, gaps: list[float] | None = None) -> dict[str, Any]:
    """The per-round split of one setting: first round, and the mean of the steady rounds.

    Args:
        rounds: The runner's rounds table (``clients, round_s, train_wall_s, client_compute_s, agg_s,
            eval_s, orchestration_s``), one row per (trial, round).
        gaps: Optional :func:`between_rounds` values (one per round after the first).

    Returns:
        ``K``, ``rounds``, ``first_round_s``, ``steady_rounds`` (how many rounds the steady means cover:
        every round after the first, or the only one), and steady means of ``round_s``,
        ``client_compute_s``, ``agg_s``, ``eval_s``, ``orchestration_s``, ``orch_train_s`` (train wall -
        client compute), ``orch_agg_s`` (round wall - train wall - aggregation - evaluation), each part's
        share of the round (``*_pct``), ``per_client_ms``, ``best_round_s`` and ``best_per_client_ms`` (the
        fastest steady round: the least disturbed one on a shared machine) and ``between_rounds_s``.
    """
    if rounds.empty:
        raise ValueError("summarize_rounds: the rounds table is empty")
    r = rounds.reset_index(drop=True)
    steady = r.iloc[1:] if len(r) > 1 else r
    mean = {c: float(steady[c].mean()) for c in ("round_s", "client_compute_s", "agg_s", "eval_s")}
    orch = float(steady["orchestration_s"].mean())
    orch_train = float((steady["train_wall_s"] - steady["client_compute_s"]).mean())
    orch_agg = float((steady["round_s"] - steady["train_wall_s"] - steady["agg_s"] - steady["eval_s"]).mean())
    K = int(r["clients"].iloc[0])  # the clients that trained per round (the sample, when sampling)
    total = mean["round_s"]
    train_agg = float((steady["round_s"] - steady["eval_s"]).mean())
    out: dict[str, Any] = {
        "K": K,
        "sampled": K,
        "train_agg_s": train_agg,
        "train_agg_per_client_ms": 1e3 * train_agg / K,
        "rounds": len(r),
        "first_round_s": float(r["round_s"].iloc[0]),
        "steady_rounds": len(steady),
        "round_s": total,
        "client_compute_s": mean["client_compute_s"],
        "agg_s": mean["agg_s"],
        "eval_s": mean["eval_s"],
        "orchestration_s": orch,
        "orch_train_s": orch_train,
        "orch_agg_s": orch_agg,
        "per_client_ms": 1e3 * total / K,
        "best_round_s": float(steady["round_s"].min()),
        "best_per_client_ms": 1e3 * float(steady["round_s"].min()) / K,
        "between_rounds_s": float(sum(gaps) / len(gaps)) if gaps else float("nan"),
    }
    for name in ("client_compute", "agg", "eval", "orchestration", "orch_train", "orch_agg"):
        out[f"{name}_pct"] = 100.0 * out[f"{name}_s"] / total if total > 0 else float("nan")
    return out


def format_setting(s: dict[str, Any]) -> str:
    """One setting's table (see :func:`summarize_rounds`; ``memory`` from :meth:`MemorySampler.summary`)."""
    steady = "after the first" if s["rounds"] > 1 else "the only round"
    lines = [
        f"== {s['workload']}  K = {s['K']}  ({s['rounds']} round(s); steady = mean over {s['steady_rounds']} "
        f"round(s), {steady}) ==",
        f"  first round wall          {s['first_round_s']:9.2f} s",
        f"  steady round wall         {s['round_s']:9.2f} s   ({s['per_client_ms']:.2f} ms per client)",
        f"  fastest steady round      {s['best_round_s']:9.2f} s   "
        f"({s['best_per_client_ms']:.2f} ms per client)",
    ]
    for label, key in (
        ("client compute", "client_compute"),
        ("aggregation", "agg"),
        ("evaluation", "eval"),
        ("orchestration", "orchestration"),
        ("  while clients train", "orch_train"),
        ("  after the last client", "orch_agg"),
    ):
        lines.append(f"  {label:<25} {s[key + '_s']:9.2f} s   {s[key + '_pct']:5.1f} %")
    if s["between_rounds_s"] == s["between_rounds_s"]:  # not NaN
        lines.append(
            f"  between rounds (rows, ckpt) {s['between_rounds_s']:7.2f} s   (outside the round wall)"
        )
    lines.append(f"  whole run wall            {s['run_wall_s']:9.2f} s")
    if s.get("cpu_s"):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["cpu_s"].items()))
        lines.append(f"  CPU seconds per steady round: {cpu}")
        lines.append(
            f"  client-actor CPU per client {s['client_cpu_ms_per_client']:7.2f} ms   (load-independent, "
            f"unlike wall time)"
        )
    else:
        lines.append("  CPU seconds: n/a (one round: its CPU includes starting Ray and the actors)")
    m = s["memory"]
    lines.append(
        f"  peak memory: sum of per-process peak RSS {m['sum_peak_rss'] / GIB:.2f} GiB over {m['processes']} "
        f"processes; largest {m['max_process_peak_rss'] / GIB:.2f} GiB ({m['max_process']}); "
        f"peak summed RssAnon {m['peak_anon_total'] / GIB:.2f} GiB"
    )
    roles = ", ".join(
        f"{k} {v / GIB:.2f} ({m['anon_by_role'].get(k, 0) / GIB:.2f})"
        for k, v in sorted(m["by_role"].items())
    )
    lines.append(f"    peak RSS (RssAnon) by role, GiB: {roles}")
    lines.append(
        f"  update payload per client {s['bytes_per_client'] / 1024:.1f} KiB; checkpoint state "
        f"{s['checkpoint_bytes'] / 2**20:.2f} MiB (rewritten after every round) + "
        f"{s.get('rows_bytes_per_round', 0.0) / 2**10:.1f} KiB of result rows per round"
    )
    return "\n".join(lines)


def growth_check(settings: list[dict[str, Any]]) -> list[str]:
    """Lines comparing each workload's K values: time per client and memory, as ratios to the smallest K.

    Time is linear in K when the per-client ratio is about 1; memory is flat when the memory ratio is far
    below the K ratio. Also whether orchestration is under 10% of the round at K = 1000.
    """
    lines: list[str] = []
    for wl in sorted({s["workload"] for s in settings}):
        rows = sorted((s for s in settings if s["workload"] == wl), key=lambda s: s["K"])
        base = rows[0]
        for s in rows:
            t_ratio = s["per_client_ms"] / base["per_client_ms"]
            m, m0 = s["memory"]["sum_peak_rss"], base["memory"]["sum_peak_rss"]
            a, a0 = s["memory"]["peak_anon_total"], base["memory"]["peak_anon_total"]
            b_ratio = s["best_per_client_ms"] / base["best_per_client_ms"]
            c_ratio = s.get("client_cpu_ms_per_client", float("nan")) / base.get(
                "client_cpu_ms_per_client", float("nan")
            )
            if s.get("sampled", s["K"]) != s["K"] or base.get("sampled", base["K"]) != base["K"]:
                ratio = s["train_agg_per_client_ms"] / base["train_agg_per_client_ms"]
                lines.append(
                    f"  {wl:<9} K = {s['K']:>6}, {s['sampled']} sampled per round: training + aggregation "
                    f"{s['train_agg_s']:.2f} s per round, {s['train_agg_per_client_ms']:.2f} ms per sampled "
                    f"client, x{ratio:.2f} vs K = {base['K']} ({base['sampled']} per round)"
                )
            lines.append(
                f"  {wl:<9} K = {s['K']:>6}: {s['per_client_ms']:8.2f} ms per client, "
                f"x{t_ratio:.2f} vs K = {base['K']} (K x{s['K'] / base['K']:.0f}; "
                f"fastest rounds x{b_ratio:.2f}; client CPU per client "
                f"{'n/a' if c_ratio != c_ratio else f'x{c_ratio:.2f}'}); "
                f"memory {m / GIB:.2f} GiB x{m / m0:.2f}, RssAnon {a / GIB:.2f} GiB x{a / a0:.2f}"
            )
        if len(rows) > 1:
            hi = rows[-1]
            dk = hi["K"] - base["K"]
            slope = (hi["memory"]["peak_anon_total"] - base["memory"]["peak_anon_total"]) / dk
            lines.append(f"  {wl:<9} memory slope (RssAnon): {slope / 1024:.1f} KiB per extra client")
    for s in settings:
        if s["workload"] == "copy_task" and s["K"] == ORCH_TARGET_K:
            ok = s["orchestration_pct"] < 100 * ORCH_TARGET
            lines.append(
                f"  orchestration at K = {ORCH_TARGET_K} (copy task): {s['orchestration_pct']:.1f} % of the "
                f"round -> {'PASS' if ok else 'FAIL'} (target < {100 * ORCH_TARGET:.0f} %)"
            )
    return lines


# ---- one setting (child process) --------------------------------------------------------------------------
def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one setting in this process (a fresh in-process Ray) and measures it.

    Args:
        spec: ``workload``, ``config`` (path), ``overrides`` (``key=value`` list), ``K``.

    Returns:
        The raw measurements (see :func:`summarize_setting`): ``workload``, ``K``, ``rounds_table`` (the
        runner's rounds table as records), ``round_ends`` (seconds from the start of the run to each
        end-of-round progress line), ``run_wall_s``, ``memory`` (:meth:`MemorySampler.summary`),
        ``bytes_per_client`` and ``checkpoint_bytes``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from clair_ray.config import load_config
    from clair_ray.engine.runner import run_experiment
    from clair_ray.workloads import get_workload

    cfg = load_config(spec["config"], spec["overrides"])
    prepare = getattr(get_workload(cfg), "prepare", None)
    if prepare is not None:  # the cached base: built (once) before anything is timed
        prepare(print)
    t_start = time.perf_counter()
    ends: list[float] = []

    sampler = MemorySampler(os.getpid())
    cpu: list[dict[str, float]] = []  # CPU seconds per role at the start and at the end of every round

    def progress(msg: str) -> None:
        now = time.perf_counter()
        if ROUND_LINE.match(msg):
            ends.append(now)
            cpu.append(sampler.cpu_by_role())
        print(f"  [{spec['workload']} K={spec['K']} {now - t_start:7.1f}s] {msg}", flush=True)

    sampler.start()
    cpu.append(sampler.cpu_by_role())
    try:
        res = run_experiment(cfg, progress=progress)
    finally:
        sampler.stop()
    run_wall = time.perf_counter() - t_start
    ckpt = Path(cfg.output_dir) / "checkpoint"
    state = ckpt / "state.json"
    # What one checkpoint write costs: the state and its arrays (what clients continue from), and the
    # round's rows (one file per round; neither grows with the number of rounds).
    state_bytes = (
        state.stat().st_size + sum(p.stat().st_size for p in ckpt.glob("starts-*.npz"))
        if state.exists()
        else 0
    )
    parts = list((ckpt / "rows").glob("*.parquet"))
    return {
        "workload": spec["workload"],
        "K": spec["K"],
        "rounds_table": res.rounds.to_dict(orient="records"),
        "round_ends": [t - t_start for t in ends],
        "round_cpu": cpu,
        "run_wall_s": run_wall,
        "memory": sampler.summary(),
        # per client that trained (a client outside a round's sample sends nothing)
        "bytes_per_client": float(res.clients[res.clients["sampled"]]["bytes_sent"].mean())
        if len(res.clients)
        else 0.0,
        "checkpoint_bytes": state_bytes,
        "rows_bytes_per_round": sum(p.stat().st_size for p in parts) / len(parts) if parts else 0.0,
    }


def summarize_setting(raw: dict[str, Any]) -> dict[str, Any]:
    """One setting's summary from its raw measurements (what :func:`run_one` returns).

    Returns:
        :func:`summarize_rounds` of its rounds table, plus ``workload``, ``run_wall_s``, ``memory``,
        ``bytes_per_client`` and ``checkpoint_bytes``.
    """
    rounds = pd.DataFrame(raw["rounds_table"])
    out = summarize_rounds(rounds, between_rounds(raw["round_ends"], rounds["round_s"].tolist()))
    for key in ("workload", "run_wall_s", "memory", "bytes_per_client", "checkpoint_bytes"):
        out[key] = raw[key]
    out["K"] = raw["K"]  # the federation; ``sampled`` is who trained per round
    out["rows_bytes_per_round"] = raw.get("rows_bytes_per_round", 0.0)
    # The first round's CPU includes starting Ray and the actors (the first snapshot precedes ray.init), so
    # a one-round setting has no CPU figure.
    steady = cpu_per_round(raw.get("round_cpu", []))[1:]
    roles = sorted({r for d in steady for r in d})
    out["cpu_s"] = {r: sum(d.get(r, 0.0) for d in steady) / len(steady) for r in roles} if steady else {}
    client = out["cpu_s"].get("client actors", float("nan"))
    out["client_cpu_ms_per_client"] = 1e3 * client / out["K"]
    return out


def print_report(settings: list[dict[str, Any]]) -> None:
    """Prints every setting's table (:func:`format_setting`) and the growth check."""
    for s in settings:
        print(format_setting(s))
        print()
    print("== growth check ==")
    for line in growth_check(settings):
        print(line)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs :func:`run_one` in a fresh Python process (its output streams through); returns its result."""
    with tempfile.TemporaryDirectory(prefix="clair-scale-") as tmp:
        result_path = Path(tmp) / "result.json"
        spec = {**spec, "overrides": [*spec["overrides"], f"output_dir={Path(tmp) / 'run'}"]}
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            json.dumps(spec),
            "--json",
            str(result_path),
        ]
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(result_path.read_text())


def uptime() -> str:
    """The load averages of ``/proc/loadavg`` (1, 5, 15 minutes)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    """Parses arguments and runs every setting (or, with ``--child``, one setting in this process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy-clients", type=int, nargs="*", default=None, help="copy-task K values")
    parser.add_argument("--linear-clients", type=int, nargs="*", default=None, help="linear K values")
    parser.add_argument("--copy-override", action="append", default=[], help="key=value for the copy task")
    parser.add_argument("--linear-override", action="append", default=[], help="key=value for linear")
    parser.add_argument("--quick", action="store_true", help="copy K=100 and linear K=1000 only")
    parser.add_argument(
        "--sample", type=int, default=0,
        help="copy task: clients sampled per round (workload.clients_per_round; all where K is smaller)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--report", type=Path, default=None, help="reprint the tables of a --json file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        out = run_one(json.loads(args.child))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=float))
        return
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print_report([summarize_setting(raw) for raw in saved["raw"]])
        print(f"\nload average before {saved['load_before']}, after {saved['load_after']} (1, 5, 15 min)")
        return

    copy_k = args.copy_clients if args.copy_clients is not None else ([100] if args.quick else [100, 1000])
    linear_k = (
        args.linear_clients if args.linear_clients is not None else ([1000] if args.quick else [1000, 10000])
    )
    specs = [
        {
            "workload": "copy_task",
            "K": k,
            "config": str(CONFIGS["copy_task"]),
            "overrides": [
                *([f"workload.clients_per_round={args.sample}"] if 0 < args.sample < k else []),
                *args.copy_override,
            ],
        }
        for k in copy_k
    ] + [
        {
            "workload": "linear",
            "K": k,
            "config": str(CONFIGS["linear"]),
            "overrides": list(args.linear_override),
        }
        for k in linear_k
    ]
    for spec in specs:
        spec["overrides"] = [f"workload.num_clients={spec['K']}", *spec["overrides"]]
    load_before = uptime()
    print(f"load average before: {load_before}; {os.cpu_count()} CPUs; {len(specs)} settings", flush=True)
    raws: list[dict[str, Any]] = []
    for spec in specs:
        print(f"-- {spec['workload']} K = {spec['K']}: {' '.join(spec['overrides'])}", flush=True)
        t0 = time.perf_counter()
        raws.append(run_child(spec))
        print(f"-- done in {time.perf_counter() - t0:.0f}s (load average {uptime()})", flush=True)
    load_after = uptime()
    print()
    settings = [summarize_setting(raw) for raw in raws]
    print_report(settings)
    print(f"\nload average before {load_before}, after {load_after} (1, 5, 15 min)")
    if args.json:
        payload = {"load_before": load_before, "load_after": load_after, "settings": settings, "raw": raws}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
