"""Tasks for the one trainer: each knows its data, model, loss and metrics."""
