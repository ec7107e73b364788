"""orion merge: linear, slerp, ties and dare merges of local models through mergekit.

flags.py      a merge from --models/--ratios/--base and the merge settings
from_yaml.py  a merge from a mergekit YAML, as mergekit-yaml runs it
refs.py       model references handed to mergekit (absolute paths: never the hub), config validation
execute.py    mergekit's run inside the producing frame, with the inputs checked first
verify.py     no tensor of the inputs is dropped (mergekit's architecture gaps)
"""

from .execute import MergeResult
from .flags import MERGEKIT_METHODS, TASK_VECTOR_METHODS, merge_models, merge_parameters
from .from_yaml import merge_from_config, read_merge_config

__all__ = ["MERGEKIT_METHODS", "MergeResult", "TASK_VECTOR_METHODS", "merge_from_config", "merge_models",
           "merge_parameters", "read_merge_config"]
