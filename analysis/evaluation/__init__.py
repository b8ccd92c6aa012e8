"""Evaluation: sample quality metrics (FID through torch-fidelity), the digit classifier, side-by-side
comparison, evaluations and sweeps, the run store, sharded sampling, and the speed benchmark."""
