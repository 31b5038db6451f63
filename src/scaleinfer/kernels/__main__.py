"""`python -m scaleinfer.kernels` (run by `make`): build or load the CPU kernels, say so in one line."""
from scaleinfer.kernels.loader import main

raise SystemExit(main())
