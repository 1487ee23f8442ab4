"""Ray job: the nightly bulk scoring with Ray Data (`vitray score`): the CLI's options plus `--config YAML`.

Rerunning it on the same output scores only what is new, so a schedule can point
it at the same incoming prefix every night (see docs/cluster.md).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/score.py --config jobs/configs/score-nightly.yaml
"""
import sys

from _entry import run  # jobs/ is first on sys.path when a job runs this file

if __name__ == "__main__":
    sys.exit(run("score"))
