"""OpenAI-compatible serving over the decode engine.

`openai.py` holds the HTTP API (schemas, validation, errors, routes), `text.py` turns token ids
into streamed text (stop strings, UTF-8, the `<think>` split) and `server.py` the engine thread,
metrics and app factory behind `jreason serve`.
"""
