"""edgepatch results as pandas DataFrames (docs/python.md).

    import edgepatch_results as er
    run = er.open_run("runs/demo")
    run.prompts()        # one row per prompt and position: token, token_text, type, example
    run.metrics()        # one row per prompt and condition (full_model, plan, each ablation)
    run.summary()        # model_logs.json's figures per condition
    run.rounds()         # one row per pruning round
    run.scores(0)        # round 0's units, scores, kept
    run.circuit().heads  # the circuit found: .heads and .edges
    sweep = er.open_sweep("configs/sweeps/tiny.json")   # or its output_root
    sweep.summary()      # the same tables with run, model, task columns
"""

from ._files import MissingResult, ResultsError
from .run import Circuit, Run, open_run
from .sweep import Sweep, open_sweep

__version__ = "0.1.0"
__all__ = ["open_run", "open_sweep", "Run", "Sweep", "Circuit", "ResultsError", "MissingResult", "__version__"]
