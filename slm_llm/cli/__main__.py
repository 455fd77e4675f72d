"""`python -m slm_llm.cli ...`: the `slm-llm` command without its console script."""
import sys

from slm_llm.cli import main

sys.exit(main())
