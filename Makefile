# The few commands people need (see README.md).
.PHONY: install test test-fast lint tiny doctor aot

install:  # a CUDA build of torch compiles fastmam._C too (see README: the test command)
	pip install --no-build-isolation -e ".[test]"

test:
	pytest

test-fast:
	pytest -m "not slow"

lint:
	ruff check .

tiny:
	python fastmam/pretrain.py --config tiny

doctor:
	python -m fastmam.doctor

aot:
	python -m fastmam.kernels.aot --arch 80 90
