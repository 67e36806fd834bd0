# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both bootstrap uv into .tools/ when it is not on PATH and sync the locked environment.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: demo test lint bench sync

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# --compile-bytecode: write every module's .pyc once at install. Where PYTHONDONTWRITEBYTECODE
# is set (as on our CI machines), every Python process (CLI, Ray worker, dvc) otherwise
# compiles what it imports from source: `import torch` alone took about 4 s of it.
sync: $(UV)
	$(UV) sync --frozen --compile-bytecode

demo: sync
	$(UV) run python -m flows.retrain

test: sync
	$(UV) run ruff check .
	$(UV) run pytest -q -n 2 --dist loadgroup --durations=15

bench: sync
	$(UV) run python benchmarks/bench_prepare.py
	$(UV) run python benchmarks/bench_metrics.py
	$(UV) run python benchmarks/bench_model.py
	$(UV) run python benchmarks/bench_tiling.py
	$(UV) run python benchmarks/bench_ray.py
	$(UV) run python benchmarks/bench_s3_outage.py
	$(UV) run python benchmarks/bench_ingest.py
