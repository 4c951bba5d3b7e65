"""``m3 serve``: an OpenAI-compatible HTTP server over the answering core, with a visual-token budget per request.

One job per module: ``settings`` (what the flags set), ``app`` (the FastAPI routes), ``errors`` (every failure
as an OpenAI error body), ``worker`` (the one thread that owns the model and micro-batches queued requests
through :func:`m3cli.answering.core.answer_asks`), ``remote`` (``--allow-remote-media`` fetches), ``run``
(bind, load, serve, drain on SIGTERM), ``client`` (``m3 ask --server``: the standard library only, so a
question costs no model load and no heavy import). Requests are parsed by
:mod:`m3cli.answering.chat_request`, the parser ``m3 batch --input-format openai`` uses too. FastAPI,
uvicorn and httpx are imported only here, and only when a server runs.
"""
