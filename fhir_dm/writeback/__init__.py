"""Write-back: a patient's result written to the FHIR server atomically and idempotently,
under a per-patient lock (``writer``, ``locks``)."""
