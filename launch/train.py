"""Multi-process entry: `deepspeed launch/train.py --config configs/X.yaml [key=value ...]`.

Also the per-rank program of `launch/slurm/train.sbatch` (srun) and of torchrun.
"""
import sys

from slm_llm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
