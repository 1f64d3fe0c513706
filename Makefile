.PHONY: help install test test-all lint format run

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install clrun (editable) with the test tools; keeps an installed torch
	bash scripts/install.sh

test:  ## the fast test suite
	python3 -m pytest

test-all:  ## fast and slow tests (real data, multirun, wheel install)
	python3 -m pytest && python3 -m pytest -m slow

lint:  ## ruff check and format check
	ruff check . && ruff format --check .

format:  ## ruff fix and format
	ruff check --fix . && ruff format .

run:  ## the main job: Split MNIST, naive fine-tuning
	clrun
