# The two commands of the README, and helpers. Every target does its own set-up (scripts/setup.sh is
# idempotent): a fresh Debian machine with Rust needs nothing else.
SHELL := /bin/bash
ENV := source scripts/env.sh
# The README build: CPU ranks under mpirun use MPI.
FEATURES := --features idavlm/mpi
BIN := target/debug

.PHONY: setup setup-test build demo test gpu-bundle clean-runs

setup:
	bash scripts/setup.sh

build: setup
	$(ENV) && cargo build --workspace $(FEATURES)

## The main job: the tiny model on the synthetic dataset, 2 CPU ranks, then the held-out evaluation.
demo: build
	$(ENV) && bash scripts/demo.sh

# The tests also need a live Slurm (Debian's packages; tests/tests/slurm.rs starts the daemons itself)
# and the peft package (the oracle of the LoRA export).
setup-test:
	bash scripts/setup.sh --test

## The whole test suite (unit, cross-crate and multi-process tests, a live single-node Slurm).
test: build setup-test
	$(ENV) && IDAVLM_EXPECT_MPI=1 IDAVLM_EXPECT_SLURM=1 cargo test --workspace $(FEATURES) -- --test-threads 2

## Release binaries for a GPU machine, stripped, in .carry/ (see README: GPU machines).
gpu-bundle: setup
	$(ENV) && cargo build --release --workspace $(FEATURES)
	mkdir -p .carry/bin && cp target/release/idavlm-{launch,worker,shards,infer,eval} .carry/bin/ && strip .carry/bin/*
	cp scripts/gpu-env.sh .carry/
	@du -sh .carry

clean-runs:
	rm -rf runs
