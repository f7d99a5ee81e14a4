"""``python -m dwmtrain``: the ``dwmtrain`` command."""

from dwmtrain.launch.cli import run

run()
