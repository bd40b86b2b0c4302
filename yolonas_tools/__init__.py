"""The tools around the served model: paths, server control, clients, archive building, evaluation and load
generation, one module per role. Installed with the repository (``pip install -e .``), never archived: workers get
only ``yolonas`` and ``yolonas_serving``. The commands in ``scripts/`` and ``yolonas-serve`` call into it."""
