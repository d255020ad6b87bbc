"""Circuit-ready transcoders: the cross-layer transcoder (``clt.py``), its training from the group stream
(``training.py``) and its export to circuit-tracer (``export.py``)."""
