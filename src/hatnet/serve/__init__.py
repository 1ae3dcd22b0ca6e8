"""``hatnet serve``: a page and a small JSON API over trained runs, served from the Python process.

``load_runs(paths)`` loads each run with :func:`hatnet.load`; ``create_app(runs)`` is the FastAPI application
(routes and error statuses: :mod:`hatnet.serve.server`); ``listen(host, port)`` and ``serve(runs, socket)`` run
it with uvicorn. The page's files are in ``static/``. Needs the ``[serve]`` extra (fastapi, uvicorn,
python-multipart).
"""
from .runs import Run, load_runs
from .server import MAX_PIXELS, MAX_UPLOAD_BYTES, create_app, listen, serve

__all__ = ['MAX_PIXELS', 'MAX_UPLOAD_BYTES', 'Run', 'create_app', 'listen', 'load_runs', 'serve']
