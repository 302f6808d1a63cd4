"""``python -m normlab …`` (and ``torchrun -m normlab study …``)."""

from normlab.cli import main

raise SystemExit(main())
