"""The tools around the served model, grouped by role: ``serve`` (server control, keys, clients), ``build``
(archives and what they carry), ``measure`` (speed and accuracy), ``data`` (images and datasets); ``paths`` and
``cli`` serve them all. Installed with the repository (``pip install -e .``), never archived: workers get only
``yolonas`` and ``yolonas_serving``. The commands in ``scripts/`` and ``yolonas-serve`` call into it."""
