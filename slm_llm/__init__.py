"""slm_llm: continual LLM fine-tuning with JARe increments and DTKR routing."""
__version__ = "0.1.0"
