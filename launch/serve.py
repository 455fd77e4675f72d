"""Thin entry: `python launch/serve.py --run runs/X --backend hf|vllm [--host H --port P] [key=value ...]`."""
import sys

from slm_llm.cli import main

if __name__ == "__main__":  # the guard matters: vLLM's engine core is a spawned process
    sys.exit(main(["serve", *sys.argv[1:]]))
