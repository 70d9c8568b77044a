"""Drop-in interfaces of other tools, backed by hessrank's operators and estimators."""
