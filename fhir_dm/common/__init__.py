"""What every layer shares: the one exception tree and the request's time budget.

Imports nothing else of fhir_dm, so any layer may import it.
"""
