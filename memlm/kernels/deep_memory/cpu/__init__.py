"""The deep-memory chunk loop compiled for CPU: ``dual_form.cpp`` and its loader (``loader.py``)."""
