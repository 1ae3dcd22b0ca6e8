"""Dataset readers and transforms for the tasks."""
