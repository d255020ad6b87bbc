"""The benchmark scripts, each run from the repository root as ``python -m benchmarks.<name>``; what they
share is in ``benchmarks.common``. ``docs/benchmarks.md`` lists them, ``benchmarks/results/README.md`` the
results files and the command that writes each."""
