"""`python -m fhir_dm`: the same command line as `fhir-dm`."""

from fhir_dm.cli.main import main_cli

main_cli()
