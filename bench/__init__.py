"""Benchmarks of the kit against llama.cpp itself: `bench/run.py` (or `kit bench`) runs them all.
bench/memory_estimate.py is separate: the memory estimate against a real peak RSS."""
