"""``hiddenpool.ray``, the public name of ``hiddenpool.integrations.ray``
(``encode_dataset``)."""

from hiddenpool.integrations.ray import *  # noqa: F403
from hiddenpool.integrations.ray import __all__  # noqa: F401
