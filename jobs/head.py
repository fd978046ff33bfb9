"""A private Ray head node on this machine: start one, and stop exactly that one.

``ray stop`` stops every Ray process of the user on the machine (another run's, a test session's), and a
SIGTERM to ``ray start``'s head leaves ``gcs_server`` and the autoscaler monitor running. This script
starts a head node on 127.0.0.1 with its own temp dir and free ports, and stops it by terminating exactly
the processes that name that temp dir, and their children (SIGKILL for any still alive after 5 s)::

    python jobs/head.py start --num-cpus 2          # prints the temp dir and the addresses
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:PORT --working-dir . -- python ...
    python jobs/head.py stop /tmp/crhXXXX           # the temp dir start printed

Use ``RAY_AUTH_MODE=token`` (and this user's ``~/.ray/auth_token``) for ``ray start`` (here), ``ray job
submit`` and ``ray status`` alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
INFO = "clair_head.json"


def free_ports(n: int) -> list[int]:
    """``n`` free TCP ports on 127.0.0.1 (bound at once, so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start(num_cpus: float, object_store_bytes: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """Starts a head node on 127.0.0.1 with its own temp dir and ports, token authentication on unless
    ``env`` sets ``RAY_AUTH_MODE`` otherwise.

    Returns:
        ``temp_dir``, ``address`` (the GCS, for ``ray.init``) and ``dashboard`` (for ``ray job submit``),
        also written to ``<temp_dir>/clair_head.json``.
    """
    env = dict(os.environ if env is None else env)
    if env.setdefault("RAY_AUTH_MODE", "token") == "token":  # token auth unless the caller chose otherwise
        from clair_ray.engine.session import use_token_auth

        use_token_auth()  # ~/.ray/auth_token (0600), which `ray start` and `ray job submit` read
    temp_dir = tempfile.mkdtemp(prefix="crh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, nm, om, agent, agent_grpc, metrics, renv = free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", f"--num-cpus={num_cpus:g}",
        f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
    except subprocess.SubprocessError:
        stop(temp_dir)
        raise
    info = {"temp_dir": temp_dir, "address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    (Path(temp_dir) / INFO).write_text(json.dumps(info))
    return info


def stop(temp_dir: str) -> int:
    """Terminates the processes of the head node that owns ``temp_dir`` (and their children).

    Returns:
        How many processes were stopped.
    """
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []) and p.pid != os.getpid():
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def main(argv: list[str] | None = None) -> int:
    """``start`` or ``stop`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="jobs/head.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("start", help="start a private head node on 127.0.0.1")
    st.add_argument("--num-cpus", type=float, default=os.cpu_count() or 1)
    st.add_argument("--object-store-bytes", type=int, default=200_000_000)
    sp = sub.add_parser("stop", help="stop the head node that owns TEMP_DIR (and nothing else)")
    sp.add_argument("temp_dir", help="the temp dir `start` printed")
    args = parser.parse_args(argv)
    if args.command == "start":
        print(json.dumps(start(args.num_cpus, args.object_store_bytes), indent=1))
        return 0
    if not (Path(args.temp_dir) / INFO).exists():
        print(f"jobs/head.py stop: {args.temp_dir} was not made by jobs/head.py start", file=sys.stderr)
        return 2
    print(f"stopped {stop(args.temp_dir)} process(es) of the head node in {args.temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
