"""``python -m kdseq_fast`` runs the ``kdseq-fast`` command line."""
import sys

from .cli import main

sys.exit(main())
