"""The typer applications every command module registers on, and the console their output is printed on."""
import typer
from rich.console import Console

app = typer.Typer(
    name='hatnet', no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help='HAT-Net (Vision Transformers with Hierarchical Attention): models, training, evaluation, '
         'benchmarks and export.')
cls_app = typer.Typer(no_args_is_help=True, help='Image classification (also the top-level train, eval, predict, '
                                                 'attention and demo).')
seg_app = typer.Typer(no_args_is_help=True, help='Semantic segmentation with a Semantic FPN head.')
det_app = typer.Typer(no_args_is_help=True, help='Object detection (RetinaNet) and instance segmentation (Mask R-CNN).')
app.add_typer(cls_app, name='cls')
app.add_typer(seg_app, name='seg')
app.add_typer(det_app, name='det')


def console(**kwargs) -> Console:
    """The console of a command's output. Its text holds paths, class names and model names as the user gave
    them: no rich markup is read from it (``[...]`` prints as it is); styles are given as ``rich.text.Text``."""
    return Console(markup=False, **kwargs)
