"""``vitlab serve``: a web page and a JSON API for one model, with dynamic batching.

``config`` (the options, torch- and FastAPI-free), ``batcher`` (concurrent requests -> batches),
``app`` (the FastAPI app factory), ``static/`` (the page). Import ``vitlab.serve.app`` for the app.
"""
