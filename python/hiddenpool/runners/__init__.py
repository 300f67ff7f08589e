"""The runner seam (``base.Runner``: token batches in, hidden states out) and one runner
per runtime: transformers on torch (``torch_runner``) and ONNX Runtime without torch
(``onnx_runner``), with the fast tokenizers both use (``tokens``). Only ``torch_runner``
imports torch or transformers."""
