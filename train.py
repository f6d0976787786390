"""Train with GRPO: ``python train.py fit --config configs/cpu-demo.yaml`` (see ``--help``).

Errors that say what to change (a missing file, an impossible setting) are printed as one line; ``GRPO_DEBUG=1``
shows the full traceback.
"""

import sys

from grpo_lightning.cli import train

if __name__ == "__main__":
    sys.exit(train())
