"""torch + Flower FedAvg, the peers' baseline for ``benchmarks/flower_overhead.py``."""
