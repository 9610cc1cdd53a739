"""Runners for the peer engines, each run in its own venv
(``pagedserve.bench.peer_venvs.run_peer``).

Their modules import only the standard library at the top, the engine inside ``main``, so the
benchmarks' venv can import them to test their argument and JSON handling.
"""
