"""`python -m softpo.train` and `torchrun --nproc-per-node N -m softpo.train`."""

from softpo.train.loop import main

raise SystemExit(main())
