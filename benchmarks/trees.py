"""Writes frozen code trees for a device call: `python -m benchmarks.trees base= fixed=a.diff,b.diff`.

Each NAME=PATCHES becomes `.bench-tree/NAME` (the commit HEAD, this suite's files, the patches applied); the
device machine gets no `.git`, so the trees are built here and carried (`carry: [".bench-tree"]`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from benchmarks.common import REPO, snapshot


def main() -> None:
    root = REPO / ".bench-tree"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for item in sys.argv[1:]:
        name, _, patches = item.partition("=")
        tree = snapshot([p for p in patches.split(",") if p])
        for extra in ("tests", "cluster"):  # not needed to serve; keeps the carried trees small
            shutil.rmtree(tree / extra, ignore_errors=True)
        # The device machine has no .git: the tree says which commit (and patches) it froze.
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (tree / "COMMIT").write_text(f"{head} {patches}".strip() + "\n")
        shutil.move(str(tree), root / name)
        print(root / name)


if __name__ == "__main__":
    main()
