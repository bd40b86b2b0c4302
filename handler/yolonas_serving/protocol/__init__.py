"""The wire formats, one module each: ``plain`` (raw body, multipart form, JSON) and ``v2`` (KServe v2 / Open
Inference Protocol, with its binary tensor codec); ``base`` holds what they share and ``request`` picks the one a
TorchServe row speaks. Each protocol parses its own requests into images and raw options, and chooses the form of
its answer once (:meth:`base.ParsedRequest.answer`), an object that renders itself. Options are checked in
``options.py``, whatever the protocol."""
