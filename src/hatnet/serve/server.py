"""The HTTP side of ``hatnet serve``: one page (``static/``) and a small JSON API, with FastAPI and uvicorn.

Routes::

    GET  /                 the page (index.html, app.js, style.css from static/: no build step, nothing external)
    GET  /api/runs         {"runs": [Run.info(), ...], "limits": {...}}
    POST /api/predict      multipart: image (JPEG / PNG / WebP file), run -> Run.predict()
    POST /api/attention    multipart: image, run, block ("STAGE.BLOCK"), x, y (model-input pixels) -> Run.attention()

Every error is ``{"error": message}`` with a 4xx status for bad requests (400 bad form, unknown run, corrupt or
truncated image; 413 upload too large; 415 not a JPEG, PNG or WebP image) and 500 for a failure of ours; the
server keeps serving either way. Uploads are read into memory and decoded there: nothing is written to disk.
Predictions run one at a time (a lock): the models are not safe to run from several threads at once.
"""
import io
import socket
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import FormParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from ..data.images import read_image
from ..errors import HatNetError
from .runs import Run

__all__ = ['MAX_PIXELS', 'MAX_UPLOAD_BYTES', 'create_app', 'listen', 'serve']

STATIC = Path(__file__).parent / 'static'
MAX_UPLOAD_BYTES = 20 * 2 ** 20  # 20 MiB: any phone photo
MAX_PIXELS = 4096 * 4096         # 16.8 megapixels: a 12 MP phone photo fits; the masks are kept at full size
FORMATS = {'JPEG': 'JPEG', 'PNG': 'PNG', 'WEBP': 'WebP'}  # Pillow's name -> ours
FORM_OVERHEAD = 64 * 2 ** 10     # the multipart body around the file: boundaries, headers, the other fields
DRAIN_LIMIT = 10 * MAX_UPLOAD_BYTES  # the most of a too large body read (and dropped) before the 413


