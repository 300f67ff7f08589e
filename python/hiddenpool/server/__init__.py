"""``hiddenpool serve``: an embedding server (OpenAI's embeddings contract and hiddenpool's
own routes) that batches texts across requests on one worker thread."""
