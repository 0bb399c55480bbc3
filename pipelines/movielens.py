"""Top-10 unseen movies for a few MovieLens users, from an export directory.

Run after `tfdssm train --pipeline movielens --export-dir DIR` (``make demo`` does
both). The user features come from the MovieLens user table; movies a user has
already rated are excluded.

    python pipelines/movielens.py --export-dir saved_models/movielens --users 1,42
"""

from __future__ import annotations

import argparse
import sys

import tfdssm  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from tfdssm.data.movielens import load_movielens_100k
from tfdssm.errors import TfdssmError
from tfdssm.retrieve import LocalRetriever


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", default="saved_models/movielens")
    parser.add_argument("--users", default="1,42,500", help="comma-separated user ids")
    parser.add_argument("--data", help="extracted ml-100k directory (default: cache)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        movielens = load_movielens_100k(args.data, verbose=False)
        retriever = LocalRetriever(args.export_dir)
        users = movielens.users.set_index("user_id")
        wanted = [u.strip() for u in args.users.split(",") if u.strip()]
        unknown = [u for u in wanted if u not in users.index]
        if unknown:
            raise TfdssmError(f"unknown user id(s) {unknown}; ids run from 1 to "
                              f"{len(users)}.")
        rows = users.loc[wanted].reset_index()
        if "history" in retriever.query_names:  # --user-tower history / youtube
            from tfdssm.data.history import build_histories  # noqa: PLC0415

            now = rows.assign(timestamp=2**62)  # every rating so far, latest last
            rows = rows.join(build_histories(now, movielens.ratings, max_length=500))
        features = {name: rows[name].tolist() for name in retriever.query_names}
        rated = movielens.ratings.groupby("user_id")["movie_id"].apply(list)
        ids, scores = retriever.top_k(
            features, k=args.k, exclude=[rated.get(u, []) for u in wanted]
        )
        movies = movielens.movies.set_index("movie_id")
        metrics = retriever.info.get("metrics", {})
        print(
            f"\nexport {args.export_dir}: "
            f"recall@100 {metrics.get('recall@100', 0):.3f} "
            f"(unseen: {metrics.get('recall@100_excl', 0):.3f}) over "
            f"{len(retriever.ids)} movies"
        )
        for row, user in enumerate(wanted):
            u = users.loc[user]
            print(
                f"\nuser {user} ({u['age']}, {u['gender']}, {u['occupation']}): "
                f"top {args.k} unseen movies"
            )
            ranked = zip(ids[row], scores[row], strict=True)
            for rank, (movie, score) in enumerate(ranked, 1):
                m = movies.loc[movie]
                year = f" ({m['year']})" if m["year"] else ""
                print(f"  {rank:>2}. {m['title']}{year:<8} {score:6.3f}  {m['genres']}")
    except TfdssmError as error:
        print(f"tfdssm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
