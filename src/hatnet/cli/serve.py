"""``hatnet serve``: a page and a JSON API for trying trained runs in a browser."""
from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from ..errors import HatNetError
from ..extras import require
from .app import app, console as output_console
from .options import AmpOption

DEMO_RUN = Path('hatnet-demo')


@app.command()
def serve(
        checkpoint: Optional[List[Path]] = typer.Option(
            None, help='Run directory, checkpoint file or original HAT-Net .pth; repeat it to serve several runs. '
                       '(default: ./hatnet-demo, the run `hatnet demo` writes)'),
        host: str = typer.Option('127.0.0.1', help='Address to listen on (0.0.0.0: every network interface).'),
        port: int = typer.Option(7860, help='Port to listen on.'),
        device: str = typer.Option('auto', help='auto | cpu | cuda | cuda:N.'),
        amp: AmpOption = 'none',
):
    """Serve a page to try the runs on your images (top-5, mask overlay, boxes, attention) and its JSON API."""
    require('fastapi', 'uvicorn', 'python_multipart', needed_by='hatnet serve')
    if not checkpoint:
        if not DEMO_RUN.is_dir():
            raise HatNetError('give --checkpoint RUN (a run directory or checkpoint file), or run `hatnet demo` '
                              'first to train ./hatnet-demo')
        checkpoint = [DEMO_RUN]
    from ..serve import listen, load_runs, serve as run_server

    runs = load_runs(checkpoint, device, amp)
    sock = listen(host, port)  # before the message: a port in use is one error line, not a traceback
    console = output_console()
    for run in runs.values():
        console.print(Text.assemble((run.name, 'bold'), f': {run.task}, {run.model}, '
                                    f'{len(run.predictor.class_names)} classes ({run.path})'))
    shown_host = f'[{host}]' if ':' in host else host
    console.print(Text.assemble('open ', (f'http://{shown_host}:{sock.getsockname()[1]}/', 'bold'), ' (Ctrl-C stops)'))
    run_server(runs, sock)
