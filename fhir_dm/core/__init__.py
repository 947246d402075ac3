"""The pure core: FHIR input → facts → rules → plan → FHIR output. No I/O, no clock."""
