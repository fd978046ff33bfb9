"""``ray job submit ... -- python jobs/run.py CONFIG [key=value ...]``: one experiment on the cluster.

The same as ``clair-ray run``; Ray is the cluster the job runs on (``RAY_ADDRESS``, set by the job server).
Give an absolute ``output_dir`` on storage the cluster shares: a relative one lands in the job's temporary
copy of the working directory.
"""

from __future__ import annotations

import sys

from _common import prepare

if __name__ == "__main__":
    prepare()
    from clair_ray import cli

    sys.exit(cli.main(["run", *sys.argv[1:]]))
