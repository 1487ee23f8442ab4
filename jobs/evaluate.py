"""Ray job: metrics of a trained model on labelled data (`vitray evaluate`): the CLI's options plus `--config YAML`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/evaluate-frame-test.yaml
"""
import sys

from _entry import run  # jobs/ is first on sys.path when a job runs this file

if __name__ == "__main__":
    sys.exit(run("evaluate"))
