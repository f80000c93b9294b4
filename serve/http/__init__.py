"""The HTTP server of `python -m serve.server`: app (routes), protocol (OpenAI's wire
format), runner (the engine's thread), text (detokenisation), metrics (Prometheus) and
setup (building the engine)."""