class RequestError(Exception):
    """A bad request: its message goes to the page as ``{"error": ...}`` with the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _megabytes(n: int) -> str:
    return f'{n / 2 ** 20:.0f} MB'


async def read_form(request: Request) -> Tuple[Dict[str, str], Dict[str, Tuple[str, bytes]]]:
    """The fields and files (name -> (file name, bytes)) of a multipart/form-data request, kept in memory.

    Starlette's own form reading spools files over 1 MB to temporary files; this keeps at most
    ``MAX_UPLOAD_BYTES`` (plus the form around it) and never touches the disk.
    """
    content_type, params = parse_options_header(request.headers.get('content-type', ''))
    if content_type != b'multipart/form-data' or b'boundary' not in params:
        raise RequestError('send the image as multipart/form-data (fields: image, run)')
    limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD
    length = request.headers.get('content-length', '')
    too_large = length.isdigit() and int(length) > limit
    fields, files = {}, {}
    parser = FormParser(
        'multipart/form-data', boundary=params[b'boundary'], config=dict(MAX_MEMORY_FILE_SIZE=float('inf')),
        on_field=lambda f: fields.__setitem__(f.field_name.decode(), (f.value or b'').decode(errors='replace')),
        on_file=lambda f: files.__setitem__(f.field_name.decode(), (
            (f.file_name or b'').decode(errors='replace'), f.file_object.getvalue())))
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            too_large = too_large or received > limit
            # past the limit the rest is read and dropped: most clients (browsers, urllib) send the whole body
            # before they read the answer, and would see a broken connection instead of the 413
            if received > DRAIN_LIMIT:
                break
            if not too_large:
                parser.write(chunk)
        if not too_large:
            parser.finalize()
    except FormParserError as e:
        raise RequestError(f'the form could not be read: {e}') from None
    if too_large:
        raise RequestError(f'the upload is larger than the limit of {_megabytes(MAX_UPLOAD_BYTES)}', 413)
    return fields, files


def decode_upload(files: Dict[str, Tuple[str, bytes]]) -> Tuple[str, Image.Image]:
    """(file name, RGB image) of the ``image`` upload, decoded in memory, after the checks of the limits."""
    if 'image' not in files:
        raise RequestError('no image: send it as the file field "image"')
    name, data = files['image']
    if not data:
        raise RequestError(f'{name or "the image"} is empty')
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f'{name} is larger than the limit of {_megabytes(MAX_UPLOAD_BYTES)}', 413)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise RequestError(f'{name} is not an image: send a JPEG, PNG or WebP file', 415) from None
    if image.format not in FORMATS:
        raise RequestError(f'{name} is a {image.format} image: send a JPEG, PNG or WebP file', 415)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise RequestError(f'{name} has {width}x{height} pixels, more than the limit of '
                           f'{MAX_PIXELS / 1e6:.1f} megapixels (e.g. 4096x4096): scale it down', 413)
    try:
        image.load()  # decodes it all here, so a truncated file is this error and not a failure later
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(f'{name} is a truncated or corrupt {FORMATS[image.format]} file ({e})') from None
    return name, read_image(image)  # hatnet's one reader: EXIF orientation, modes to RGB


def create_app(runs: Dict[str, Run]) -> FastAPI:
    """The web application serving ``runs`` (by name, as :func:`~hatnet.serve.runs.load_runs` returns them)."""
    # no /docs or /redoc: their pages load scripts from a CDN; /openapi.json describes the API
    app = FastAPI(title='hatnet serve', docs_url=None, redoc_url=None)
    lock = threading.Lock()
    limits = dict(max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS, formats=list(FORMATS.values()))

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return JSONResponse({'error': str(error)}, error.status)

    @app.exception_handler(HatNetError)
    async def input_error(request, error: HatNetError):  # the library's checks of an input: a bad request too
        return JSONResponse({'error': str(error)}, 400)

    @app.exception_handler(Exception)
    async def failure(request, error: Exception):
        return JSONResponse({'error': f'the server failed: {type(error).__name__}: {error}'}, 500)

    def pick_run(fields: Dict[str, str]) -> Run:
        name = fields.get('run') or (next(iter(runs)) if len(runs) == 1 else '')
        if name not in runs:
            raise RequestError(f'unknown run {name!r}: the runs are {", ".join(runs)}' if name else
                               f'no run: send the field "run", one of {", ".join(runs)}')
        return runs[name]

    def locked(function, *args):
        with lock:
            return function(*args)

    @app.get('/', include_in_schema=False)
    def page():
        return FileResponse(STATIC / 'index.html')

    app.mount('/static', StaticFiles(directory=STATIC), name='static')

    @app.get('/api/runs')
    def list_runs():
        """The loaded runs (name, task, model, classes, attention blocks, ...) and the upload limits."""
        return dict(runs=[run.info() for run in runs.values()], limits=limits)

    @app.post('/api/predict')
    async def predict(request: Request):
        """The prediction of one run for one image: the CLI's JSON of it, latency_ms and what the page draws."""
        fields, files = await read_form(request)
        run = pick_run(fields)
        name, picture = decode_upload(files)
        return await run_in_threadpool(locked, run.predict, picture, name)

    @app.post('/api/attention')
    async def attention(request: Request):
        """Where one query point of the model input looks in one H-MHSA block: the local and the global step."""
        fields, files = await read_form(request)
        run = pick_run(fields)
        query = _query(fields)
        _, picture = decode_upload(files)
        block = fields.get('block') or (run.blocks[0] if run.blocks else '')
        return await run_in_threadpool(locked, run.attention, picture, block, query)

    return app


def _query(fields: Dict[str, str]) -> Optional[Tuple[float, float]]:
    """(x, y) from the fields x and y, None if neither is given (the centre)."""
    if not fields.get('x') and not fields.get('y'):
        return None
    try:
        return float(fields['x']), float(fields['y'])
    except (KeyError, ValueError):
        raise RequestError(f'x and y must be numbers (pixels of the model input), got '
                           f'{fields.get("x")!r}, {fields.get("y")!r}') from None


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or one clear error if it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise HatNetError(f'cannot listen on {host}:{port}: {e.strerror or e}') from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HatNetError(f'cannot listen on {host}:{port}: {e.strerror or e}') from None
    return sock


def serve(runs: Dict[str, Run], sock: socket.socket, log_level: str = 'warning') -> None:
    """Serve ``runs`` on the bound socket (:func:`listen`) until interrupted (Ctrl-C)."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(create_app(runs), log_level=log_level)).run(sockets=[sock])
