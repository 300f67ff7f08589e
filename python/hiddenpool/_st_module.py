"""The name under which pipelines saved before hiddenpool 0.1's package layout list
``HiddenPooling`` in their ``modules.json`` (``hiddenpool._st_module.HiddenPooling``);
sentence-transformers imports that path when it loads them."""

from hiddenpool.integrations.st_module import HiddenPooling

__all__ = ["HiddenPooling"]
