"""Train with GRPO: ``python train.py fit --config configs/cpu-demo.yaml`` (see ``--help``)."""

from grpo_lightning.cli import main

if __name__ == "__main__":
    main()
