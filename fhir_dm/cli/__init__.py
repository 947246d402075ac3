"""The command line: ``fhir-dm`` (``main``), the demo and the population commands."""
