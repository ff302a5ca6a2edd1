"""The cold-start model: towers, ranker, distributed training, export.

Importing the package registers the model names with the evaluation harness
(``services.trainer.baselines.base.PLUGIN_MODULES`` lists this package); the
adapter imports torch only when a model is built.
"""

from services.trainer.model import harness_adapter as harness_adapter
