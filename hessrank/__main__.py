"""``python -m hessrank ...`` (and ``torchrun --nproc-per-node N -m hessrank analyze ...``):
the same command line as the ``hessrank`` script (:func:`hessrank.cli.main`)."""

import sys

from hessrank.cli import main

if __name__ == "__main__":
    sys.exit(main())
