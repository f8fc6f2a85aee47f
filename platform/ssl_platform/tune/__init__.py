"""Ray Tune sweeps (``sslp sweep``): the sweep YAML (spec.py), the Tuner and its trials
(sweep.py), and the table, best config and plots a sweep leaves (report.py).

Importing this package does not import Ray; :func:`run_sweep` does.
"""

from ssl_platform.tune.spec import list_sweeps, load_sweep
from ssl_platform.tune.sweep import run_sweep

__all__ = ["list_sweeps", "load_sweep", "run_sweep"]
