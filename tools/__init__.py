"""Developer tools: artifact generators and the local FHIR test server."""
