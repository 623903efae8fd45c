"""Regenerate the skeleton descriptions of the zoo models that ship with the package.

    python -m surgery.skeleton_zoo

Lives apart from skeleton.py because it needs model loading (models.py), which itself builds
skeletons: keeping it here leaves skeleton.py with no upward import.
"""

from __future__ import annotations

import json

from surgery.models import build_skeleton, zoo_config
from surgery.skeleton import SHIPPED, cache_key, describe
from surgery.zoo import ZOO


def main() -> None:
    """Write the descriptions of the zoo models into the package (for the installed versions)."""
    SHIPPED.mkdir(parents=True, exist_ok=True)
    for name in ZOO:
        config = zoo_config(name)
        path = SHIPPED / f"{cache_key(config)}.json"
        path.write_text(json.dumps(describe(build_skeleton(config)), indent=None))
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
