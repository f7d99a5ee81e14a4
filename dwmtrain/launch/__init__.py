"""Entry points of the jobs, importable from an installed package.

    deepspeed [--num_gpus N | --hostfile H] --module dwmtrain.launch.pretrain --config C --run-dir D [k=v ...]
    torchrun --standalone --nproc_per_node N -m dwmtrain.meta.job --run-dir D --stage K
    dwmtrain train ...      prints and runs the deepspeed command above

``dwmtrain.launch.meta_update`` is the meta job under its earlier name (the same ``main``).
``launchers/pretrain.py`` and ``launchers/meta_update.py`` are thin wrappers of these for a checkout.
"""
