"""`rtsc web`: a read-only live page of every scanner, for any number of viewers.

``feed`` subscribes to the configured publishers (one thread) and folds their messages
into one :class:`~rtsc.web.state.ScannerState` per scanner; ``app`` is the Starlette
application (the page, a websocket of card updates, ``/api/state``, the reports);
``server`` runs it with uvicorn; ``sessions`` reads the session folders (the day's
finished series, report.html); ``static/`` is the page (HTML, JavaScript drawing on
``<canvas>``, CSS; no CDN). See docs/web.md.
"""
