"""``python -m fastclip.bench``."""

import sys

from fastclip.bench import main

sys.exit(main())
