"""The command line (``lora4diffusion COMMAND``): a thin layer over the Python API; nothing imports it.

``main`` parses and dispatches (cli/main.py); one module per group of commands: ``train`` (train-vae, train,
train-lora, reconstruct), ``sample``, ``evaluate`` (evaluate, train-classifier), ``convert`` (merge, extract,
resize, export-*/import-*), ``apps`` (list, info, demo, serve); ``args`` (argument types, --lora) and
``common`` (output folders, option helpers, signals around training) are shared by them.
"""

from lora4diffusion.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from lora4diffusion.cli.main import MODEL_COMMANDS, build_parser, main

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "MODEL_COMMANDS", "build_parser",
           "main"]
