"""The OpenAI-compatible HTTP API (``pagedgen serve --openai-port N``).

``protocol``: typed request bodies; ``responses``: typed response bodies;
``engine_run``: one API call's engine requests as one stream; ``serving``:
request -> engine -> response; ``errors``: exceptions -> HTTP statuses;
``app``: the FastAPI app and the uvicorn server on the gRPC server's loop.
"""
