"""Ray sessions and resources: start or attach to Ray, and fail fast when the actors cannot be placed."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import ray

from clair_ray.config import ExperimentConfig

__all__ = [
    "EngineError",
    "RunInterrupted",
    "SimulatedCrash",
    "check_resources",
    "last_line",
    "ray_session",
    "use_token_auth",
]


class EngineError(RuntimeError):
    """The run cannot go on (too few clients, an actor gone for good, a timeout, bad resources)."""


class RunInterrupted(EngineError):
    """Ctrl+C (SIGINT) stopped the run; the tables of its completed rounds are written.

    Attributes:
        out_dir: The run directory.
        completed: (trial, round) of the last checkpointed round, or None if none completed.
    """

    def __init__(self, out_dir: Path, completed: tuple[int, int] | None) -> None:
        self.out_dir, self.completed = out_dir, completed
        done = (
            "no round completed"
            if completed is None
            else f"completed up to trial {completed[0]} round {completed[1]}"
        )
        super().__init__(f"interrupted ({done}); tables of the completed rounds are in {out_dir}")


class SimulatedCrash(EngineError):
    """Raised by ``engine.debug_stop_after_round``: the driver 'crashes' right after a checkpoint."""


def last_line(tb: str | None) -> str:
    """The exception line of a traceback (its last non-empty line): the cause, without the frames."""
    lines = [ln.strip() for ln in (tb or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig) -> Iterator[None]:
    """Uses a running Ray if this process already has one, else attaches or starts one, and stops it."""
    if ray.is_initialized():  # the caller (a test fixture, a Tune trial) owns Ray
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
        _check_reachable(address)
        try:
            # Connecting: Ray forbids local resource arguments (num_cpus, ...) when it attaches to a cluster.
            ray.init(address=cfg.ray.address, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as exc:
            raise EngineError(
                f"ray.address={address!r}: no Ray cluster answered ({str(exc).strip().splitlines()[0]}); "
                f"{_HOW_TO_START}"
            ) from exc
    else:
        use_token_auth()
        # address="local": without it ray.init() joins whatever `ray start` cluster
        # /tmp/ray/ray_current_cluster names (even a stale one) and then rejects num_cpus.
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=None if cfg.ray.object_store_mb is None else cfg.ray.object_store_mb * 2**20,
            include_dashboard=cfg.ray.include_dashboard,
            logging_level="ERROR",
        )
    try:
        yield
    finally:
        ray.shutdown()


def use_token_auth() -> Path | None:
    """Keeps Ray's token authentication (its default for a new local Ray) and its token private.

    Ray 2.60's servers (GCS, raylet) listen on every interface whatever the node address, so the token is
    what keeps other hosts (and other users) from running code in a local run: a client without it is
    refused. Ray turns token mode on itself in ``ray.init`` when ``RAY_AUTH_MODE`` is unset (setting the
    variable here would come too late: Ray reads it when imported); this creates the token file
    (``~/.ray/auth_token``, which Ray would write world-readable) with mode 0600 first, or narrows an
    existing one of this user's to 0600.

    Returns:
        The token file, or None when ``RAY_AUTH_MODE`` is set to something other than ``token``.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
    except OSError as exc:
        raise EngineError(
            f"cannot create Ray's token file {path} ({exc.strerror}): make it writable, point "
            "RAY_AUTH_TOKEN_PATH at a private file, or set RAY_AUTH_MODE=disabled on a machine nobody "
            "else reaches"
        ) from exc
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


_HOW_TO_START = (
    "start one (`ray start --head`, or `python jobs/head.py start` for a private one) or leave ray.address "
    "unset to run on this machine"
)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout_s`` (Ray's own connect retries
    for minutes); ``auto`` and client addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EngineError(
            f"ray.address={address!r}: no Ray cluster answered there within {timeout_s:g} s ({exc}); "
            f"{_HOW_TO_START}"
        ) from exc


def check_resources(cfg: ExperimentConfig) -> None:
    """Fails fast when the actors cannot all be placed (they would pend for ever otherwise)."""
    e = cfg.engine
    have = ray.cluster_resources()
    need_cpu = e.num_actors * e.actor_num_cpus + e.aggregator_num_cpus
    if need_cpu > have.get("CPU", 0.0) + 1e-9:
        raise EngineError(
            f"engine.num_actors={e.num_actors} x engine.actor_num_cpus={e.actor_num_cpus} + "
            f"engine.aggregator_num_cpus={e.aggregator_num_cpus} = {need_cpu:g} CPUs, but the Ray cluster "
            f"has {have.get('CPU', 0.0):g}: lower them (fractions are allowed) or add CPUs"
        )
    need_gpu = e.num_actors * e.actor_num_gpus
    if need_gpu > have.get("GPU", 0.0) + 1e-9:
        raise EngineError(
            f"engine.num_actors={e.num_actors} x engine.actor_num_gpus={e.actor_num_gpus} = {need_gpu:g} "
            f"GPUs, but the Ray cluster has {have.get('GPU', 0.0):g}"
        )
