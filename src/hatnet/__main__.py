"""``python -m hatnet``: the CLI (this is also the entry point for ``torchrun -m hatnet``)."""
from .cli import main

if __name__ == '__main__':
    main()
