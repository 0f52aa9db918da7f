"""`python -m trainer`: the container command a PyTorchJob runs."""
import sys

from .cli_train import main

sys.exit(main())
