"""orion run and orion demo: declared sequences of steps over the library calls.

pipeline.py  the pipeline file: variables, steps, references, checked before anything runs
steps.py     the step kinds (merge, quantize, shard, register, serve), each one library call
run.py       running a pipeline: references resolved, up-to-date steps skipped by their provenance
demo.py      orion's main job on the built-in reference model, end to end
"""

from .pipeline import Pipeline, Step, is_pipeline_file, load_pipeline
from .run import RunContext, StepFailedError, StepReport, run_pipeline

__all__ = ["Pipeline", "RunContext", "Step", "StepFailedError", "StepReport", "is_pipeline_file", "load_pipeline",
           "run_pipeline"]
