"""Plan → FHIR R4B resources; every builder validates its output through the R4B model."""
