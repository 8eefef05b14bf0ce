"""The OpenAI-compatible HTTP server on rank 0: create_app (app.py), routes (openai.py),
request validation (protocol.py), the engine thread (async_engine.py), metrics and auth."""
