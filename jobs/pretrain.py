"""Ray job: masked-autoencoder pre-training on unlabelled images (`vitray pretrain`): the CLI's options plus `--config YAML`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pretrain.py --config jobs/configs/pretrain-line-vit-small.yaml
"""
import sys

from _entry import run  # jobs/ is first on sys.path when a job runs this file

if __name__ == "__main__":
    sys.exit(run("pretrain"))
