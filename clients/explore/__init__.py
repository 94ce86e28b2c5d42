"""``recsys explore``: a read-only page in the browser that shows what the recommender does.

A real client of the public API: every list on the page is one Recommend, Similar or Popular
call through :class:`clients.client.RecsysClient` (with the API key and TLS of the command
line), and each shows the call's request id so it can be found in the server's request log.

* :mod:`clients.explore.catalog`: the item table, for title search (the API has no such RPC)
* :mod:`clients.explore.queries`: query string -> one API call -> JSON
* :mod:`clients.explore.server`: ``http.server`` on 127.0.0.1 serving ``static/`` and the JSON
* :mod:`clients.explore.cli`: the ``recsys explore`` subcommand
"""
