# The few commands people need (see README.md).
.PHONY: install test lint tiny

install:
	pip install -e ".[test]"

test:
	pytest

lint:
	ruff check .

tiny:
	python fastmam/pretrain.py --config tiny
