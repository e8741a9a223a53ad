# The few commands people need (see README.md).
.PHONY: install test test-fast lint tiny

install:
	pip install -e ".[test]"

test:
	pytest

test-fast:
	pytest -m "not slow"

lint:
	ruff check .

tiny:
	python fastmam/pretrain.py --config tiny
