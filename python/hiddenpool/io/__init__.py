"""Reading and writing corpora: text, JSON lines, CSV/TSV and Parquet in chunks
(``corpus``), embeddings and span vectors out atomically, and the JSON-lines reader that
the evaluation data readers share (``json_lines``)."""
