"""Benchmarks of imgsearch; results go to bench/results/."""
