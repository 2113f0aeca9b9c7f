"""Runner scripts of `gemma4-jax bench --peers`: one per system, each run by path with that system's own python
(a peer's virtual environment has no gemma4_jax), speaking the line protocol of `_protocol.py`."""
