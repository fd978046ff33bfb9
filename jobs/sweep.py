"""``ray job submit ... -- python jobs/sweep.py SWEEP [key=value ...]``: a Ray Tune sweep on the cluster.

The same as ``clair-ray sweep``; trials spread over the cluster's nodes, one placement group per trial.
Give an absolute ``sweep.storage_path`` on storage every node shares (NFS or similar), so that the trials'
directories and the gathered results end up in one place.
"""

from __future__ import annotations

import sys

from _common import prepare

if __name__ == "__main__":
    prepare()
    from clair_ray import cli

    sys.exit(cli.main(["sweep", *sys.argv[1:]]))
