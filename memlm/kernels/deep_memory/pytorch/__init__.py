"""The deep-memory op in plain PyTorch: the chunked dual form (``chunk.py``) and its chunk loop with a
hand-written backward (``dual_form.py``)."""
