# Shortcuts over scripts/ (which are what CI and the README use).
.PHONY: setup build-dev lint test bench bench-py bench-rust

setup:
	scripts/setup

build-dev:
	VIRTUAL_ENV=$(CURDIR)/.venv .venv/bin/maturin develop --release --extras prometheus,kafka,plot

lint:
	scripts/lint

test:
	scripts/test

# pytest-benchmark suites (ratios and targets are printed at the end).
bench-py:
	.venv/bin/python -m pytest benches -q --benchmark-disable-gc --benchmark-columns=median,rounds

# criterion benches of the pure-Rust core.
bench-rust:
	cargo bench -p keylane-core

bench: bench-py bench-rust
