# Documented commands (README): install, demo, test, lint, bench.
.PHONY: install demo test test-all lint format bench

install:
	pip install -e ".[test,dev]"

demo:
	gemma4-jax generate

test:
	python -m pytest -q -m "not slow" -n 2 --dist worksteal

test-all:
	python -m pytest -q

lint:
	ruff check gemma4_jax kernels serving tests benchmarks setup.py

format:
	ruff format gemma4_jax kernels serving tests benchmarks setup.py

bench:
	gemma4-jax bench --preset bench-100m --hf-baseline
