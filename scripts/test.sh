#!/usr/bin/env bash
# README's test command: install (CPU torch first, so pip never pulls a CUDA build) and run the fast suite.
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,dev]"
ruff check .
python -m pytest -q
