"""Analysis of trained runs: per-sample DWM scores and how each stage's data preference differs.

    scoring.py      samples scored as training weighs them    stats.py    the numbers (pure)
    summary.py      the lines printed                         figures.py  the figures, through plots.save_png
    preferences.py  the analysis of one run's stages          cli.py      ``dwmtrain score``, ``analyze-preferences``
    score_parts.py  ``score --part I/N`` and ``--merge``: the micro-batches split over a job array

``cli`` is imported by every ``dwmtrain`` command, so it loads neither torch nor matplotlib until it runs.
"""
