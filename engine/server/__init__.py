"""The OpenAI-compatible HTTP server on rank 0: create_app (app.py), routes (openai.py),
request validation (protocol.py), the engine core client (async_llm.py; the core runs in its own process), metrics and auth."""
