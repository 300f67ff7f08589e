"""hiddenpool inside other frameworks: sentence-transformers (``HiddenPooling``,
``save_portable``) and Ray Data (``encode_dataset``). Each module imports its framework
only when used."""
