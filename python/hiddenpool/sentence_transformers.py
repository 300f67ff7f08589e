"""``hiddenpool.sentence_transformers``, the public name of
``hiddenpool.integrations.sentence_transformers`` (``HiddenPooling``, ``save_portable``,
``read_pipeline``, ``pooling_config``)."""

from hiddenpool.integrations.sentence_transformers import *  # noqa: F403
from hiddenpool.integrations.sentence_transformers import __all__, __getattr__  # noqa: F401
