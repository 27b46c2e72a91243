"""MQAR (multi-query associative recall, Zoology): the task, training a model on it, and the sweep."""
