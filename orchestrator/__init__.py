"""The online path: gRPC in -> history -> Triton user_tower -> FAISS -> Triton ranker_ensemble -> MMR + rules -> gRPC out.

``pipeline.py`` reads like that diagram; ``service.py`` is the gRPC edge (validation, status
codes, health, reflection, :func:`orchestrator.service.create_server`); ``serve.py`` runs it
(``recsys serve``, ``recsys demo``).
"""
