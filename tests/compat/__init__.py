"""vLLM's own OpenAI-server tests, ported to run against any server (see conftest.py)."""
