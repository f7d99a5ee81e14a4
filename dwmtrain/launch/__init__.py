"""The entry points, every one of them, importable from an installed package; each ends through
``dwmtrain.entry`` (one line and exit 2 for the project's own errors; the code of a planned stop; a bug keeps its
traceback).

    cli.py        the ``dwmtrain`` command (``python -m dwmtrain``)
    pretrain.py   every training rank: deepspeed [--num_gpus N | --hostfile H] --module dwmtrain.launch.pretrain
                  --config C --run-dir D [k=v ...]  (``dwmtrain train`` prints and runs this)
    meta_job.py   the meta-update job: torchrun --standalone --nproc_per_node N -m dwmtrain.launch.meta_job
                  --run-dir D --stage K

``launchers/pretrain.py`` and ``launchers/meta_update.py`` are thin wrappers of these for a checkout.
"""
