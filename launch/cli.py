"""What the command-line scripts share: a user's mistake (a missing file, a bad value, a corrupt shard) ends in
one line naming it and exit status 2, not a traceback. ``main()`` functions raise as usual for callers in Python."""
from __future__ import annotations

import sys


def run_main(main, prog: str) -> int:
    from lfzh_ds.shards import ShardError

    try:
        return main() or 0
    except (OSError, ValueError, KeyError, ShardError) as err:  # ValueError covers ConfigError, InputError
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
