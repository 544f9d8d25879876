"""`python -m peftbench.tuned STORAGE`, the command the README names: the same as
`python -m peftbench.lr_search STORAGE` (the learning-rate search's best trial per method -> tuned.yaml)."""

import sys

from peftbench.lr_search import main

if __name__ == "__main__":
    sys.exit(main())
