"""Benchmarks behind `tools/bench.py`: one module per subcommand, all writing a record.BenchRecord."""
