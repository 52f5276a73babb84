"""AutoML for train: policy, search space from the train schema, Optuna studies, trials, summary.

Importing the package imports nothing heavy; ``policy`` is safe at DAG-parse time (no optuna, no torch).
"""
