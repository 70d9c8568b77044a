"""``python -m hessrank ...`` (and ``torchrun --nproc-per-node N -m hessrank analyze ...``):
the same command line as the ``hessrank`` script (:func:`hessrank.cli.run`)."""

from hessrank.cli import run

if __name__ == "__main__":
    run()
