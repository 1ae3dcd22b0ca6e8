"""Tasks the one trainer (``hatnet.engine``) runs: data, model, loss and metrics of each."""
