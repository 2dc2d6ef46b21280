"""A scikit-learn grid search whose fits run on a fade pool, through joblib.

    pip install 'fade[sklearn]'
    python examples/grid_search.py                          # embedded pool
    python examples/grid_search.py --address tcp://head:5555  # a running pool
    python examples/grid_search.py --smoke                  # a tiny search

Importing ``fade.joblib_backend`` registers the "fade" joblib backend; inside
``joblib.parallel_config(backend="fade")`` scikit-learn's ``n_jobs=-1`` means
every worker of the pool. The workers need scikit-learn installed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import joblib
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import fade.joblib_backend


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="broker address (default: embedded)")
    parser.add_argument("--smoke", action="store_true", help="a tiny search for a quick check")
    args = parser.parse_args(argv)
    X, y = load_digits(return_X_y=True)
    if args.smoke:
        X, y = X[:300], y[:300]
        grid = {"C": [1.0, 10.0], "gamma": [0.001, 0.01]}
    else:
        grid = {"C": [0.1, 1.0, 10.0, 100.0], "gamma": [0.0001, 0.0003, 0.001, 0.003, 0.01]}

    started = time.perf_counter()
    with joblib.parallel_config(backend="fade", address=args.address):
        search = GridSearchCV(SVC(), grid, cv=5, n_jobs=-1).fit(X, y)
        workers = joblib.effective_n_jobs(-1)
    elapsed = time.perf_counter() - started
    fade.joblib_backend.shutdown()  # end the embedded pool (it would also end at exit)

    fits = len(search.cv_results_["params"]) * search.n_splits_
    print(f"{fits} fits on {workers} fade workers in {elapsed:.2f} s")
    print(f"best: {search.best_params_} (mean accuracy {search.best_score_:.4f})")


if __name__ == "__main__":
    main()
