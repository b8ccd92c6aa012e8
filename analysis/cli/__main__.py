"""`python -m analysis.cli ...` (and `torchrun ... -m analysis.cli ...`) runs the dqlab CLI."""
import sys

from analysis.cli import main

sys.exit(main())
