"""The OpenAI-compatible API (completions, chat completions, models), as vLLM serves it."""
